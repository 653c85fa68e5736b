"""Gradient steps recorded once from the Pyro declaration and compiled.

An eager Pyro step runs the declaration again every step: its messengers, its enumeration and its
contraction plan, in Python. On small data that Python is nearly all of a step. Here the whole
step is recorded once as a graph of tensor operations. For ``map`` and ``svi`` that is the
enumerated loss that ``TraceEnum_ELBO`` computes from the model and the guide, its gradient and
the optimizer's update; for ``mcmc`` it is a leapfrog step of NUTS on the potential energy that
Pyro's ``initialize_model`` derives (velocity Verlet with the gradient, and the energies NUTS reads
off the new point). ``make_fx`` records it by running Pyro's own code once; the Python decisions
that code takes on tensor values (validation, masks) are kept at the values they had, and what
the graph computes from constants alone (the prior's hyperparameters) is computed then, once.
TorchInductor then compiles the graph, and every later step runs the compiled graph alone: the
operations of an eager step, so the losses of eager Pyro to rounding.

What the graph cannot see is fixed when it is recorded: shapes (a mini-batch has one size, so it
never recompiles), the number of particles, and Pyro's checks of values (a step that leaves the
support gives a non-finite loss instead of Pyro's ValueError). Random draws (the guide's, the
mini-batch's) stay in the graph as calls to torch's global generator, in the order of the eager
step, so a seeded run draws what eager Pyro draws.
"""

from __future__ import annotations

import importlib
import logging
import math
import operator
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import pyro
import torch
from pydantic import BeforeValidator
from pyro.infer import NUTS, TraceEnum_ELBO
from pyro.infer.mcmc.nuts import _TreeInfo
from torch import Tensor, fx
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = [
    "COMPILE_MIN_STEPS",
    "INDUCTOR_MAX_NODES",
    "Compile",
    "FLAT",
    "CompiledLeapfrog",
    "CompiledSVI",
    "FlatSites",
    "FusedNUTS",
    "compile_graph",
    "direct_gradients",
    "record",
    "wants",
]


# the backends' ``compile`` option: auto (the default) records runs of at least COMPILE_MIN_STEPS
# steps and compiles their graph unless it is larger than INDUCTOR_MAX_NODES operations; true
# records and compiles whatever the length; record records only (the graph runs as recorded, no
# C++ compiler needed); false runs Pyro's eager step
def _compile_value(value: object) -> object:
    if value in ("auto", "record") or isinstance(value, bool):
        return value
    raise ValueError("expected auto, true, record or false")  # the error line adds what it found


Compile = Annotated[Literal["auto", "record"] | bool, BeforeValidator(_compile_value)]
How = Literal["auto", "record", "inductor"]

# recording takes 1-3 s (a hidden Markov model's 10 s and more: one operation per time step);
# compiling 10-30 s with TorchInductor's cache cold and 1-4 s warm. An eager step takes 3-100 ms.
COMPILE_MIN_STEPS = 1000
# TorchInductor's compiling grows with the graph: 20 s for the Gaussian mixture's MAP step (about
# 400 operations), 160 s for a Gaussian HMM's over 20 time steps (about 4900)
INDUCTOR_MAX_NODES = 3000

_ATEN = torch.ops.aten
# recorded for a decision Pyro or torch took on a value, or for an error check; the graph keeps
# the decision, and these nodes (whose results nothing in the graph uses) would break it up
_DROPPED = (_ATEN._local_scalar_dense.default, _ATEN._linalg_check_errors.default)


def wants(option: Compile, steps: int, min_steps: int = COMPILE_MIN_STEPS) -> How | None:
    """What a run of ``steps`` steps does under the ``compile`` option: None (eager), ``record``,
    ``inductor`` or ``auto`` (inductor unless the graph is large)."""
    if option == "auto":
        return "auto" if steps >= min_steps else None
    if option == "record":
        return "record"
    return "inductor" if option else None


def record(fn: Callable[..., Any], inputs: Sequence[Tensor]) -> fx.GraphModule:
    """The tensor operations of ``fn(*inputs)`` as a graph of ``inputs``.

    ``fn`` may reach the inputs by other names than its arguments (Pyro's parameter store): what
    the graph takes as inputs are these tensor objects, wherever ``fn`` finds them. Pyro's
    validation is off while recording, and the values Python read off tensors are kept.
    """
    with pyro.validation_enabled(False), warnings.catch_warnings():
        # make_fx calls a deprecated torch check of its own while it records
        warnings.simplefilter("ignore", FutureWarning)
        graph = make_fx(fn, _error_on_data_dependent_ops=False)(*inputs)
    for node in list(graph.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPPED and not node.users:
            graph.graph.erase_node(node)
        elif node.target is _ATEN.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    _fold_constants(graph)
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return graph


def _fold_constants(graph: fx.GraphModule) -> None:
    """Computes once, here, what the graph computes from its constants alone (the prior's
    hyperparameters: a Wishart's scale factor, normalizing constants) and puts the results in the
    graph as constants. Draws and the buffers they are drawn into stay in the graph."""
    values: dict[fx.Node, Any] = {}

    def foldable(node: fx.Node) -> bool:
        target = node.target
        if node.op == "get_attr":
            return True
        if node.op != "call_function" or not all(arg in values for arg in node.all_input_nodes):
            return False
        if target is operator.getitem:
            return True
        if not isinstance(target, torch._ops.OpOverload):
            return False
        if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return False
        # a buffer an operation writes into (a draw's) is made anew each call
        return not any(
            isinstance(user.target, torch._ops.OpOverload) and user.target._schema.is_mutable
            for user in node.users
        )

    for node in graph.graph.nodes:
        if not foldable(node):
            continue
        if node.op == "get_attr":
            values[node] = operator.attrgetter(str(node.target))(graph)
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
            values[node] = node.target(*args, **kwargs)  # type: ignore[operator]
    folded = 0
    for node, value in values.items():
        if node.op == "get_attr" or not isinstance(value, Tensor):
            continue
        if all(user in values for user in node.users):
            continue  # only other constants use it
        name = f"_folded_constant_{folded}"
        folded += 1
        graph.register_buffer(name, value, persistent=False)
        with graph.graph.inserting_before(node):
            constant = graph.graph.get_attr(name)
        node.replace_all_uses_with(constant, delete_user_cb=lambda user: user not in values)


def compile_graph(graph: fx.GraphModule, inputs: Sequence[Tensor]) -> Callable[..., Any]:
    """``graph`` compiled by TorchInductor for inputs shaped like ``inputs`` (which it may change
    in place, as the graph does).

    Random operations keep torch's own kernels (``fallback_random``), which draw from the global
    generator as eager code does. The code that calls the kernels is C++ too (``cpp_wrapper``):
    with Python calling them, a step of these small graphs cost 2-3 times as much (0.46 against
    1.25 ms for the Gaussian mixture's potential energy on 240 × 2 points). The compiled code is
    cached on disk by TorchInductor, keyed by the graph, so a second run of the same problem
    compiles in a few seconds instead of tens.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchInductor's own deprecated calls, not the user's concern
        from torch._guards import TracingContext, tracing
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        examples = [value.detach() for value in inputs]
        # the context dynamo would give: without its shape environment TorchInductor skips its cache
        context = TracingContext(FakeTensorMode(shape_env=ShapeEnv()))
        options = inductor_config.patch(fallback_random=True, cpp_wrapper=True)
        with tracing(context), options, _quiet_logger("torch._inductor"):
            compiled = compile_fx(graph, examples)
    assert callable(compiled)  # compile_fx returns source code or weights only when asked for them
    return compiled


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """The logger ``name`` at ERROR within the block: TorchInductor logs a warning for each linear
    algebra call it leaves to ATen ("missing a c-shim implementation"), which is no news to a user."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Timer:
    seconds = 0.0

    def __enter__(self) -> _Timer:
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._began


class _RngKept:
    """Restores torch's global generator on exit: recording runs a step, whose draws the first
    compiled step must draw again."""

    def __enter__(self) -> None:
        self._state = torch.get_rng_state()

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self._state)


# ---- map and svi -------------------------------------------------------------------------------

BETAS = (0.9, 0.999)  # torch.optim.Adam's and Pyro's ClippedAdam's defaults, which the backends use
EPS = 1e-8
CLIP_NORM = 10.0  # ClippedAdam's default


def _adam(
    params: Iterable[Tensor],
    grads: Iterable[Tensor],
    moments: Iterable[tuple[Tensor, Tensor]],
    step: Tensor,
    lr: float,
) -> None:
    """``torch.optim.Adam``'s update (its single-tensor code, default options) in place."""
    beta1, beta2 = BETAS
    step.add_(1)
    correction1 = 1 - beta1**step
    correction2_sqrt = (1 - beta2**step).sqrt()
    for param, grad, (mean, square) in zip(params, grads, moments, strict=True):
        mean.lerp_(grad, 1 - beta1)
        square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (square.sqrt() / correction2_sqrt).add_(EPS)
        param.sub_(mean / denom * (lr / correction1))


def _clipped_adam(
    params: Iterable[Tensor],
    grads: Iterable[Tensor],
    moments: Iterable[tuple[Tensor, Tensor]],
    step: Tensor,
    lr: float,
) -> None:
    """Pyro's ``ClippedAdam`` update (default options: gradients clipped to ±10, no decay) in place."""
    beta1, beta2 = BETAS
    step.add_(1)
    step_size = lr * (1 - beta2**step).sqrt() / (1 - beta1**step)
    for param, grad, (mean, square) in zip(params, grads, moments, strict=True):
        grad = grad.clamp(-CLIP_NORM, CLIP_NORM)
        mean.mul_(beta1).add_(grad, alpha=1 - beta1)
        square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        param.sub_(mean / square.sqrt().add_(EPS) * step_size)


UPDATES = {"adam": _adam, "clipped_adam": _clipped_adam}


class CompiledSVI:
    """``SVI.step`` of ``elbo`` on ``model(*args, **kwargs)`` and ``guide``, with the optimizer
    ``optimizer`` at ``lr``, recorded once and compiled; ``step()`` returns the loss as
    ``SVI.step`` does.

    The guide's parameters must be in Pyro's parameter store already (run the guide once); the
    compiled step updates them there, in place. ``compile_seconds`` is what recording and
    compiling took, ``how`` whether TorchInductor compiled the graph or it runs as recorded.
    """

    def __init__(
        self,
        elbo: TraceEnum_ELBO,
        model: Callable[..., Any],
        guide: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        optimizer: str,
        lr: float,
        how: How = "inductor",
    ) -> None:
        store = pyro.get_param_store()
        self.params = [value for _, value in store.named_parameters()]
        with torch.no_grad():
            self._moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self._step = torch.zeros((), dtype=torch.float64)
        update = UPDATES[optimizer]
        tensors = [a for a in args if isinstance(a, Tensor)]

        def step(*_: Tensor) -> Tensor:
            loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
            grads = torch.autograd.grad(loss, self.params)
            with torch.no_grad():
                update(self.params, grads, self._moments, self._step, lr)
            return loss.detach()

        timer = _Timer()
        with timer, _RngKept():
            start = [p.detach().clone() for p in self.params]
            try:
                graph = record(step, self._inputs(tensors, self.params))
            finally:
                with torch.no_grad():  # the recording took a step (or part of one): undo it
                    for param, value in zip(self.params, start, strict=True):
                        param.copy_(value)
                    self._reset()
            self._inputs_now = self._inputs(tensors, [p.detach() for p in self.params])
            self.how, self._run = _compiled_or_recorded(graph, self._inputs_now, how)
        self.compile_seconds = timer.seconds

    def _inputs(self, data: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        return [*data, *params, *(t for pair in self._moments for t in pair), self._step]

    def _reset(self) -> None:
        for mean, square in self._moments:
            mean.zero_()
            square.zero_()
        self._step.zero_()

    def step(self) -> float:
        with torch.no_grad():
            return float(self._run(*self._inputs_now))


# ---- mcmc ----------------------------------------------------------------------------------------


class _Energy(torch.autograd.Function):
    """The potential energy, whose gradient the compiled graph computed with it."""

    @staticmethod
    def forward(ctx: Any, energy: Tensor, grad: Tensor, value: Tensor) -> Tensor:  # type: ignore[override]
        ctx.grad = grad
        return energy

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return None, None, upstream * ctx.grad


FLAT = "sites"  # the one site NUTS moves when it samples a compiled potential


class CompiledLeapfrog:
    """NUTS's leapfrog step on one flat vector of sites (``FlatSites``), recorded once at ``example``
    and compiled: a velocity-Verlet step of the potential energy ``potential_fn`` (a function of
    the vector) under a diagonal mass matrix, with the energies Pyro's NUTS computes for a base tree
    (``FusedNUTS``), operation for operation as Pyro's ``velocity_verlet`` and
    ``NUTS._build_basetree`` compute them.

    A step of size zero from zero momentum is the potential energy and its gradient at the point:
    called as Pyro's ``potential_fn`` on ``{FLAT: vector}`` (its result differentiable by autograd)
    and through ``energy_and_grads`` (what Pyro's ``potential_grad`` returns, without autograd), it
    serves NUTS's other calls (the first point, the search for a first step size).
    """

    def __init__(
        self, potential_fn: Callable[[Tensor], Tensor], example: Tensor, how: How = "inductor"
    ) -> None:
        def leapfrog(
            z: Tensor,
            r: Tensor,
            grads: Tensor,
            step_size: Tensor,
            inverse_mass: Tensor,
            sqrt_inverse_mass: Tensor,
            log_slice: Tensor,
            energy_current: Tensor,
            max_sliced_energy: Tensor,
        ) -> tuple[Tensor, ...]:
            r = r + 0.5 * step_size * (-grads)  # r(n+1/2)
            z = (z + step_size * inverse_mass.mul(r)).detach().requires_grad_(True)  # z(n+1)
            potential = potential_fn(z)
            (grads,) = torch.autograd.grad(potential, z)
            potential = potential.detach()
            r = r + 0.5 * step_size * (-grads)  # r(n+1)
            r_unscaled = sqrt_inverse_mass.mul(r)
            energy = potential + 0.5 * (0.0 + r_unscaled.dot(r_unscaled))
            energy = torch.where(torch.isnan(energy), torch.full_like(energy, math.inf), energy)
            sliced_energy = energy + log_slice
            diverging = sliced_energy > max_sliced_energy
            accept_prob = (-(energy - energy_current)).exp().clamp(max=1.0)
            return z.detach(), r, r_unscaled, grads, potential, -sliced_energy, diverging, accept_prob

        value = example.detach()
        zero, zeros, ones = value.new_zeros(()), torch.zeros_like(value), torch.ones_like(value)
        # the inputs of a step of size zero from zero momentum: the potential and gradient at z
        self._at_rest = (zeros, zeros, zero, ones, ones, zero, zero, value.new_tensor(MAX_SLICED_ENERGY))
        timer = _Timer()
        with timer, _RngKept():
            # one tensor object per input: the recording tells its inputs apart by identity
            inputs = [t.clone() for t in (value, *self._at_rest)]
            graph = record(leapfrog, inputs)
            self.how, self._run = _compiled_or_recorded(graph, inputs, how)
        self.compile_seconds = timer.seconds

    def step(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """z, r, gradient, potential, r unscaled, the tree's weight, whether it diverged and the
        acceptance probability after one step: ``leapfrog``'s inputs and results, as above."""
        return tuple(self._run(*inputs))

    def energy_and_grads(self, params: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """What Pyro's ``potential_grad`` returns (gradients by name, the energy), without autograd."""
        with torch.no_grad():
            outputs = self._run(params[FLAT].detach(), *self._at_rest)
        return {FLAT: outputs[3]}, outputs[4]

    def __call__(self, params: Mapping[str, Tensor]) -> Tensor:
        value = params[FLAT]
        grads, energy = self.energy_and_grads(params)
        return _Energy.apply(energy, grads[FLAT], value) if value.requires_grad else energy


MAX_SLICED_ENERGY = 1000.0  # Pyro's NUTS stops doubling a tree past this sliced energy (Stan's)


class FusedNUTS(NUTS):
    """Pyro's NUTS whose base trees (a leapfrog step and its energies) are one call of a
    ``CompiledLeapfrog``: the rest of NUTS (the doubling, the U-turn checks, the adaptation, the
    draws) is Pyro's. The same numbers as Pyro's ``_build_basetree``, without its Python (half of
    the time of a leapfrog step on small data once the potential is compiled)."""

    def _build_basetree(
        self,
        z: dict[str, Tensor],
        r: dict[str, Tensor],
        z_grads: dict[str, Tensor],
        log_slice: Tensor,
        direction: int,
        energy_current: Tensor,
    ) -> Any:
        leapfrog = self.potential_fn
        adapter = self.mass_matrix_adapter
        inverse_mass = adapter.inverse_mass_matrix.get((FLAT,))
        usual = (
            isinstance(leapfrog, CompiledLeapfrog)
            and self.use_multinomial_sampling
            and self._max_sliced_energy == MAX_SLICED_ENERGY
            and inverse_mass is not None
            and inverse_mass.dim() == 1  # a diagonal mass matrix
        )
        if not usual:
            return super()._build_basetree(z, r, z_grads, log_slice, direction, energy_current)
        assert isinstance(leapfrog, CompiledLeapfrog) and inverse_mass is not None
        step_size = self.step_size if direction == 1 else -self.step_size
        z_new, r_new, r_unscaled, grads, potential, weight, diverging, accept_prob = leapfrog.step(
            z[FLAT],
            r[FLAT],
            z_grads[FLAT],
            inverse_mass.new_tensor(step_size),
            inverse_mass,
            adapter._mass_matrix_sqrt_inverse[(FLAT,)],
            log_slice,
            energy_current,
            leapfrog._at_rest[-1],
        )
        z_next, r_next, g_next, unscaled = {FLAT: z_new}, {FLAT: r_new}, {FLAT: grads}, {(FLAT,): r_unscaled}
        # _TreeInfo: the left and right leaves and the proposal are the one new point
        return _TreeInfo(
            z_next,
            r_next,
            unscaled,
            g_next,
            z_next,
            r_next,
            unscaled,
            g_next,
            z_next,
            potential,
            g_next,
            unscaled,
            weight,
            False,
            diverging,
            accept_prob,
            1,
        )


class FlatSites:
    """Sites' values (a dict of tensors) as one flat vector and back, in sorted name order, the
    order in which Pyro's NUTS lays out a diagonal mass matrix and draws its momenta: one vector
    instead of one tensor a site spares NUTS's per-site Python at every leapfrog step."""

    def __init__(self, example: Mapping[str, Tensor]) -> None:
        self.names = sorted(example)
        self.shapes = [example[name].shape for name in self.names]
        self.sizes = [example[name].numel() for name in self.names]

    def join(self, values: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([values[name].reshape(-1) for name in self.names])

    def split(self, flat: Tensor) -> dict[str, Tensor]:
        """The sites from ``flat`` (..., total): leading dims (draws) are kept."""
        parts = flat.split(self.sizes, dim=-1)
        return {
            name: part.reshape(*flat.shape[:-1], *shape)
            for name, part, shape in zip(self.names, parts, self.shapes, strict=True)
        }


# the modules of Pyro's NUTS that call ``potential_grad`` by that name
_POTENTIAL_GRAD_USERS = (
    "pyro.ops.integrator",
    "pyro.infer.mcmc.hmc",
    "pyro.infer.mcmc.nuts",
    "pyro.infer.mcmc.util",
)


@contextmanager
def direct_gradients() -> Iterator[None]:
    """Within the block, Pyro's NUTS takes a ``CompiledLeapfrog``'s gradient from the compiled
    graph, which computed it with the energy, instead of asking autograd for it (Pyro's
    ``potential_grad``): a third of the time of a leapfrog step on small data (0.37 of 1.57 ms
    for the Gaussian mixture on 240 × 2 points). Other potentials go to Pyro's function."""
    modules = [importlib.import_module(name) for name in _POTENTIAL_GRAD_USERS]
    original = getattr(modules[0], "potential_grad")  # noqa: B009 - mypy sees no such attribute

    def potential_grad(potential_fn: Any, z: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        if isinstance(potential_fn, CompiledLeapfrog):
            return potential_fn.energy_and_grads(z)
        return original(potential_fn, z)

    saved = [getattr(module, "potential_grad") for module in modules]  # noqa: B009
    try:
        for module in modules:
            setattr(module, "potential_grad", potential_grad)  # noqa: B010
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            setattr(module, "potential_grad", value)  # noqa: B010


def _compiled_or_recorded(
    graph: fx.GraphModule, inputs: Sequence[Tensor], how: How
) -> tuple[str, Callable[..., Any]]:
    """The graph compiled by TorchInductor, or the graph as recorded (still without Pyro's
    Python): with ``how`` record, with auto when it is large, and where TorchInductor cannot
    compile (no C++ compiler); with which of the two it is."""
    if how == "record" or (how == "auto" and len(graph.graph.nodes) > INDUCTOR_MAX_NODES):
        return "recorded", graph
    try:
        return "inductor", compile_graph(graph, inputs)
    except Exception as exc:  # noqa: BLE001 - any compiler failure leaves the recorded graph
        warnings.warn(
            f"TorchInductor could not compile the recorded step ({type(exc).__name__}); it runs as recorded, "
            "without Pyro's Python but unfused",
            RuntimeWarning,
            stacklevel=3,
        )
        return "recorded", graph
