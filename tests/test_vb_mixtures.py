"""Coordinate-ascent VB for the Poisson and Bernoulli mixtures (``ConjugateVB``): its ELBO never
decreases, equals Pyro's ELBO of the declared model, its sweeps and fixed point are those of an
independent NumPy/SciPy CAVI written from the textbook formulas, and its posterior mean recovers
a simulated truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from scipy import stats
from scipy.special import betaln, digamma, gammaln, logsumexp, softmax
from torch.distributions import Dirichlet

from ppl_gmm.backends.vb import (
    VB,
    CAVIState,
    VBOptions,
    conjugate_elbo,
    conjugate_update,
    next_log_resp,
    run_cavi,
    variational_guide,
)
from ppl_gmm.config import InitConfig, parse_config
from ppl_gmm.errors import UserError
from ppl_gmm.evaluate import relabel
from ppl_gmm.experiment import prepare
from ppl_gmm.init import initialize
from ppl_gmm.models.bernoulli import BernoulliMixture
from ppl_gmm.models.conjugate import ConjugatePosterior, ConjugateVB
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic
from ppl_gmm.models.poisson import PoissonMixture

MODELS = [PoissonMixture, BernoulliMixture]


def _simulated(cls: type[ConjugateVB], n: int, dim: int, seed: int):
    """A model with its conjugate prior, n points drawn from a random truth of 3 components, and
    the truth."""
    rng = np.random.default_rng(seed)
    simulation = cls.for_simulation(cls.options(k=3, prior="none"), dim)
    truth = simulation.sample_truth(rng, 4.0)
    x, _ = simulation.simulate(truth, n, rng)
    return cls.from_config(cls.options(k=3, prior="conjugate"), x), x, truth


# ---- an independent CAVI in NumPy/SciPy, from the textbook formulas (PRML §10.2) ----------------

Reference = tuple[np.ndarray, np.ndarray, np.ndarray]  # α (K,), a (K, D), b (K, D)


def _reference_update(model: ConjugateVB, x: np.ndarray, resp: np.ndarray) -> Reference:
    """q(π) q(θ) optimal given resp (N, K): Dirichlet(α), and Gamma(a, rate b) or Beta(a, b)."""
    alpha0, a0, b0 = model.prior
    nk, ones = resp.sum(0), resp.T @ x
    if isinstance(model, PoissonMixture):
        return alpha0 + nk, a0 + ones, b0 + np.repeat(nk[:, None], x.shape[1], axis=1)
    return alpha0 + nk, a0 + ones, b0 + resp.T @ (1 - x)


def _reference_expectations(model: ConjugateVB, x: np.ndarray, q: Reference) -> tuple[np.ndarray, float]:
    """log ρ (N, K) and E_q[log p(π, θ)] - E_q[log q(π, θ)]."""
    alpha0, a0, b0 = model.prior
    alpha, a, b = q
    k = len(alpha)
    e_log_pi = digamma(alpha) - digamma(alpha.sum())
    log_p = gammaln(k * alpha0) - k * gammaln(alpha0) + (alpha0 - 1) * e_log_pi.sum()
    log_q = gammaln(alpha.sum()) - gammaln(alpha).sum() + ((alpha - 1) * e_log_pi).sum()
    if isinstance(model, PoissonMixture):
        e_log, e_rate = digamma(a) - np.log(b), a / b
        log_rho = e_log_pi + x @ e_log.T - e_rate.sum(1) - gammaln(x + 1).sum(1, keepdims=True)
        log_p += (a0 * np.log(b0) - gammaln(a0) + (a0 - 1) * e_log - b0 * e_rate).sum()
        log_q += (a * np.log(b) - gammaln(a) + (a - 1) * e_log - b * e_rate).sum()
    else:
        e_log_one, e_log_zero = digamma(a) - digamma(a + b), digamma(b) - digamma(a + b)
        log_rho = e_log_pi + x @ e_log_one.T + (1 - x) @ e_log_zero.T
        log_p += ((a0 - 1) * e_log_one + (b0 - 1) * e_log_zero - betaln(a0, b0)).sum()
        log_q += ((a - 1) * e_log_one + (b - 1) * e_log_zero - betaln(a, b)).sum()
    return log_rho, log_p - log_q


def _reference_cavi(
    model: ConjugateVB, x: np.ndarray, init: dict, sweeps: int
) -> list[tuple[Reference, float]]:
    """q(θ) and the ELBO (nats, summed over points) after each of sweeps + 1 updates of q(θ), the
    first fitted to the responsibilities of ``init`` under SciPy's densities."""
    weights = init["weights"].numpy()
    if isinstance(model, PoissonMixture):
        log_density = stats.poisson.logpmf(x[:, None, :], init["rates"].numpy()[None])
    else:
        log_density = stats.bernoulli.logpmf(x[:, None, :], init["probs"].numpy()[None])
    log_joint = np.log(weights) + log_density.sum(-1)
    log_resp = log_joint - logsumexp(log_joint, axis=1, keepdims=True)
    out = []
    for _ in range(sweeps + 1):
        resp = np.exp(log_resp)
        q = _reference_update(model, x, resp)
        log_rho, global_part = _reference_expectations(model, x, q)
        out.append((q, float((resp * (log_rho - log_resp)).sum() + global_part)))
        log_resp = log_rho - logsumexp(log_rho, axis=1, keepdims=True)
    return out


def _as_numpy(q: ConjugatePosterior) -> Reference:
    return q.weight_concentration.numpy(), q.a.numpy(), q.b.numpy()


@pytest.mark.parametrize("cls", MODELS)
def test_sweeps_and_fixed_point_match_a_numpy_reference(cls) -> None:
    model, x, _ = _simulated(cls, 300, 5, seed=3)
    init = initialize(model, x, InitConfig(method="random_from_data"), seed=1)
    seen: list[tuple[ConjugatePosterior, float]] = []
    sweeps = 200
    run_cavi(
        model,
        x,
        init,
        VBOptions(max_iter=sweeps, tol=0.0),
        lambda s, sweep, value: seen.append((sweep.posterior, value)),
    )
    reference = _reference_cavi(model, x.numpy(), init, sweeps)
    assert len(seen) == len(reference) == sweeps + 1
    for step in (0, 1, 2, 10, sweeps):
        (q, value), (expected, total) = seen[step], reference[step]
        for ours, theirs, name in zip(_as_numpy(q), expected, ("alpha", "a", "b"), strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-8, atol=0, err_msg=f"{name}, step {step}")
        assert value == pytest.approx(total / x.shape[0], rel=1e-10), step
    # converged: one more sweep of the reference leaves q where it was, so the fixed point is stationary
    last = reference[-1][0]
    log_rho, _ = _reference_expectations(model, x.numpy(), last)
    again = _reference_update(model, x.numpy(), softmax(log_rho, axis=1))
    for before, after, name in zip(last, again, ("alpha", "a", "b"), strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-8, atol=0, err_msg=name)
    assert np.abs(again[1] - reference[0][0][1]).max() > 1.0  # it moved far from its start


# ---- the ELBO ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cls", MODELS)
def test_elbo_never_decreases(cls, seed: int) -> None:
    model, x, _ = _simulated(cls, 150, 4, seed=seed)
    init = initialize(model, x, InitConfig(method="random_from_data"), seed=seed)
    steps: list[float] = []
    run_cavi(model, x, init, VBOptions(max_iter=60, tol=0.0), lambda step, q, value: steps.append(value))
    objective = np.array(steps)
    assert np.isfinite(objective).all() and len(objective) == 61
    drops = np.diff(objective)
    assert drops.min() >= -1e-12 * np.abs(objective).max(), drops.min()
    assert objective[-1] - objective[0] > 1e-3  # it climbed: the test saw real updates


def _pyro_elbo(
    model: ConjugateVB, q: ConjugatePosterior, log_resp: torch.Tensor, x: torch.Tensor, batches: int
):
    """Pyro's ELBO estimates of the declared model with the CAVI families as the guide (q(θ)
    sampled, q(z) enumerated): ``batches`` estimates of 20 particles each."""
    guide = variational_guide(model, q, log_resp.exp())
    estimator = TraceEnum_ELBO(max_plate_nesting=model.max_plate_nesting, num_particles=20)
    return np.array([-estimator.loss(model.model, guide, x) for _ in range(batches)])


@pytest.mark.parametrize("cls", MODELS)
def test_elbo_is_pyros_exactly_at_a_cavi_update(cls) -> None:
    """With q(π) q(θ) the exact optimum given q(z), E_q(z)[log p(X, Z, π, θ)] - log q(π, θ) does
    not depend on (π, θ): every estimate of Pyro's equals the ELBO, which checks the update (only
    the optimum makes it constant) and every constant of the ELBO at once."""
    model, x, _ = _simulated(cls, 12, 3, seed=4)
    init = initialize(model, x, InitConfig(), seed=0)
    fit = run_cavi(model, x, init, VBOptions(max_iter=3, tol=0.0))
    log_resp = next_log_resp(CAVIState(fit.posterior, model.variational_log_joint(x, fit.posterior)))
    state, total = conjugate_update(model, x, log_resp)
    np.testing.assert_allclose(_pyro_elbo(model, state.posterior, log_resp, x, 2), float(total), rtol=1e-12)


@pytest.mark.parametrize("cls", MODELS)
def test_elbo_agrees_with_pyro_away_from_the_optimum(cls) -> None:
    """At a q(z) that q(θ) was not fitted to, Pyro's estimate varies; the mean of 400 particles
    agrees with the closed-form ELBO within 3 standard errors."""
    model, x, _ = _simulated(cls, 12, 3, seed=5)
    init = initialize(model, x, InitConfig(), seed=0)
    q = run_cavi(model, x, init, VBOptions(max_iter=1, tol=0.0)).posterior
    log_resp = next_log_resp(CAVIState(q, model.variational_log_joint(x, q)))
    ours = float(conjugate_elbo(model, x, log_resp, q))
    draws = _pyro_elbo(model, q, log_resp, x, 20)
    standard_error = draws.std(ddof=1) / math.sqrt(len(draws))
    assert 0 < standard_error < 0.1  # varies, yet precise enough to see any constant left out
    assert abs(draws.mean() - ours) < 3 * standard_error, (draws.mean(), ours, standard_error)


# ---- the backend ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", MODELS)
def test_vb_recovers_the_simulated_truth(cls) -> None:
    model, x, truth = _simulated(cls, 3000, 10, seed=1)
    init = initialize(model, x, InitConfig(), seed=0)
    steps = []
    result = VB().fit(model, x, init, VBOptions(tol=1e-8, posterior_samples=50), steps.append)
    assert result.converged and result.point_estimate == "posterior_mean"
    assert [s.step for s in steps] == list(range(result.n_steps + 1))
    assert result.elbo == steps[-1].objective and abs(steps[-1].objective - steps[-2].objective) < 1e-8
    assert steps[-1].log_likelihood == pytest.approx(float(model.log_likelihood(x, result.params).mean()))
    assert result.extras == {"effective_k": 3, "pruned": []}
    q = run_cavi(model, x, init, VBOptions(tol=1e-8)).posterior  # the point estimate is q's mean
    torch.testing.assert_close(result.params["weights"], Dirichlet(q.weight_concentration).mean)
    torch.testing.assert_close(result.params[model.component_site], model.component_family(q.a, q.b).mean)
    fitted = relabel(model, truth, result.params)
    for name, value in truth.items():
        error = float((fitted[name] - value).pow(2).mean().sqrt() / value.pow(2).mean().sqrt())
        assert error < 0.08, (name, error)
    posterior = result.tensors["posterior"]
    site = model.component_site
    assert set(posterior) == {f"{name}.{moment}" for name in ("weights", site) for moment in ("mean", "std")}
    assert (posterior[f"{site}.std"] > 0).all() and (posterior[f"{site}.std"] < 0.1 * truth[site].max()).all()


@pytest.mark.parametrize("cls", MODELS)
def test_vb_needs_a_prior_and_carries_no_reg_covar(cls) -> None:
    model, x, _ = _simulated(cls, 50, 3, seed=6)
    VB().check(model, VBOptions())
    flat = cls.from_config(cls.options(k=3, prior="none"), x)
    with pytest.raises(UserError, match=r"backends\.vb: .*proper prior.*model\.prior: conjugate"):
        VB().check(flat, VBOptions())
    config = {
        "data": {"source": "synthetic", "n": 60, "dim": 2, "k": 2},
        "model": {"name": cls.name, "k": 2, "prior": "conjugate"},
        "backends": {"vb": {"max_iter": 5}},
    }
    assert prepare(parse_config(config)).backends[0][2].reg_covar is None
    config["backends"] = {"vb": {"max_iter": 5, "reg_covar": 1e-3}}
    with pytest.raises(UserError, match=r"backends\.vb\.reg_covar: .*no use for reg_covar"):
        prepare(parse_config(config))


def test_gmm_reg_covar_defaults_to_its_1e_6() -> None:
    x = torch.from_numpy(make_synthetic(200, 2, 2, 3.0, np.random.default_rng(7))[0])
    model = GaussianMixture.from_config(GMMOptions(k=2, prior="conjugate"), x)
    init = initialize(model, x, InitConfig(), seed=0)
    fits = [
        run_cavi(model, x, init, VBOptions(max_iter=5, tol=0.0, reg_covar=value))
        for value in (None, 1e-6, 0.0)
    ]
    assert fits[0].elbo == fits[1].elbo != fits[2].elbo
