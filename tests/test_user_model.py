"""A mixture declared only in Pyro, in its own package (``examples/von_mises_mixture``): installed
with pip, found through the ``ppl_gmm.models`` entry point and fitted from a config by em (ECM:
weights and directions in closed form, concentrations by gradient), map, svi and mcmc, checked
against the simulated truth and against an EM for von Mises mixtures written here in SciPy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file
from scipy import optimize, special, stats

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "von_mises_mixture"
BACKENDS = ("em", "map", "svi", "mcmc", "online_em", "incremental_em")
# the priors of prior: conjugate, as the example documents them
LOC_PRIOR, CONC_SHAPE, CONC_RATE = 0.1, 2.0, 0.1


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed by pip into a folder of its own (put on PYTHONPATH)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(EXAMPLE)],
        check=True,
        capture_output=True,
    )
    return target


def _run(installed: Path, config: Path, overrides: list[str], runs: Path) -> Path:
    """``ppl-gmm run CONFIG`` with the package on PYTHONPATH; the experiment directory."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    command = [sys.executable, "-m", "ppl_gmm", "run", str(config), *overrides, "--runs-dir", str(runs)]
    done = subprocess.run([*command, "--quiet"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def _circular(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| on the circle, in [0, π]."""
    return np.abs(np.angle(np.exp(1j * (a - b))))


def _on_circle(params: dict[str, np.ndarray]) -> np.ndarray:
    """(cos μ, sin μ) of each component's directions: (K, 2D)."""
    return np.concatenate([np.cos(params["locs"]), np.sin(params["locs"])], axis=1)


def _log_joint(x: np.ndarray, weights: np.ndarray, locs: np.ndarray, kappas: np.ndarray) -> np.ndarray:
    """log π_k + Σ_d log vonMises(x_nd; μ_kd, κ_kd): (N, K)."""
    dens = stats.vonmises.logpdf(x[:, None, :], kappas[None], loc=locs[None]).sum(-1)
    return np.log(weights)[None] + dens


def test_the_config_runs_through_every_backend(installed: Path, tmp_path: Path) -> None:
    short = ["backends.svi.steps=20", "backends.svi.mean_samples=10", "backends.svi.elbo_particles=2"]
    short += ["backends.mcmc.num_samples=10", "backends.mcmc.warmup_steps=10"]
    experiment = _run(installed, EXAMPLE / "von_mises.yaml", short, tmp_path / "runs")
    config = yaml.safe_load((EXAMPLE / "von_mises.yaml").read_text())
    assert tuple(config["backends"]) == BACKENDS
    summaries = {b: json.loads((experiment / b / "summary.json").read_text()) for b in BACKENDS}
    for backend, summary in summaries.items():
        assert summary["status"] == "completed", (backend, summary["error"])
        assert summary["model"] == "von_mises_mixture"
        assert summary["n_params"] == 2 + 2 * 3 * 2  # K - 1 weights, K × D directions and κ
    em = summaries["em"]
    assert em["m_step"] == "ecm" and em["converged"]
    objective = np.loadtxt(experiment / "em" / "metrics.csv", delimiter=",", skiprows=1, usecols=2)
    assert len(objective) > 2 and np.all(np.diff(objective) >= -1e-12), np.diff(objective)
    # ECM and gradient MAP climb the same log posterior to the same mode; incremental ECM too
    assert abs(em["train_log_likelihood"] - summaries["map"]["train_log_likelihood"]) < 1e-6
    assert abs(em["train_log_likelihood"] - summaries["incremental_em"]["train_log_likelihood"]) < 1e-5
    assert summaries["incremental_em"]["m_step"] == "ecm" and summaries["online_em"]["m_step"] == "gradient"
    # stochastic gradient EM, three passes: near the mode, below it
    assert 0 < em["train_log_likelihood"] - summaries["online_em"]["train_log_likelihood"] < 0.02

    truth = load_file(str(experiment / "truth.safetensors"))
    fitted = load_file(str(experiment / "em" / "params.safetensors"))
    n = json.loads((experiment / "data.json").read_text())["n_train"]
    # the fitted component nearest each true one, directions compared as points (cos, sin)
    order = np.linalg.norm(_on_circle(truth)[:, None] - _on_circle(fitted)[None], axis=2).argmin(1)
    assert sorted(order) == [0, 1, 2]
    # ±4 standard errors from the Fisher information at the truth, n_k = π_k n points a component:
    # Var μ̂ = 1 / (n_k κ A(κ)), Var κ̂ = 1 / (n_k A'(κ)), A' = 1 - A² - A / κ; Var π̂ = π (1 - π) / n
    w, kappa = truth["weights"], truth["concentrations"]
    a = special.i1e(kappa) / special.i0e(kappa)
    n_k = (w * n)[:, None]
    assert np.all(_circular(fitted["locs"][order], truth["locs"]) < 4 / np.sqrt(n_k * kappa * a))
    assert np.all(np.abs(fitted["concentrations"][order] - kappa) < 4 / np.sqrt(n_k * (1 - a**2 - a / kappa)))
    assert np.all(np.abs(fitted["weights"][order] - w) < 4 * np.sqrt(w * (1 - w) / n))


def _concentration(cosine: float, mass: float) -> float:
    """The κ maximizing κ C - m log I0(κ) + (a - 1) log κ - b κ: the root of
    C - m A(κ) + (a - 1) / κ - b, A = I1 / I0 (decreasing in κ, from +∞ to C - m - b < 0)."""

    def score(kappa: float) -> float:
        return cosine - mass * special.i1e(kappa) / special.i0e(kappa) + (CONC_SHAPE - 1) / kappa - CONC_RATE

    return optimize.brentq(score, 1e-8, 1e6, xtol=1e-15, rtol=1e-15)


def _reference_em(
    x: np.ndarray, start: dict[str, np.ndarray], max_iter: int = 2000
) -> tuple[dict[str, np.ndarray], float]:
    """MAP-EM (ECM) for a von Mises mixture under the example's conjugate prior, in NumPy: E-step
    from SciPy's density; weights nk / N (the Dirichlet(1) mode), each direction atan2(κ S, κ C + κ0)
    given κ, then κ solving C - nk A(κ) + (a - 1) / κ - b = 0 (A = I1 / I0) by Brent's method.
    Returns θ and the log-likelihood per point."""
    weights, locs, kappas = start["weights"].copy(), start["locs"].copy(), start["concentrations"].copy()
    for _ in range(max_iter):
        log_joint = _log_joint(x, weights, locs, kappas)
        resp = np.exp(log_joint - special.logsumexp(log_joint, axis=1, keepdims=True))
        nk = resp.sum(0)
        new_weights = nk / nk.sum()
        new_locs = np.arctan2(kappas * (resp.T @ np.sin(x)), kappas * (resp.T @ np.cos(x)) + LOC_PRIOR)
        cosines = np.einsum("nk,nkd->kd", resp, np.cos(x[:, None, :] - new_locs[None]))
        new_kappas = np.array(
            [[_concentration(c, m) for c in row] for row, m in zip(cosines, nk, strict=True)]
        )
        moved = max(
            np.abs(new_weights - weights).max(),
            _circular(new_locs, locs).max(),
            np.abs(new_kappas - kappas).max(),
        )
        weights, locs, kappas = new_weights, new_locs, new_kappas
        if moved < 1e-12:
            break
    log_likelihood = float(special.logsumexp(_log_joint(x, weights, locs, kappas), axis=1).mean())
    return {"weights": weights, "locs": locs, "concentrations": kappas}, log_likelihood


def test_em_agrees_with_a_scipy_em(installed: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    # one component straddles ±π in both features: directions must be handled on the circle
    truth = {
        "weights": np.array([0.3, 0.3, 0.4]),
        "locs": np.array([[3.0, -3.1], [0.9, 1.2], [-1.2, -0.8]]),
        "concentrations": np.array([[6.0, 4.0], [3.0, 8.0], [5.0, 5.0]]),
    }
    labels = rng.choice(3, size=900, p=truth["weights"])
    x = stats.vonmises.rvs(truth["concentrations"][labels], loc=truth["locs"][labels], random_state=rng)
    x = np.angle(np.exp(1j * x))
    np.save(tmp_path / "x.npy", x)
    start = {
        "weights": np.full(3, 1 / 3),
        "locs": np.angle(np.exp(1j * (truth["locs"] + 0.4))),
        "concentrations": truth["concentrations"] * 0.6,
    }
    save_file(start, str(tmp_path / "start.safetensors"))
    config = {
        "experiment": "von-mises-reference",
        "data": {"source": "npy", "path": str(tmp_path / "x.npy"), "test_fraction": 0.0},
        "model": {"name": "von_mises_mixture", "k": 3, "prior": "conjugate"},
        "init": {"method": "given", "path": str(tmp_path / "start.safetensors")},
        "backends": {"em": {"max_iter": 500, "tol": 1e-14}},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    experiment = _run(installed, tmp_path / "config.yaml", [], tmp_path / "runs")
    summary = json.loads((experiment / "em" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["m_step"] == "ecm", summary["error"]
    fitted = load_file(str(experiment / "em" / "params.safetensors"))

    reference, log_likelihood = _reference_em(x, start)
    assert abs(summary["train_log_likelihood"] - log_likelihood) < 1e-6
    np.testing.assert_allclose(fitted["weights"], reference["weights"], atol=1e-5)
    assert np.all(_circular(fitted["locs"], reference["locs"]) < 1e-5)
    np.testing.assert_allclose(fitted["concentrations"], reference["concentrations"], rtol=1e-5)
    # the start led both to the truth's components, not to another mode
    assert np.all(_circular(reference["locs"], truth["locs"]) < 0.3)


def test_the_installed_module_imports_on_its_own(installed: Path) -> None:
    """Importing the model's module first imports ppl_gmm.models, which finds the entry points:
    they are loaded at the registry's first lookup, so the half-imported module is not re-entered."""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    script = (
        "import von_mises_mixture as m; from ppl_gmm.models import MODELS; "
        "assert MODELS.get('von_mises_mixture') is m.VonMisesMixture"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
