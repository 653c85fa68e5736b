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
from pyro.infer.autoguide import init_to_value
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad

import ppl_gmm
from ppl_gmm.backends.base import StepInfo
from ppl_gmm.backends.compiled import CompiledPotential
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


def test_compiled_potential_energy_and_draws_equal_eager_nuts() -> None:
    model, x, init = _problem({"name": "gmm", "prior": "conjugate"}, n=50)
    strategy = init_to_value(values=model.to_sites(init))
    initial, potential_fn, _, _ = initialize_model(
        model.model, (x,), max_plate_nesting=1, init_strategy=strategy
    )
    compiled = CompiledPotential(potential_fn, initial)
    assert compiled.how == "inductor"
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):  # points away from the start the graph was recorded at
        z = {
            name: value + 0.3 * torch.randn(value.shape, generator=generator)
            for name, value in initial.items()
        }
        grads, energy = potential_grad(potential_fn, {k: v.clone() for k, v in z.items()})
        ours, our_energy = potential_grad(compiled, {k: v.clone() for k, v in z.items()})
        assert float(our_energy) == pytest.approx(float(energy), rel=1e-10)
        for name in grads:
            np.testing.assert_allclose(ours[name], grads[name], rtol=1e-9, atol=1e-9)

    def draws(compile: bool) -> dict[str, torch.Tensor]:
        pyro.set_rng_seed(5)
        options = MCMCOptions(num_samples=15, warmup_steps=15, compile=compile)
        return MCMCBackend().fit(model, x, init, options, lambda step: None).tensors["draws"]

    eager, ours = draws(False), draws(True)
    for name in eager:  # the same draws: the same energies and gradients, the same random numbers
        np.testing.assert_allclose(ours[name], eager[name], rtol=1e-8, atol=1e-8)


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
