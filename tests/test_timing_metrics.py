"""What the comparison's timing fields mean: each backend timed on its own target (log-likelihood,
log posterior or ELBO), the shared start counting for nobody; fit seconds of the kept restart;
SVI's stopping rule, its warning's advice and its kept guide; run-directory permissions; null
backends; too many components; online EM's progress total."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal, init_to_value
from safetensors.torch import load_file
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from ppl_gmm.backends import BACKENDS, StepInfo
from ppl_gmm.backends.pyro_svi import Plateau
from ppl_gmm.config import load_config, parse_config
from ppl_gmm.errors import UserError
from ppl_gmm.experiment import _convergence_fix, prepare, run
from ppl_gmm.models.base import LatentModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Recorder:
    """A ``Progress`` that keeps what it is told."""

    def __init__(self) -> None:
        self.totals: dict[str, int | None] = {}
        self.messages: list[str] = []

    def begin(self, backend: str, restart: int, total: int | None) -> None:
        self.totals[backend] = total

    def step(self, info: StepInfo) -> None:
        pass

    def end(self) -> None:
        pass

    def message(self, text: str) -> None:
        self.messages.append(text)


def _summary(path: Path, backend: str) -> dict[str, Any]:
    return json.loads((path / backend / "summary.json").read_text())


def _train_log_likelihood(x: np.ndarray, params: dict[str, torch.Tensor]) -> float:
    """Mean log Σ_k π_k N(x_n | μ_k, Σ_k) by SciPy."""
    weights, means, covariances = (params[name].numpy() for name in ("weights", "means", "covariances"))
    parts = [
        np.log(w) + multivariate_normal(m, c).logpdf(x)
        for w, m, c in zip(weights, means, covariances, strict=True)
    ]
    return float(logsumexp(np.stack(parts), axis=0).mean())


def test_iris_start_beats_every_fit_yet_no_backend_arrives_at_zero_seconds(tmp_path) -> None:
    overrides = [
        "init.n_init=1",
        "backends.map.steps=60",
        "backends.map.eval_every=20",
        "backends.svi.steps=60",
        "backends.svi.eval_every=20",
        "backends.svi.mean_samples=20",
        "backends.svi.elbo_particles=5",
    ]
    cfg = load_config(CONFIGS / "iris.yaml", overrides)
    path = run(cfg, tmp_path).path
    names = ["em", "map", "svi"]
    summaries = {name: _summary(path, name) for name in names}
    metrics = {name: pd.read_csv(path / name / "metrics.csv") for name in names}
    # the iris case: with the conjugate prior the shared start has a higher train log-likelihood
    # than any fit, which made every backend "arrive" at 0 s when timed on the log-likelihood
    start = float(metrics["em"].loc[metrics["em"]["step"] == 0, "log_likelihood"].iloc[0])
    assert all(start > s["train_log_likelihood"] for s in summaries.values())

    assert {name: s["target"] for name, s in summaries.items()} == {
        "em": "log_posterior",
        "map": "log_posterior",
        "svi": "elbo",
    }
    # the final log posterior per point, from SciPy's densities and the declaration's prior
    x = load_file(path / "sample.safetensors")["x"].numpy()
    model = prepare(cfg).model
    for name in ("em", "map"):
        params = load_file(path / name / "params.safetensors")
        log_prior = float(LatentModel.log_prior(model, params))
        expected = _train_log_likelihood(x, params) + log_prior / x.shape[0]
        assert summaries[name]["target_value"] == pytest.approx(expected, abs=1e-9)
    # EM's own objective is that target: its last step reports the final value
    assert metrics["em"]["objective"].iloc[-1] == pytest.approx(summaries["em"]["target_value"], abs=1e-10)
    assert summaries["svi"]["target_value"] == summaries["svi"]["elbo"]

    # what each reached after the start: EM's objective every step, MAP's exact (full-batch) loss,
    # which Pyro reports before each step's update (so row s holds step s - 1's estimate), and
    # every backend's final value; SVI's per-step ELBO is a one-draw estimate and does not count
    em, map_ = metrics["em"], metrics["map"]
    reached = {
        "em": [*em.loc[em["step"] > 0, "objective"], summaries["em"]["target_value"]],
        "map": [*map_["objective"].iloc[2:], summaries["map"]["target_value"]],
        "svi": [summaries["svi"]["target_value"]],
    }
    best_posterior = max(max(reached["em"]), max(reached["map"]))
    assert summaries["em"]["best_target"] == pytest.approx(best_posterior, abs=1e-12)
    assert summaries["map"]["best_target"] == pytest.approx(best_posterior, abs=1e-12)
    assert summaries["svi"]["best_target"] == pytest.approx(summaries["svi"]["elbo"], abs=1e-12)
    assert summaries["em"]["best_log_likelihood"] < start  # step 0 counts for nobody there either

    for name, summary in summaries.items():
        steps = metrics[name]
        for key in ("seconds_to_within_1e-3", "seconds_to_within_1e-4"):
            seconds = summary[key]
            if seconds is not None:
                assert seconds > 0, (name, key)
                assert seconds in set(steps.loc[steps["step"] > 0, "wall_seconds"]), (name, key)
    # whichever backend reached the best got there at a step after the start
    assert summaries["em"]["seconds_to_within_1e-4"] is not None
    assert summaries["svi"]["seconds_to_within_1e-4"] == metrics["svi"]["wall_seconds"].iloc[-1]


def test_fit_seconds_is_the_kept_restarts_and_all_restarts_sit_beside_it(tmp_path) -> None:
    raw = {"data": {"n": 300}, "init": {"n_init": 2}, "backends": {"em": {"max_iter": 30}}}
    path = run(parse_config(raw), tmp_path).path
    summary = _summary(path, "em")
    metrics = pd.read_csv(path / "em" / "metrics.csv")
    last = metrics.groupby("restart").last()
    kept = last.loc[summary["restart"]]
    assert summary["n_steps"] == kept["step"]
    # each restart's clock starts at 0; its last step comes just before its fit ends
    assert kept["wall_seconds"] <= summary["fit_seconds"] < summary["fit_seconds_all_restarts"]
    assert summary["fit_seconds_all_restarts"] >= last["wall_seconds"].sum()
    assert (
        summary["fit_seconds_all_restarts"] - summary["fit_seconds"]
        >= last["wall_seconds"].drop(summary["restart"]).sum()
    )

    one = run(parse_config({**raw, "init": {"n_init": 1}}), tmp_path / "one").path
    single = _summary(one, "em")
    assert single["fit_seconds_all_restarts"] == single["fit_seconds"]


def test_plateau_stops_on_a_noisy_plateau_and_not_on_a_noisy_climb() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0.0, 0.05, 2000)  # the spread of SVI's per-point ELBO on small data
    flat = Plateau(tol=1e-4, patience=1, window=100)
    stopped = next((t for t, v in enumerate(-3.0 + noise, 1) if flat.update(v)), None)
    assert stopped is not None and stopped <= 600
    climbing = Plateau(tol=1e-4, patience=1, window=100)
    trend = -3.0 + 5e-4 * np.arange(2000)  # 0.05 per window: as large as one step's noise
    assert not any(climbing.update(v) for v in trend + noise)
    # a deterministic loss (MAP): every step compared with the one before
    steady = Plateau(tol=1e-6, patience=3, window=None)
    assert [steady.update(v) for v in (10.0, 5.0, 5.0, 5.0, 5.0)] == [False, False, False, False, True]


def test_every_convergence_warning_names_fields_the_backend_has(tmp_path) -> None:
    for name in BACKENDS:
        backend = BACKENDS.get(name)()
        advice = _convergence_fix(name, backend)
        fields = re.findall(rf"backends\.{name}\.(\w+)", advice)
        assert fields, (name, advice)
        assert set(fields) <= set(backend.options.model_fields), (name, advice)
    progress = Recorder()
    raw = {"data": {"n": 100}, "model": {"prior": "conjugate"}, "backends": {"svi": {"steps": 3}}}
    run(parse_config(raw), tmp_path, progress)
    (warning,) = [m for m in progress.messages if "did not converge" in m]
    assert "backends.svi.steps" in warning and "max_iter" not in warning
    parse_config(raw, ["backends.svi.steps=5000", "backends.svi.tol=1e-3"])  # the advice is valid


def test_svi_keeps_its_guide_and_a_fresh_guide_loaded_from_it_gives_the_same_posterior(tmp_path) -> None:
    options = {"steps": 40, "point_estimate": "posterior_median", "mean_samples": 200, "elbo_particles": 2}
    cfg = parse_config({"data": {"n": 200}, "model": {"prior": "conjugate"}, "backends": {"svi": options}})
    path = run(cfg, tmp_path).path
    kept = load_file(path / "svi" / "guide.safetensors")
    assert kept and all(value.dtype == torch.float64 for value in kept.values())

    plan = prepare(cfg)
    model, x = plan.model, plan.data.train
    pyro.clear_param_store()
    sites = model.to_sites(plan.inits[0])
    guide = AutoNormal(
        poutine.block(model.model, expose=list(sites)), init_loc_fn=init_to_value(values=sites)
    )
    guide(x)  # registers the guide's parameters and their constraints
    store = pyro.get_param_store()
    assert set(store.keys()) == set(kept)
    for name, value in kept.items():
        store[name] = value
    guide(x)  # a guide reads the param store when run: now it holds the fitted values
    # the point estimate svi reported is the guide's median: exactly reproduced
    fitted = load_file(path / "svi" / "params.safetensors")
    with torch.no_grad():
        median = model.from_sites(guide.median(x))
        for name, value in fitted.items():
            torch.testing.assert_close(median[name], value, rtol=1e-9, atol=1e-9)
        # and its posterior means (over svi's 200 draws), within their Monte Carlo error
        draws = [model.from_sites(guide(x)) for _ in range(2000)]
    posterior = load_file(path / "svi" / "posterior.safetensors")
    means = torch.stack([d["means"] for d in draws]).mean(0)
    error = 5 * posterior["means.std"] / math.sqrt(options["mean_samples"]) + 1e-9
    assert ((means - posterior["means.mean"]).abs() <= error).all()


def test_run_files_get_the_permissions_of_ordinary_files(tmp_path) -> None:
    raw = {"data": {"n": 100}, "backends": {"em": {"max_iter": 2}}}
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        before = os.umask(umask)
        try:
            path = run(parse_config(raw), tmp_path / oct(umask)).path
        finally:
            os.umask(before)
        files = [p for p in path.rglob("*") if p.is_file()]
        assert len(files) >= 7
        assert {p.stat().st_mode & 0o777 for p in files} == {mode}, umask


def test_a_null_backend_is_dropped_and_none_left_is_an_error() -> None:
    cfg = parse_config({"backends": {"em": {}, "svi": {"steps": 5}}}, ["backends.svi=null"])
    assert list(cfg.backends) == ["em"]
    with pytest.raises(UserError, match=r"^backends: .*null"):
        parse_config({"backends": {"em": None}})


def test_more_components_than_the_data_support_warn_naming_model_k(tmp_path) -> None:
    progress = Recorder()
    raw = {"data": {"n": 10, "test_fraction": 0.2}, "model": {"k": 8}, "backends": {"em": {"max_iter": 20}}}
    path = run(parse_config(raw), tmp_path, progress).path
    assert _summary(path, "em")["status"] == "completed"
    assert any("model.k" in m and m.startswith("warning: em") for m in progress.messages), progress.messages
    fine = Recorder()
    run(parse_config({**raw, "data": {"n": 300}, "model": {"k": 3}}), tmp_path, fine)
    assert not any("model.k" in m for m in fine.messages), fine.messages


def test_online_em_progress_knows_its_total(tmp_path) -> None:
    progress = Recorder()
    raw = {
        "data": {"n": 1000, "test_fraction": 0.2},
        "backends": {"online_em": {"batch_size": 300, "epochs": 2}},
    }
    path = run(parse_config(raw), tmp_path, progress).path
    assert progress.totals["online_em"] == 2 * 3 == _summary(path, "online_em")["n_steps"]
