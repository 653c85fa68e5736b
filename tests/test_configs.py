"""Every shipped config in configs/ runs end to end (shortened) and writes SPEC.md's layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ppl_gmm.backends import BACKENDS
from ppl_gmm.cli import main
from ppl_gmm.config import Config, load_config
from ppl_gmm.models import MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

# iteration options shortened to a few steps, whichever a backend has
SHORTEN = {"max_iter": 3, "steps": 3, "num_samples": 2, "warmup_steps": 2}

SUMMARY_FIELDS = [
    "backend",
    "model",
    "status",
    "error",
    "n_steps",
    "converged",
    "fit_seconds",
    "train_log_likelihood",
    "test_log_likelihood",
    "point_estimate",
    "elbo",
    "bic",
    "aic",
    "n_params",
    "ari",
    "nmi",
    "seed",
    "device",
    "dtype",
    "versions",
]
METRICS_COLUMNS = ["step", "wall_seconds", "objective", "log_likelihood"]
POINT_ESTIMATES = {"mle", "map", "posterior_mean", "posterior_median"}


def _shortening(config: Path) -> tuple[Config, list[str]]:
    """The config as written, and KEY=VALUE overrides that cut every backend to a few steps."""
    cfg = load_config(config)
    overrides = []
    for name, section in cfg.backends.items():
        known = set(section) | set(BACKENDS.get(name).options.model_fields)
        overrides += [f"backends.{name}.{key}={value}" for key, value in SHORTEN.items() if key in known]
    return cfg, overrides


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_the_spec_configs_exist() -> None:
    assert {"quickstart.yaml", "compare.yaml"} <= {path.name for path in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_runs_end_to_end(
    config: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    original, overrides = _shortening(config)
    assert overrides, f"no iteration option to shorten in {config.name}"
    monkeypatch.chdir(config.parent.parent)  # relative data paths in configs resolve from the root
    runs = tmp_path / "runs"
    rc = main(["run", str(config), "--runs-dir", str(runs), "--quiet", *overrides])
    out, err = capsys.readouterr()
    assert rc == 0, err
    # --quiet: no progress; warnings (a shortened run does not converge) are still shown
    assert all(line.startswith("warning:") for line in err.splitlines()), err
    path = Path(out.splitlines()[-1])
    assert path.is_dir() and path.parent == runs
    assert path.name.startswith(f"{original.experiment}-")

    for name in ["config.yaml", "data.json", "init.safetensors", "comparison.csv"]:
        assert (path / name).is_file(), name

    # the resolved config: loads back, every default filled in, overrides applied
    resolved = load_config(path / "config.yaml")
    written = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    assert written == resolved.model_dump(mode="json")
    assert list(resolved.backends) == list(original.backends)
    for name, options in resolved.backends.items():
        assert set(options) == set(BACKENDS.get(name).options.model_fields), name
        for key, value in original.backends[name].items():
            if key not in SHORTEN:
                assert options[key] == value, (name, key)
    for item in overrides:
        key, _, value = item.partition("=")
        _, name, option = key.split(".")
        assert resolved.backends[name][option] == int(value)
    # init.reg_covar, unset, takes the model's default (the gmm's 1e-6; other models have none)
    unchanged = {"backends": True, "init": {"reg_covar"}}
    assert resolved.model_dump(exclude=unchanged) == original.model_dump(exclude=unchanged)
    default = MODELS.get(original.model.name).backend_fields.get("reg_covar")
    assert resolved.init.reg_covar == (original.init.reg_covar or default)

    described = json.loads((path / "data.json").read_text(encoding="utf-8"))
    for key in ["source", "n_train", "n_test", "dim", "has_labels", "sha256"]:
        assert key in described, key
    assert described["source"] == original.data.source
    d = described["dim"]

    model = MODELS.get(original.model.name).from_config(original.model, torch.rand(50, d).round())
    shapes = model.param_shapes()
    init = load_file(str(path / "init.safetensors"))
    first = {name: tuple(value.shape) for name, value in init.items() if not name.startswith("restart")}
    assert first == shapes

    comparison = pd.read_csv(path / "comparison.csv")
    assert list(comparison["backend"]) == list(original.backends)
    assert set(SUMMARY_FIELDS) - {"versions"} <= set(comparison.columns)

    for name in original.backends:
        out_dir = path / name
        for file in ["summary.json", "metrics.csv", "params.safetensors"]:
            assert (out_dir / file).is_file(), f"{name}/{file}"

        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
        missing = [field for field in SUMMARY_FIELDS if field not in summary]
        assert not missing, (name, missing)
        assert summary["backend"] == name
        assert summary["model"] == original.model.name
        assert summary["status"] == "completed", summary["error"]
        assert summary["error"] is None
        assert isinstance(summary["n_steps"], int) and summary["n_steps"] >= 1
        assert isinstance(summary["converged"], bool)
        assert _is_number(summary["fit_seconds"]) and summary["fit_seconds"] >= 0
        assert _is_number(summary["train_log_likelihood"])
        if described["n_test"] > 0:
            assert _is_number(summary["test_log_likelihood"])
        else:
            assert summary["test_log_likelihood"] is None
        assert summary["point_estimate"] in POINT_ESTIMATES
        assert summary["elbo"] is None or _is_number(summary["elbo"])
        assert _is_number(summary["bic"]) and _is_number(summary["aic"])
        assert isinstance(summary["n_params"], int) and summary["n_params"] > 0
        for key in ["ari", "nmi"]:
            if described["has_labels"]:
                assert _is_number(summary[key]), key
            else:
                assert summary[key] is None, key
        assert summary["seed"] == original.seed
        assert isinstance(summary["device"], str) and summary["device"]
        assert summary["dtype"] == original.dtype
        for package in ["python", "torch", "pyro"]:
            assert isinstance(summary["versions"].get(package), str), package

        metrics = pd.read_csv(out_dir / "metrics.csv")
        assert set(METRICS_COLUMNS) <= set(metrics.columns), list(metrics.columns)
        assert len(metrics) >= 1
        assert metrics["objective"].notna().all()
        assert metrics["log_likelihood"].notna().any()

        params = load_file(str(out_dir / "params.safetensors"))
        for key, shape in shapes.items():
            assert key in params, key
            assert params[key].dtype == torch.float64, key
            assert tuple(params[key].shape) == shape, key
            assert torch.isfinite(params[key]).all(), key
        for simplex in ("weights", "start"):  # a mixture's weights, an HMM's start probabilities
            if simplex in params:
                assert torch.isclose(params[simplex].sum(), torch.tensor(1.0, dtype=torch.float64))
        if "transitions" in params:
            assert torch.allclose(params["transitions"].sum(1), torch.ones((), dtype=torch.float64))
        checked = model.check_params(params, "params")  # on the model's parameter space already
        for key, value in params.items():
            torch.testing.assert_close(checked[key], value, rtol=1e-9, atol=1e-12)
        if "covariances" in params:
            assert (torch.linalg.eigvalsh(params["covariances"]) > 0).all()
