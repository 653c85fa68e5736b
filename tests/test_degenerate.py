"""Degenerate data through the whole `ppl-gmm run` pipeline, for every registered backend: each one
either completes or is recorded as failed with a one-line message that names a fix, and no saved
file of the run holds a NaN or an infinity."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ppl_gmm.backends import BACKENDS
from ppl_gmm.cli import main
from ppl_gmm.errors import UserError
from ppl_gmm.models.gmm import GaussianMixture

# a few steps of each backend; mcmc's tree depth bounds its time on badly scaled data
QUICK: dict[str, dict[str, object]] = {
    "em": {"max_iter": 30},
    "map": {"steps": 5},
    "svi": {"steps": 5, "mean_samples": 5, "elbo_particles": 2},
    "vb": {"max_iter": 10, "posterior_samples": 5},
    "mcmc": {"num_samples": 4, "warmup_steps": 4, "max_tree_depth": 4},
    "online_em": {"epochs": 2},
    "incremental_em": {"blocks": 3, "max_epochs": 3},
}
# what a failed backend's message may name as the fix
FIXES = ("reg_covar", "standardize", "model.k", ".lr", "dtype", "batch_size")


def _blobs(rng: np.random.Generator, per: int = 40) -> np.ndarray:
    """Three unit clusters in 2-D."""
    return np.concatenate([rng.normal(c, 1.0, (per, 2)) for c in ([0.0, 0.0], [6.0, 6.0], [0.0, 6.0])])


def _duplicates(rng: np.random.Generator) -> np.ndarray:
    """Most points are exact copies of two points."""
    return np.concatenate([_blobs(rng, 15), np.repeat([[1.0, 2.0]], 60, 0), np.repeat([[6.0, 6.0]], 30, 0)])


def _constant_column(rng: np.random.Generator) -> np.ndarray:
    x = _blobs(rng)
    return np.c_[x, np.full(len(x), 5.0)]


def _tiny_clusters(rng: np.random.Generator) -> np.ndarray:
    """Two clusters, a lone point far away and a pair of points far the other way."""
    lone, pair = [[30.0, -30.0]], [[-40.0, 40.0], [-40.01, 40.0]]
    return np.concatenate([_blobs(rng)[:80], lone, pair])


def _scales(rng: np.random.Generator) -> np.ndarray:
    """One feature in millionths, the other in millions."""
    return _blobs(rng) * [1e-6, 1e6]


def _nearly_collinear(rng: np.random.Generator) -> np.ndarray:
    """Two features equal up to 1e-3: fine in float64, near the limit of float32's digits."""
    x = _blobs(rng)
    return np.c_[x[:, 0], x[:, 0] + 1e-3 * rng.normal(size=len(x)), x[:, 1]]


# the default conjugate prior scales by the data's covariance, which a constant feature makes
# singular, and nearly collinear ones singular in float32 (both refused up front, see the tests at
# the end), so those runs name their own
OWN_PRIOR = {"model": {"hyperparameters": {"covariance_prior": 1.0}}}
# name → (data, k, extra config)
DATASETS: dict[str, tuple[Callable[[np.random.Generator], np.ndarray], int, dict[str, object]]] = {
    "duplicates": (_duplicates, 3, {}),
    "constant-column": (_constant_column, 3, OWN_PRIOR),
    "tiny-clusters": (_tiny_clusters, 4, {}),
    "scales-1e-6-1e6": (_scales, 3, {}),
    "float32-collinear": (_nearly_collinear, 3, {"dtype": "float32", **OWN_PRIOR}),
}


def _needs_prior(name: str) -> bool:
    backend = BACKENDS.get(name)()
    model = GaussianMixture(3, 2, "full", None)
    try:
        backend.check(model, backend.options.model_validate(QUICK[name]))
    except UserError:
        return True
    return False


def test_every_backend_has_quick_options() -> None:
    assert set(QUICK) == set(BACKENDS.names())


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _finite_cells(path: Path) -> None:
    """Every cell of a CSV that reads as a number is finite (empty cells are missing values)."""
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            for cell in row:
                try:
                    value = float(cell)
                except ValueError:
                    continue
                assert math.isfinite(value), (path.name, row)


def _reject_constant(name: str) -> None:
    raise AssertionError(f"non-finite number {name} in JSON")


def _check_run(experiment: Path, backends: list[str]) -> list[dict]:
    """The no-NaN contract on every file of the run; returns the summaries."""
    for path in experiment.rglob("*"):
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
        elif path.suffix == ".csv":
            _finite_cells(path)  # pandas writes NaN as an empty cell: metrics need every objective
            if path.name == "metrics.csv":
                with path.open(newline="", encoding="utf-8") as handle:
                    assert all(row["objective"] for row in csv.DictReader(handle)), path
        elif path.suffix == ".safetensors":
            for key, value in load_file(str(path)).items():
                assert torch.isfinite(value).all(), (path.relative_to(experiment), key)
    summaries = []
    for name in backends:
        summary = json.loads((experiment / name / "summary.json").read_text(encoding="utf-8"))
        assert summary["status"] in ("completed", "failed"), summary
        if summary["status"] == "completed":
            assert summary["error"] is None
            assert isinstance(summary["train_log_likelihood"], float)
            assert (experiment / name / "params.safetensors").is_file()
        else:
            error = summary["error"]
            assert isinstance(error, str) and "\n" not in error, error
            assert any(fix in error for fix in FIXES), (name, error)
            assert not (experiment / name / "params.safetensors").exists()
        summaries.append(summary)
    return summaries


# maximum likelihood (the backends that can do it) with full covariances, the most fragile;
# the conjugate prior (every backend) with each covariance type
SETTINGS = [("none", "full")] + [
    ("conjugate", covariance) for covariance in ("full", "diag", "tied", "spherical")
]


@pytest.mark.parametrize(("prior", "covariance"), SETTINGS, ids=[f"{p}-{c}" for p, c in SETTINGS])
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_degenerate_data_never_give_nan(
    dataset: str, prior: str, covariance: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, k, extra = DATASETS[dataset]
    x = make(np.random.default_rng(0))
    data = tmp_path / f"{dataset}.csv"
    np.savetxt(data, x, delimiter=",", header=",".join(f"x{j}" for j in range(x.shape[1])), comments="")
    backends = [name for name in BACKENDS.names() if prior == "conjugate" or not _needs_prior(name)]
    config = _merge(
        {
            "experiment": dataset,
            "data": {"source": "csv", "path": str(data), "standardize": False},
            "model": {"k": k, "covariance": covariance, "prior": prior},
            "backends": {name: QUICK[name] for name in backends},
        },
        extra if prior == "conjugate" else {key: value for key, value in extra.items() if key != "model"},
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    rc = main(["run", str(tmp_path / "config.yaml"), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert rc in (0, 1), err
    summaries = _check_run(Path(out.splitlines()[-1]), backends)
    assert rc == (1 if any(s["status"] == "failed" for s in summaries) else 0)


def test_em_completes_on_every_degenerate_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """EM, the reference, copes in float64: re-seeding keeps every component fitted."""
    for dataset, (make, k, _) in DATASETS.items():
        if dataset.startswith("float32"):
            continue
        x = make(np.random.default_rng(1))
        data = tmp_path / f"{dataset}.csv"
        np.savetxt(data, x, delimiter=",", header=",".join(f"x{j}" for j in range(x.shape[1])), comments="")
        rc = main(
            [
                "run",
                str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"),
                "data.source=csv",
                f"data.path={data}",
                f"model.k={k}",
                "--runs-dir",
                str(tmp_path / "runs"),
                "--quiet",
            ]
        )
        out, err = capsys.readouterr()
        assert rc == 0, (dataset, err)
        (summary,) = _check_run(Path(out.splitlines()[-1]), ["em"])
        assert summary["status"] == "completed" and summary["reseeds"] == len(summary["reseed_steps"])


# ---- refused before anything is fitted ---------------------------------------------------------


def _refused(tmp_path: Path, x: np.ndarray, overrides: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    data = tmp_path / "data.csv"
    np.savetxt(data, x, delimiter=",", header=",".join(f"x{j}" for j in range(x.shape[1])), comments="")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"backends": {"vb": QUICK["vb"]}}), encoding="utf-8")
    argv = ["run", str(config), "data.source=csv", f"data.path={data}", "model.prior=conjugate", *overrides]
    rc = main([*argv, "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err, (rc, err)
    assert not (tmp_path / "runs").exists()
    (line,) = err.splitlines()
    assert line.startswith("error: ")
    return line


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_a_singular_default_prior_is_refused(
    covariance: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = _constant_column(np.random.default_rng(0))
    line = _refused(tmp_path, x, [f"model.covariance={covariance}"], capsys)
    assert line.startswith("error: model.hyperparameters.covariance_prior: ") and "constant" in line, line


def test_a_prior_singular_only_in_float32_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """1 - 1e-9 rounds to exactly 1 in float32, so this positive-definite scale becomes singular
    there, whatever the CPU's kernels. (Nearly collinear data are no test of this: whether their
    covariance stays positive definite in float32 depends on how a CPU's kernels round, and on
    some it does.)"""
    rng = np.random.default_rng(0)
    x = np.c_[_blobs(rng), rng.normal(size=120)]
    scale = [[1.0, 1.0 - 1e-9, 0.0], [1.0 - 1e-9, 1.0, 0.0], [0.0, 0.0, 1.0]]
    line = _refused(tmp_path, x, ["dtype=float32", f"model.hyperparameters.covariance_prior={scale}"], capsys)
    assert line.startswith("error: dtype: ") and "float64" in line, line


def test_a_diverging_optimizer_fails_only_its_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MAP with a huge learning rate breaks down within a few steps: it is recorded as failed at
    that step, with the fix, while EM before it and VB after it complete and are saved."""
    config = {
        "experiment": "diverging",
        "data": {"n": 200},
        "model": {"prior": "conjugate"},
        "backends": {"em": QUICK["em"], "map": {"steps": 20, "lr": 1e3}, "vb": QUICK["vb"]},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    rc = main(["run", str(tmp_path / "config.yaml"), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err
    em, map_, vb = _check_run(Path(out.splitlines()[-1]), ["em", "map", "vb"])
    assert em["status"] == vb["status"] == "completed"
    assert map_["status"] == "failed"
    assert map_["error"].startswith("step ") and "backends.map.lr" in map_["error"], map_["error"]
