"""Steps recorded once from the Pyro declaration and compiled (the ``compile`` option of map, svi
and mcmc) give the losses of Pyro's eager steps, to 1e-10 at every step: for every model with
the recorded graph, and with TorchInductor's compiled code for the Gaussian mixture's map step on
mini-batches, its svi step (random draws) and NUTS's potential energy."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro.infer import NUTS
from pyro.infer.autoguide import init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad

import ppl_gmm
from ppl_gmm.backends.base import StepInfo
from ppl_gmm.backends.compiled import FLAT, CompiledLeapfrog, FlatSites, FusedNUTS, direct_gradients, record
from ppl_gmm.backends.map import MAP, MAPOptions
from ppl_gmm.backends.mcmc import MCMCBackend, MCMCOptions
from ppl_gmm.backends.pyro_svi import SVIOptions
from ppl_gmm.backends.svi import SVIBackend, SVIBackendOptions
from ppl_gmm.config import parse_config
from ppl_gmm.errors import UserError
from ppl_gmm.experiment import prepare
from ppl_gmm.models.base import LatentModel, Params


def _problem(model: dict[str, Any], n: int = 40, **data: Any) -> tuple[LatentModel, torch.Tensor, Params]:
    """A small synthetic problem of ``model`` (its own simulator), prepared as a run prepares it."""
    raw = {
        "experiment": "compiled",
        "seed": 0,
        "data": {"source": "synthetic", "n": n, "dim": 2, "k": 2, "separation": 4.0, **data},
        "model": {"k": 2, **model},
        "init": {"method": "kmeans++"},
        "backends": {"em": {}},
    }
    plan = prepare(parse_config(raw))
    return plan.model, plan.data.train, plan.inits[0]


def _objectives(
    backend: Any, options: SVIOptions, problem: tuple[LatentModel, torch.Tensor, Params]
) -> tuple[np.ndarray, Any]:
    model, x, init = problem
    pyro.set_rng_seed(0)
    steps: list[StepInfo] = []
    fit = backend.fit(model, x, init, options, steps.append)
    return np.array([step.objective for step in steps]), fit


def _assert_same_losses(eager: np.ndarray, compiled: np.ndarray, steps: int) -> None:
    assert eager.shape == compiled.shape == (steps + 1,)  # the start, then every step
    # every step moves the loss (by far more than the tolerance): not a comparison of one value
    assert np.all(np.abs(np.diff(eager[1:])) > 1e-8)
    np.testing.assert_allclose(compiled, eager, rtol=1e-10, atol=0)


MODELS = {
    "gmm-full": {"name": "gmm", "covariance": "full"},
    "gmm-tied": {"name": "gmm", "covariance": "tied"},
    "gmm-diag": {"name": "gmm", "covariance": "diag"},
    "gmm-spherical": {"name": "gmm", "covariance": "spherical"},
    "poisson_mixture": {"name": "poisson_mixture"},
    "bernoulli_mixture": {"name": "bernoulli_mixture"},
    "student_t_mixture": {"name": "student_t_mixture"},
    "gaussian_hmm": {"name": "gaussian_hmm"},
    "poisson_hmm": {"name": "poisson_hmm"},
    "bernoulli_hmm": {"name": "bernoulli_hmm"},
}
SEQUENCES = {"sequence_length": 4}


def _model_problem(key: str, prior: str) -> tuple[LatentModel, torch.Tensor, Params]:
    data = SEQUENCES if key.endswith("_hmm") else {}
    return _problem({**MODELS[key], "prior": prior}, **data)


# every model without a prior (maximum likelihood); the priors' terms are in the svi cases below
MAP_CASES = [(key, "none") for key in MODELS] + [("gmm-full", "conjugate"), ("gaussian_hmm", "conjugate")]


@pytest.mark.parametrize(("key", "prior"), MAP_CASES)
def test_recorded_map_step_gives_eager_pyros_losses(key: str, prior: str) -> None:
    problem = _model_problem(key, prior)
    steps = 12
    eager, _ = _objectives(MAP(), MAPOptions(steps=steps, tol=0.0, compile=False), problem)
    recorded, fit = _objectives(MAP(), MAPOptions(steps=steps, tol=0.0, compile="record"), problem)
    _assert_same_losses(eager, recorded, steps)
    assert fit.extras["compiled"] == "recorded" and fit.extras["compile_seconds"] > 0


@pytest.mark.parametrize("key", list(MODELS))
def test_recorded_svi_step_gives_eager_pyros_losses(key: str) -> None:
    # Monte Carlo draws every step: the recorded graph draws what eager Pyro draws, in its order
    problem = _model_problem(key, "conjugate")
    steps = 8
    options = {"steps": steps, "tol": 0.0, "mean_samples": 2, "elbo_particles": 2, "lr": 0.02}
    eager, _ = _objectives(SVIBackend(), SVIBackendOptions(**options, compile=False), problem)
    recorded, _ = _objectives(SVIBackend(), SVIBackendOptions(**options, compile="record"), problem)
    _assert_same_losses(eager, recorded, steps)


def test_recorded_steps_with_clipped_adam_mean_field_and_mini_batches() -> None:
    problem = _problem({"name": "gmm", "prior": "conjugate"}, n=80)
    steps = 10
    for options in (
        {"optimizer": "clipped_adam", "lr": 0.5},  # large steps: the clipping acts
        {"local": "mean_field", "batch_size": 30, "guide": "mvn"},
    ):
        common = {"steps": steps, "tol": 0.0, "mean_samples": 2, "elbo_particles": 2, **options}
        eager, _ = _objectives(SVIBackend(), SVIBackendOptions(**common, compile=False), problem)
        recorded, _ = _objectives(SVIBackend(), SVIBackendOptions(**common, compile="record"), problem)
        _assert_same_losses(eager, recorded, steps)


def test_compiled_map_and_svi_in_a_run_match_eager_and_report_compiling_apart(tmp_path) -> None:
    """TorchInductor's code for the map step on mini-batches (a random subsample every step) and the
    svi step (a full-covariance guide's draws), in a run: the same metrics as eager Pyro's, and
    the compiling in summary.json's compile_seconds, not in fit_seconds or the steps' clocks."""
    config = {
        "experiment": "compiled",
        "seed": 3,
        "data": {"source": "synthetic", "n": 120, "dim": 2, "k": 2, "separation": 4.0},
        "model": {"name": "gmm", "k": 2, "prior": "conjugate"},
        "init": {"method": "kmeans++"},
    }
    steps = 15
    backends = {
        "map": {"steps": steps, "tol": 0.0, "batch_size": 50, "eval_every": 5},
        "svi": {
            "steps": steps,
            "tol": 0.0,
            "guide": "mvn",
            "eval_every": 5,
            "mean_samples": 2,
            "elbo_particles": 2,
        },
    }

    def run(compile: bool) -> Any:
        options = {name: {**values, "compile": compile} for name, values in backends.items()}
        return ppl_gmm.run({**config, "backends": options}, runs_dir=tmp_path / str(compile), quiet=True)

    eager, compiled = run(False), run(True)
    for name in backends:
        summary = json.loads((compiled.path / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["compiled"] == "inductor"
        assert summary["compile_seconds"] > 0.5  # recording alone takes longer than that
        assert json.loads((eager.path / name / "summary.json").read_text())["compile_seconds"] is None
        ours, theirs = (pd.read_csv(run.path / name / "metrics.csv") for run in (compiled, eager))
        np.testing.assert_allclose(ours["objective"], theirs["objective"], rtol=1e-10, atol=0)
        np.testing.assert_allclose(ours["log_likelihood"], theirs["log_likelihood"], rtol=1e-10, atol=0)
        # a step takes milliseconds: a clock that included the compiling would start above it
        assert ours["wall_seconds"].iloc[1] < summary["compile_seconds"] / 2
        assert summary["fit_seconds"] < summary["compile_seconds"]


def _nuts_problem() -> tuple[Any, Any, Any, Any, FlatSites, torch.Tensor]:
    model, x, init = _problem({"name": "gmm", "prior": "conjugate"}, n=50)
    strategy = init_to_value(values=model.to_sites(init))
    initial, potential_fn, _, _ = initialize_model(
        model.model, (x,), max_plate_nesting=1, init_strategy=strategy
    )
    flat = FlatSites(initial)
    return model, x, init, potential_fn, flat, flat.join(initial)


def test_compiled_potential_energy_and_draws_equal_eager_nuts() -> None:
    model, x, init, potential_fn, flat, start = _nuts_problem()
    compiled = CompiledLeapfrog(lambda z: potential_fn(flat.split(z)), start)
    assert compiled.how == "inductor"
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):  # points away from the start the graph was recorded at
        z = start + 0.3 * torch.randn(start.shape, generator=generator, dtype=start.dtype)
        grads, energy = potential_grad(potential_fn, flat.split(z.clone()))
        ours, our_energy = potential_grad(compiled, {FLAT: z.clone()})
        assert float(our_energy) == pytest.approx(float(energy), rel=1e-10)
        np.testing.assert_allclose(ours[FLAT], flat.join(grads), rtol=1e-9, atol=1e-9)

    def draws(compile: bool) -> dict[str, torch.Tensor]:
        pyro.set_rng_seed(5)
        options = MCMCOptions(num_samples=15, warmup_steps=15, compile=compile)
        return MCMCBackend().fit(model, x, init, options, lambda step: None).tensors["draws"]

    eager, ours = draws(False), draws(True)
    for name in eager:  # the same draws: the same energies and gradients, the same random numbers
        assert eager[name].std(0).max() > 0  # the chain moved
        np.testing.assert_allclose(ours[name], eager[name], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("direction", [1, -1])
def test_fused_base_tree_equals_pyros(direction: int) -> None:
    """One call of the recorded leapfrog graph gives what Pyro's ``NUTS._build_basetree`` computes
    (velocity Verlet, energies, weight, divergence, acceptance), with an adapted-looking diagonal
    mass matrix and a step large enough to change the energy."""
    _, _, _, potential_fn, flat, start = _nuts_problem()

    def potential(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return potential_fn(flat.split(params[FLAT]))

    leapfrog = CompiledLeapfrog(lambda z: potential_fn(flat.split(z)), start, "record")
    generator = torch.Generator().manual_seed(direction + 3)
    inverse_mass = 0.5 + torch.rand(start.shape, generator=generator, dtype=start.dtype)
    trees = []
    for kernel in (NUTS(potential_fn=potential), FusedNUTS(potential_fn=leapfrog)):
        kernel.initial_params = {FLAT: start}
        pyro.set_rng_seed(0)
        kernel.setup(10)
        kernel._adapter.step_size = 0.15
        kernel.mass_matrix_adapter.inverse_mass_matrix = {(FLAT,): inverse_mass}
        r = {FLAT: torch.randn(start.shape, generator=torch.Generator().manual_seed(1), dtype=start.dtype)}
        grads, energy = potential_grad(potential, {FLAT: start.clone()})
        unscaled = kernel.mass_matrix_adapter.unscale(r)
        energy_current = kernel._kinetic_energy(unscaled) + energy
        with direct_gradients():
            trees.append(
                kernel._build_basetree({FLAT: start}, r, grads, -energy_current, direction, energy_current)
            )
    pyros, ours = trees
    assert abs(float(pyros.weight)) > 1e-3  # the weight is the energy's change: the step changed it
    for field, a, b in zip(pyros._fields, pyros, ours, strict=True):
        if isinstance(a, dict):
            ((a,), (b,)) = (a.values(), b.values())
        if isinstance(a, torch.Tensor):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12, err_msg=field)
        else:
            assert a == b, field


def test_constants_are_folded_and_draws_are_not() -> None:
    """What the graph computes from constants alone is computed once, when it is recorded; the
    draws stay in the graph."""
    matrix = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)

    def fn(v: torch.Tensor) -> torch.Tensor:
        return v * torch.linalg.cholesky(matrix).sum() + torch.randn(2, dtype=torch.float64)

    graph = record(fn, [torch.ones(2, dtype=torch.float64)])
    targets = {str(node.target) for node in graph.graph.nodes}
    assert not any("cholesky" in target for target in targets)
    v = torch.tensor([1.0, -2.0], dtype=torch.float64)
    torch.manual_seed(3)
    ours, again = graph(v), graph(v)
    torch.manual_seed(3)
    expected = fn(v)
    torch.testing.assert_close(ours, expected, rtol=1e-15, atol=0)
    assert not torch.equal(ours, again)


def test_recorded_potential_of_a_hidden_markov_model_gives_eager_nuts_draws() -> None:
    """The recorded graph (compile: record, what auto runs for a hidden Markov model's large
    graph), one block a time step, under NUTS: the draws of eager NUTS."""
    model, x, init = _model_problem("poisson_hmm", "conjugate")

    def draws(compile: bool | str) -> Any:
        pyro.set_rng_seed(2)
        options = MCMCOptions(num_samples=6, warmup_steps=6, compile=compile)
        return MCMCBackend().fit(model, x, init, options, lambda step: None)

    eager, ours = draws(False), draws("record")
    assert ours.extras["compiled"] == "recorded" and eager.extras["compiled"] is None
    for name, value in eager.tensors["draws"].items():
        assert value.std(0).max() > 0  # the chain moved
        np.testing.assert_allclose(ours.tensors["draws"][name], value, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", ["map", "svi", "mcmc"])
@pytest.mark.parametrize("compile", [True, "record"])
def test_pyros_jit_and_compile_together_are_one_error_line(backend: str, compile: bool | str) -> None:
    jit = "jit_compile" if backend == "mcmc" else "jit"
    raw = {
        "experiment": "both",
        "data": {"source": "synthetic", "n": 40, "dim": 2, "k": 2},
        "model": {"name": "gmm", "k": 2, "prior": "conjugate"},
        "backends": {backend: {jit: True, "compile": compile}},
    }
    with pytest.raises(
        UserError, match=rf"^backends\.{backend}: .*{jit} \(Pyro's JIT\) and compile"
    ) as error:
        prepare(parse_config(raw))
    assert "\n" not in str(error.value)
    prepare(parse_config({**raw, "backends": {backend: {jit: True}}}))  # Pyro's JIT alone is fine


@pytest.mark.parametrize("backend", ["map", "svi", "mcmc"])
@pytest.mark.parametrize("value", ["fast", 2])
def test_a_bad_compile_value_is_one_error_line_naming_the_choices(backend: str, value: object) -> None:
    raw = {
        "experiment": "bad",
        "data": {"source": "synthetic", "n": 40, "dim": 2, "k": 2},
        "model": {"name": "gmm", "k": 2, "prior": "conjugate"},
        "backends": {backend: {"compile": value}},
    }
    with pytest.raises(
        UserError, match=rf"^backends\.{backend}\.compile: expected auto, true, record or false"
    ):
        prepare(parse_config(raw))
