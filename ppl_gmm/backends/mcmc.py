"""MCMC: the reference posterior over the global parameters, drawn by NUTS on the model's own
declaration, with the assignments summed out exactly (the model is ``@config_enumerate``).

Chains run one after another in this process, each from the shared initial parameters and each
drawing from the global RNG, so ``pyro.set_rng_seed`` makes a run reproducible. Each draw is
relabelled to a pivot (the initial parameters) by Hungarian matching on the model's
pivot, so label switching neither blurs
the posterior summaries nor fakes a convergence failure; R-hat and the effective sample size are
computed on the relabelled draws.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from pydantic import Field, model_validator
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor

from ..errors import UserError
from ..evaluate import posterior_moments, relabel
from ..models.base import LatentModel, Params
from .base import BACKENDS, Backend, Clock, FitError, FitResult, Options, Report, StepInfo, one_line
from .compiled import FLAT, Compile, CompiledLeapfrog, FlatSites, FusedNUTS, direct_gradients, wants

__all__ = [
    "MCMCBackend",
    "MCMCOptions",
    "NUTSChains",
    "OnDraw",
    "R_HAT_CONVERGED",
    "convergence",
    "run_nuts",
]

R_HAT_CONVERGED = 1.01  # split R-hat below this on every parameter counts as converged (Vehtari 2021)
# compile: auto compiles the potential of runs with this many iterations (warmup and draws, all
# chains) or more: each takes several potential evaluations (one a leapfrog step)
MIN_ITERATIONS = 500
MIN_DRAWS_FOR_DIAGNOSTICS = 4  # split R-hat halves each chain; fewer draws give no usable estimate


class MCMCOptions(Options):
    num_samples: int = Field(500, ge=1)  # kept draws per chain
    warmup_steps: int = Field(500, ge=0)  # per chain; adapt step size and mass matrix, then discarded
    num_chains: int = Field(1, ge=1)  # one after another in this process; R-hat compares them
    target_accept_prob: float = Field(0.8, gt=0, lt=1)  # raise it (0.9, 0.95) when draws diverge
    max_tree_depth: int = Field(10, ge=1)  # at most 2^depth leapfrog steps per draw
    # record the potential energy and its gradient once from the declaration and compile them:
    # auto (with 500 iterations or more in all chains), true, record (no compiling), false;
    # compile_seconds reports the cost (see compiled.py)
    compile: Compile = "auto"
    jit_compile: bool = False  # Pyro's JIT of the potential instead (compile: false)

    @model_validator(mode="after")
    def _one_compiler(self) -> MCMCOptions:
        if self.jit_compile and self.compile not in ("auto", False):
            raise ValueError(
                "jit_compile (Pyro's JIT) and compile (the potential recorded and compiled) are two ways "
                "to compile the potential energy; set one of them to false"
            )
        return self


class NUTSChains(NamedTuple):
    """What ``run_nuts`` drew: each site's values (chains, draws, ...) and the sampler's
    diagnostics over the kept draws."""

    samples: dict[str, Tensor]
    divergences: int  # divergent transitions, all chains together
    accept_prob: float  # mean acceptance probability, averaged over chains
    compile_seconds: float | None = None  # recording and compiling the potential (None: eager)
    compiled: str | None = None  # "inductor" or "recorded" (None: eager)
    compile_error: str | None = None  # why compile: auto fell back to eager NUTS


OnDraw = Callable[[int, dict[str, Tensor]], None]
"""Called after every NUTS iteration, warmup included, with the step (1 .. chains × (warmup +
samples), counted across chains) and the values of the sampled sites."""


def run_nuts(
    pyro_model: Callable[[Tensor], object],
    x: Tensor,
    init_sites: Mapping[str, Tensor],
    options: MCMCOptions,
    max_plate_nesting: int = 1,
    on_draw: OnDraw | None = None,
    clock: Clock | None = None,
) -> NUTSChains:
    """NUTS on ``pyro_model(x)``, every chain started from ``init_sites`` (site values, unused
    names ignored, so a conditioned variant of a model can take the full model's start).

    Discrete sites must be marked for enumeration; Pyro sums them out of the potential energy.
    Returns each sampled site's draws as (num_chains, num_samples, *site shape).
    """
    per_chain = options.warmup_steps + options.num_samples
    chains: list[dict[str, Tensor]] = []
    divergences = 0
    accept_probs: list[float] = []
    init_strategy = init_to_value(values=dict(init_sites))
    compiled: CompiledLeapfrog | None = None
    compile_error: str | None = None
    how = (
        None
        if options.jit_compile
        else wants(options.compile, per_chain * options.num_chains, MIN_ITERATIONS)
    )
    if how is not None:
        # the potential NUTS derives from the declaration, derived here once and compiled (aside
        # from ``clock``: the compiling is reported apart)
        with clock.aside() if clock is not None else contextlib.nullcontext():
            initial, potential_fn, transforms, _ = initialize_model(
                pyro_model, (x,), max_plate_nesting=max_plate_nesting, init_strategy=init_strategy
            )
            # NUTS moves one flat vector of all sites (the same mass matrix and momentum draws)
            flat = FlatSites(initial)
            start = {FLAT: flat.join(initial)}
            try:
                compiled = CompiledLeapfrog(lambda z: potential_fn(flat.split(z)), start[FLAT], how)
            except Exception as exc:
                if how != "auto":
                    raise FitError(
                        f"the potential could not be recorded and compiled ({one_line(exc)})"
                    ) from exc
                compile_error = one_line(exc)  # auto: a declaration the recording cannot follow runs eagerly

    def constrained(params: dict[str, Tensor], kernel: NUTS) -> dict[str, Tensor]:
        """Sites' values from NUTS's unconstrained ones (leading dims kept)."""
        if compiled is None:
            return {name: kernel.transforms[name].inv(u) for name, u in params.items()}
        return {name: transforms[name].inv(u) for name, u in flat.split(params[FLAT]).items()}

    for chain in range(options.num_chains):
        common = {"target_accept_prob": options.target_accept_prob, "max_tree_depth": options.max_tree_depth}
        if compiled is None:
            kernel = NUTS(
                pyro_model,
                max_plate_nesting=max_plate_nesting,
                init_strategy=init_strategy,
                jit_compile=options.jit_compile,
                ignore_jit_warnings=True,
                **common,
            )
        else:
            kernel = FusedNUTS(potential_fn=compiled, **common)

        def hook(kernel: NUTS, params: dict[str, Tensor], stage: str, i: int, chain: int = chain) -> None:
            nonlocal divergences
            sampling = stage == "Sample"
            if on_draw is not None:
                with torch.no_grad():
                    values = constrained({name: u.detach() for name, u in params.items()}, kernel)
                on_draw(chain * per_chain + i + 1 + (options.warmup_steps if sampling else 0), values)
            if sampling and i == options.num_samples - 1:
                # the kernel forgets its counters when the chain ends, so read them at its last draw
                divergences += len(kernel.diagnostics()["divergences"])
                accept_probs.append(float(kernel.logging()["acc. prob"]))

        sampler = MCMC(
            kernel,
            num_samples=options.num_samples,
            warmup_steps=options.warmup_steps,
            num_chains=1,
            hook_fn=hook,
            disable_progbar=True,
            # compiled: samples of the flat vector, unconstrained (constrained below)
            **({} if compiled is None else {"initial_params": start, "transforms": {}}),
        )
        with (
            warnings.catch_warnings(),
            direct_gradients() if compiled is not None else contextlib.nullcontext(),
        ):
            # torch deprecates jit.trace, which jit_compile is built on; the option still works
            warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", DeprecationWarning)
            sampler.run(x)
        drawn = {name: value.detach() for name, value in sampler.get_samples().items()}
        chains.append(drawn if compiled is None else constrained(drawn, kernel))
    samples = {name: torch.stack([c[name] for c in chains]) for name in chains[0]}
    return NUTSChains(
        samples,
        divergences,
        sum(accept_probs) / len(accept_probs),
        None if compiled is None else compiled.compile_seconds,
        None if compiled is None else compiled.how,
        compile_error,
    )


def convergence(stacked: Mapping[str, Tensor]) -> tuple[float | None, float | None]:
    """(largest split R-hat, smallest effective sample size) over every entry of every tensor
    (chains, draws, ...); None when there are too few draws to estimate them.

    Entries that never change (the structural zeros of diagonal and spherical covariances, the
    weight of a single component) are left out: they have no variance to diagnose.
    """
    r_hats, ess = [], []
    for value in stacked.values():
        if value.shape[1] < MIN_DRAWS_FOR_DIAGNOSTICS:
            return None, None
        flat = value.reshape(value.shape[0], value.shape[1], -1)
        varies = (flat != flat[:1, :1]).flatten(0, 1).any(0)
        if varies.any():
            r_hats.append(split_gelman_rubin(flat[..., varies], chain_dim=0, sample_dim=1))
            ess.append(effective_sample_size(flat[..., varies], chain_dim=0, sample_dim=1))
    if not r_hats:
        return None, None
    r_hat_max, ess_min = float(torch.cat(r_hats).max()), float(torch.cat(ess).min())
    return (
        r_hat_max if math.isfinite(r_hat_max) else None,
        ess_min if math.isfinite(ess_min) else None,
    )


@BACKENDS.register("mcmc")
class MCMCBackend(Backend[MCMCOptions]):
    name = "mcmc"
    options = MCMCOptions
    samples = True

    def check(self, model: LatentModel, options: MCMCOptions) -> None:
        if not model.has_prior:
            raise UserError(
                "backends.mcmc: MCMC draws from the posterior, but with model.prior: none the prior "
                "is flat and improper, and so may the posterior be (a component can shrink onto one "
                "point or drift off with no data, and the draws with it). Set model.prior: "
                "conjugate, or use em or map for maximum likelihood."
            )

    def total_steps(self, options: MCMCOptions, n: int | None = None) -> int:
        return options.num_chains * (options.warmup_steps + options.num_samples)

    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: MCMCOptions, report: Report
    ) -> FitResult:
        n = x.shape[0]
        clock = Clock()  # progress scores are kept out of the sampling time

        def progress(step: int, params: Params) -> None:
            # the log joint log p(x, θ) per point, assignments summed out (under stick-breaking,
            # of the draw's point estimate, whose weights are normalized). It costs about 5% of a
            # NUTS iteration at N=200, K=3, D=2 (less at larger N), and is kept out of fit_seconds.
            seconds = clock.seconds()
            with clock.aside(), torch.no_grad():
                log_likelihood = float(model.log_likelihood(x, params).sum())
                log_joint = log_likelihood + float(model.log_prior(params))
                report(StepInfo(step, seconds, log_joint / n, log_likelihood / n))

        progress(0, init)
        last = 0

        def on_draw(step: int, sites: dict[str, Tensor]) -> None:
            nonlocal last
            last = step
            progress(step, model.from_sites(sites))

        try:
            chains = run_nuts(
                model.model, x, model.to_sites(init), options, model.max_plate_nesting, on_draw, clock
            )
        except (ValueError, torch.linalg.LinAlgError) as exc:
            # Pyro's checks of a draw or of the start (no finite potential energy), or a draw whose
            # covariance rounds to singular
            raise FitError(
                f"step {last}: NUTS cannot go on ({one_line(exc)}). Set data.standardize: true, use dtype: "
                "float64, or raise backends.mcmc.target_accept_prob."
            ) from None
        seconds = clock.seconds()

        # one point estimate per draw; the model maps single draws, not batches, to parameters
        n_chains, n_draws = options.num_chains, options.num_samples
        flat_sites = {name: value.flatten(0, 1) for name, value in chains.samples.items()}
        pivot = {name: value.detach().to("cpu", torch.float64) for name, value in init.items()}
        draws = [
            relabel(
                model,
                pivot,
                {
                    name: value.detach().to("cpu", torch.float64)
                    for name, value in model.from_sites({s: v[i] for s, v in flat_sites.items()}).items()
                },
            )
            for i in range(n_chains * n_draws)
        ]
        flat = {name: torch.stack([draw[name] for draw in draws]) for name in draws[0]}
        r_hat_max, ess_min = convergence(
            {name: value.reshape(n_chains, n_draws, *value.shape[1:]) for name, value in flat.items()}
        )
        posterior = posterior_moments(model, draws, pivot)
        params = model.project({name: posterior[f"{name}.mean"] for name in model.param_shapes()})
        return FitResult(
            params=params,
            n_steps=self.total_steps(options),
            converged=r_hat_max is not None and r_hat_max < R_HAT_CONVERGED,
            fit_seconds=seconds,
            point_estimate="posterior_mean",
            extras={
                "r_hat_max": r_hat_max,
                "ess_min": ess_min,
                "num_chains": n_chains,
                "num_samples": n_draws,
                "divergences": chains.divergences,
                "accept_prob": chains.accept_prob,
                "compile_seconds": chains.compile_seconds,
                "compiled": chains.compiled,
                **({"compile_error": chains.compile_error} if chains.compile_error else {}),
            },
            tensors={"draws": flat, "posterior": posterior},
        )
