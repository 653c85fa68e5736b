"""The Student-t mixture: its ECM against an independent NumPy/SciPy ECM, monotone, the gmm's EM
in the limit ν → ∞, its density against SciPy's, its incremental-EM bound tight after an E-step,
the Pyro backends from a config, and bad ``model.dofs`` refused with exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.optimize import brentq
from scipy.special import digamma, logsumexp
from scipy.stats import multivariate_t

from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.backends.incremental_em import IncrementalEM, IncrementalEMOptions, _free_energy
from ppl_gmm.cli import main
from ppl_gmm.config import InitConfig, parse_config
from ppl_gmm.experiment import execute, prepare
from ppl_gmm.init import initialize
from ppl_gmm.models import MODELS
from ppl_gmm.models.gmm import GaussianMixture

STUDENT = MODELS.get("student_t_mixture")


def _data(n: int = 240, seed: int = 0, dofs: float | None = None):
    rng = np.random.default_rng(seed)
    simulation = STUDENT.for_simulation(STUDENT.options(k=2, dofs=dofs), 2)
    truth = simulation.sample_truth(rng, 5.0)
    x, _ = simulation.simulate(truth, n, rng)
    model = STUDENT.from_config(STUDENT.options(k=2, dofs=dofs), x)
    return model, x, model.check_params(truth, "truth")


def _fit(model, x, init, steps: int):
    seen: list[float] = []
    fit = EM().fit(
        model, x, init, EMOptions(max_iter=steps, tol=0.0), lambda info: seen.append(info.objective)
    )
    return fit.params, seen


def _reference_ecm(x: np.ndarray, params: dict[str, np.ndarray], steps: int) -> tuple[dict, float]:
    """McLachlan & Peel (2000) §7.5's ECM, one sweep per step, in NumPy/SciPy; returns θ after
    ``steps`` sweeps and its log-likelihood per point."""
    w, mu, sigma, nu = (params[name].copy() for name in ("weights", "means", "covariances", "dofs"))
    n, d = x.shape

    def log_joint() -> np.ndarray:
        return np.stack(
            [np.log(w[k]) + multivariate_t(mu[k], sigma[k], df=nu[k]).logpdf(x) for k in range(len(w))], 1
        )

    for _ in range(steps):
        joint = log_joint()
        r = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
        for k in range(len(w)):
            diff = x - mu[k]
            delta = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(sigma[k]), diff)
            u = (nu[k] + d) / (nu[k] + delta)
            nk = r[:, k].sum()
            w[k] = nk / n
            mu[k] = (r[:, k] * u) @ x / (r[:, k] @ u)
            diff = x - mu[k]
            sigma[k] = (r[:, k] * u * diff.T) @ diff / nk + 1e-6 * np.eye(d)
            old = nu[k]
            term = (r[:, k] @ (np.log(u) - u)) / nk + digamma((old + d) / 2) - np.log((old + d) / 2)
            nu[k] = brentq(
                lambda v, term=term: -digamma(v / 2) + np.log(v / 2) + 1 + term, 1e-2, 1e4, xtol=1e-14
            )
    joint = log_joint()
    return {"weights": w, "means": mu, "covariances": sigma, "dofs": nu}, float(
        logsumexp(joint, axis=1).mean()
    )


def test_log_joint_is_scipys_multivariate_t() -> None:
    model, x, truth = _data()
    expected = np.stack(
        [
            np.log(truth["weights"][k].item())
            + multivariate_t(
                truth["means"][k].numpy(), truth["covariances"][k].numpy(), df=truth["dofs"][k].item()
            ).logpdf(x.numpy())
            for k in range(2)
        ],
        1,
    )
    np.testing.assert_allclose(model.log_joint(x, truth).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_ecm_agrees_with_an_independent_ecm_and_never_decreases() -> None:
    model, x, _ = _data(seed=1)
    init = initialize(model, x, InitConfig(), seed=0)
    params, seen = _fit(model, x, init, 25)
    reference, log_likelihood = _reference_ecm(x.numpy(), {k: v.numpy() for k, v in init.items()}, 25)
    assert abs(seen[-1] - log_likelihood) < 1e-6
    for name, value in reference.items():
        np.testing.assert_allclose(params[name].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=name)
    assert all(b >= a - 1e-12 for a, b in zip(seen, seen[1:], strict=False)), seen
    assert seen[-1] > seen[0] + 1e-4  # it moved: the monotonicity is not that of a standstill


def test_huge_fixed_dofs_give_the_gmms_em() -> None:
    model, x, _ = _data(seed=2, dofs=1e6)
    init = initialize(model, x, InitConfig(), seed=0)
    _, student = _fit(model, x, init, 20)
    gmm = GaussianMixture(2, 2, "full", None)
    gaussian_init = {name: init[name] for name in ("weights", "means", "covariances")}
    _, gaussian = _fit(gmm, x, gaussian_init, 20)
    assert abs(student[-1] - gaussian[-1]) < 1e-4
    assert student[-1] != gaussian[-1]  # two different densities, not one code path


def test_expected_log_joint_is_tight_after_an_e_step() -> None:
    """incremental_em's bound Σ r E_q log p(x, τ, z | θ) + H(q(τ)) is Σ r log p(x, z | θ) at the
    E-step's θ, and lower elsewhere (the free energy's first two terms)."""
    model, x, truth = _data(seed=3)
    center = model.em_center(x)
    joint = model.log_joint(x, truth)
    resp = torch.softmax(joint, 1)
    design = model.design(x, center)
    model.block_log_joint(design, model.prepare(truth, center))
    stats = model.new_stats(x)
    model.accumulate(stats, design, resp.T)
    assert abs(_free_energy(model, stats, truth, center) - float((resp * joint).sum())) < 1e-8
    moved = model.m_step_stats(stats, center, 1e-6)
    assert _free_energy(model, stats, moved, center) < float((resp * model.log_joint(x, moved)).sum())


def test_incremental_ecm_free_energy_never_decreases() -> None:
    """Each block's E-step and the CM-steps both raise F(q, θ), whose q now holds the latent
    precisions τ too, so the bound that incremental_em reports climbs step by step."""
    model, x, _ = _data(seed=4)
    init = initialize(model, x, InitConfig(), seed=0)
    seen: list[float] = []
    options = IncrementalEMOptions(blocks=4, max_epochs=5, tol=0.0)
    IncrementalEM().fit(model, x, init, options, lambda info: seen.append(info.objective))
    assert len(seen) == 21
    assert all(b >= a - 1e-12 for a, b in zip(seen, seen[1:], strict=False)), seen


def _config(**model: object) -> dict:
    return {
        "experiment": "student-t",
        "data": {"source": "synthetic", "n": 120, "dim": 2, "k": 2, "test_fraction": 0.25},
        "model": {"name": "student_t_mixture", "k": 2, "prior": "conjugate", **model},
        "backends": {
            "em": {"max_iter": 5},
            "map": {"steps": 5},
            "svi": {"steps": 5, "mean_samples": 5, "elbo_particles": 2},
            "mcmc": {"num_samples": 4, "warmup_steps": 4},
        },
    }


@pytest.mark.parametrize("dofs", [None, 4.0])
def test_backends_run_from_a_config(dofs: float | None, tmp_path: Path) -> None:
    outcome = execute(prepare(parse_config(_config(dofs=dofs))), tmp_path)
    for backend, summary in outcome.summaries.items():
        assert summary.status == "completed", (backend, summary.error)
        assert np.isfinite(summary.train_log_likelihood)


@pytest.mark.parametrize("dofs", [0, -1.5, ".nan", ".inf"])
def test_bad_dofs_is_a_config_error(dofs: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    text = yaml.safe_dump(_config()).replace("k: 2\n  name", f"dofs: {dofs}\n  k: 2\n  name")
    path.write_text(text, encoding="utf-8")
    assert f"dofs: {dofs}" in text
    rc = main(["run", str(path), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and "model.dofs" in err and len(err.splitlines()) == 1, err
