"""Coordinate-ascent VB against scikit-learn, against Pyro's ELBO of the declared model, its
monotone ELBO, and pruning of surplus components."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import TraceEnum_ELBO
from scipy.special import gammaln, multigammaln
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import BayesianGaussianMixture

from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.backends.em import e_step as em_e_step
from ppl_gmm.backends.map import MAP, MAPOptions
from ppl_gmm.backends.vb import (
    VB,
    CAVIState,
    Variational,
    VBOptions,
    cavi_update,
    elbo,
    expected_log_joint,
    next_log_resp,
    posterior_draws,
    run_cavi,
    variational_guide,
    variational_m_step,
)
from ppl_gmm.config import InitConfig
from ppl_gmm.errors import UserError
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMHyperparameters, GMMOptions, make_synthetic

WEIGHT_PRIORS = ["dirichlet", "dirichlet_process"]
SKLEARN_WEIGHT_PRIOR = {"dirichlet": "dirichlet_distribution", "dirichlet_process": "dirichlet_process"}


def _model(x: torch.Tensor, k: int, covariance: str = "full", **hyper) -> GaussianMixture:
    cfg = GMMOptions(
        k=k, covariance=covariance, prior="conjugate", hyperparameters=GMMHyperparameters(**hyper)
    )
    return GaussianMixture.from_config(cfg, x)


def _data(n: int, dim: int, k: int, separation: float, seed: int):
    x, labels, truth = make_synthetic(n, dim, k, separation, np.random.default_rng(seed))
    return torch.from_numpy(x), labels, truth


def _sklearn(model: GaussianMixture, resp: np.ndarray, **kwargs) -> BayesianGaussianMixture:
    """scikit-learn's BayesianGaussianMixture with our priors, started from our responsibilities."""

    class FromResponsibilities(BayesianGaussianMixture):
        def _initialize_parameters(self, X, random_state, xp=None):  # noqa: N803 (scikit-learn's name)
            self._initialize(X, resp)

    prior = model.prior
    return FromResponsibilities(
        n_components=model.k,
        covariance_type=model.covariance,
        weight_concentration_prior_type=SKLEARN_WEIGHT_PRIOR[prior.weight_prior],
        weight_concentration_prior=prior.weight_concentration,
        mean_precision_prior=prior.mean_precision,
        mean_prior=prior.mean_prior.numpy(),
        degrees_of_freedom_prior=prior.degrees_of_freedom,
        covariance_prior=prior.covariance_prior.numpy(),
        **kwargs,
    )


def _assert_same_posterior(q: Variational, reference: BayesianGaussianMixture, rtol: float) -> None:
    pairs = {
        "weight_concentration": np.asarray(reference.weight_concentration_),
        "means": reference.means_,
        "degrees_of_freedom": reference.degrees_of_freedom_,
        "mean_precision": reference.mean_precision_,
        "covariances": reference.covariances_,
    }
    for name, expected in pairs.items():
        np.testing.assert_allclose(getattr(q, name).numpy(), expected, rtol=rtol, atol=0, err_msg=name)


def _dropped_constant(model: GaussianMixture, n: int) -> float:
    """What scikit-learn's lower bound leaves out of the ELBO of a full-covariance model (or any
    model in one dimension, where diag and spherical are full): the likelihood's -ND/2 log 2π, the
    priors' log normalizers, and the log π term of each posterior's multivariate gamma function."""
    prior = model.prior
    k, d = model.k, model.dim
    gamma, nu0 = prior.weight_concentration, prior.degrees_of_freedom
    if prior.stick_breaking:
        log_norm_weights = k * math.log(gamma)  # 1 / B(1, γ) = γ per stick
    else:
        log_norm_weights = gammaln(k * gamma) - k * gammaln(gamma)
    log_det_c0 = np.linalg.slogdet(np.atleast_2d(prior.covariance_prior.numpy()))[1]
    log_norm_wishart = 0.5 * nu0 * log_det_c0 - 0.5 * nu0 * d * math.log(2) - multigammaln(nu0 / 2, d)
    return (
        -0.5 * n * d * math.log(2 * math.pi)
        + log_norm_weights
        + k * log_norm_wishart
        + 0.5 * k * d * math.log(prior.mean_precision)
        + k * d * (d - 1) / 4 * math.log(math.pi)
    )


# ---- scikit-learn -------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_prior", WEIGHT_PRIORS)
@pytest.mark.parametrize(
    ("covariance", "dim", "reg_covar"),
    [("full", 3, 0.0), ("full", 3, 1e-3), ("diag", 1, 0.0), ("spherical", 1, 0.0)],
)
def test_vb_matches_scikit_learn_from_the_same_responsibilities(
    covariance: str, dim: int, reg_covar: float, weight_prior: str
) -> None:
    """Diag and spherical only in one dimension: beyond it scikit-learn's E-step takes a Wishart's
    expected log-determinant for their Gamma posteriors (the M-steps agree; see the next test)."""
    x, _, _ = _data(600, dim, 3, 3.0, 11)
    n_iter = 15
    model = _model(x, 4, covariance, weight_prior=weight_prior)
    init = initialize(model, x, InitConfig(), seed=3)
    steps: list[float] = []
    options = VBOptions(max_iter=n_iter, tol=0.0, reg_covar=reg_covar)
    fit = run_cavi(model, x, init, options, lambda step, q, value: steps.append(value))
    resp = em_e_step(model, x, init)[1].exp().numpy()
    reference = _sklearn(model, resp, tol=0.0, max_iter=n_iter, reg_covar=reg_covar)
    with pytest.warns(ConvergenceWarning):
        reference.fit(x.numpy())
    assert fit.n_steps == reference.n_iter_ == n_iter and len(steps) == n_iter + 1
    _assert_same_posterior(fit.posterior, reference, rtol=1e-6)
    if reg_covar == 0:  # reg_covar makes q(θ) suboptimal, and the identity below needs the optimum
        n = x.shape[0]
        dropped = np.array(steps[1:]) * n - np.array(reference.lower_bounds_)
        np.testing.assert_allclose(dropped, _dropped_constant(model, n), rtol=1e-9)


@pytest.mark.parametrize("weight_prior", WEIGHT_PRIORS)
@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
def test_variational_m_step_matches_scikit_learn(covariance: str, weight_prior: str) -> None:
    """Tied is left out: scikit-learn's tied posterior (ν0 + N/K, deviations averaged over K) is
    not that of one Wishart shared by the components, which this model declares."""
    x, _, _ = _data(300, 3, 3, 2.0, 12)
    model = _model(x, 4, covariance, weight_prior=weight_prior)
    gen = torch.Generator().manual_seed(0)
    resp = torch.softmax(2 * torch.randn(x.shape[0], 4, generator=gen, dtype=x.dtype), dim=1)
    q = variational_m_step(x, resp, model.prior, covariance, reg_covar=1e-3)
    reference = _sklearn(model, resp.numpy(), reg_covar=1e-3)
    reference._check_parameters(x.numpy())  # sets the priors' fitted attributes
    reference._initialize(x.numpy(), resp.numpy())
    _assert_same_posterior(q, reference, rtol=1e-10)


# ---- the ELBO ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(40, 200),
    dim=st.integers(1, 3),
    k=st.integers(1, 4),
    covariance=st.sampled_from(["full", "tied", "diag", "spherical"]),
    weight_prior=st.sampled_from(WEIGHT_PRIORS),
)
def test_elbo_never_decreases(seed, n, dim, k, covariance, weight_prior) -> None:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 10.0, size=dim)
    x = torch.from_numpy(rng.standard_normal((n, dim)) * scale + rng.integers(0, 3, (n, 1)) * scale)
    model = _model(x, k, covariance, weight_prior=weight_prior)
    init = initialize(model, x, InitConfig(method="kmeans++", reg_covar=1e-3), seed=seed)
    steps: list[float] = []
    run_cavi(model, x, init, VBOptions(max_iter=30, tol=0.0, reg_covar=0.0), lambda s, q, v: steps.append(v))
    objective = np.array(steps)
    assert np.isfinite(objective).all() and len(objective) == 31
    drops = np.diff(objective)
    assert drops.min() >= -1e-10 * np.abs(objective).max(), drops.min()


def _cavi_guide(model: GaussianMixture, q: Variational, resp: torch.Tensor):
    """A Pyro guide of exactly the CAVI families, fixed at q(θ) = q and q(z) = resp (N, K)."""
    return variational_guide(model, q, resp)


def _pyro_elbos(model: GaussianMixture, guide, x: torch.Tensor, particles: int) -> np.ndarray:
    estimator = TraceEnum_ELBO(max_plate_nesting=model.max_plate_nesting)
    return np.array([-estimator.loss(model.model, guide, x) for _ in range(particles)])


# torch's Wishart warns when a Bartlett draw is numerically singular, and draws again
@pytest.mark.filterwarnings("ignore:Singular sample detected")
@pytest.mark.parametrize("weight_prior", WEIGHT_PRIORS)
@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_elbo_is_pyros_exactly_at_a_cavi_update(covariance: str, weight_prior: str) -> None:
    """With q(θ) the exact optimum given q(z), E_q(z)[log p(X, Z, θ)] - log q(θ) does not depend
    on θ, so every single draw of Pyro's ELBO estimate equals the ELBO: this checks the update
    (only the optimum makes the estimate constant) and every constant of the ELBO at once."""
    x, _, _ = _data(12, 2, 2, 3.0, 13)
    model = _model(x, 2, covariance, weight_prior=weight_prior)
    init = initialize(model, x, InitConfig(), seed=0)
    log_resp = em_e_step(model, x, init)[1]
    for _ in range(3):
        state, total = cavi_update(x, log_resp, model.prior, covariance, reg_covar=0.0)
        log_resp = next_log_resp(state)
    state, total = cavi_update(x, log_resp, model.prior, covariance, reg_covar=0.0)
    fit = run_cavi(model, x, init, VBOptions(max_iter=3, tol=0.0, reg_covar=0.0))
    assert fit.elbo * x.shape[0] == pytest.approx(float(total), rel=1e-12)
    draws = _pyro_elbos(model, _cavi_guide(model, state.posterior, log_resp.exp()), x, particles=3)
    np.testing.assert_allclose(draws, float(total), rtol=1e-10)


@pytest.mark.filterwarnings("ignore:Singular sample detected")
@pytest.mark.parametrize(
    ("covariance", "weight_prior"),
    [
        ("full", "dirichlet"),
        ("tied", "dirichlet_process"),
        ("diag", "dirichlet_process"),
        ("spherical", "dirichlet"),
    ],
)
def test_elbo_agrees_with_pyro_away_from_the_optimum(covariance: str, weight_prior: str) -> None:
    """At a q(z) that q(θ) was not fitted to, Pyro's estimate varies per draw; its mean agrees with
    the closed-form ELBO within 3 standard errors."""
    x, _, _ = _data(12, 2, 2, 3.0, 14)
    model = _model(x, 2, covariance, weight_prior=weight_prior)
    init = initialize(model, x, InitConfig(), seed=0)
    q = run_cavi(model, x, init, VBOptions(max_iter=1, tol=0.0, reg_covar=0.0)).posterior
    log_resp = next_log_resp(CAVIState(q, expected_log_joint(x, q)))
    ours = float(elbo(x, log_resp, q, model.prior))
    draws = _pyro_elbos(model, _cavi_guide(model, q, log_resp.exp()), x, particles=150)
    standard_error = draws.std(ddof=1) / math.sqrt(len(draws))
    assert 0 < standard_error < 0.1  # varies, yet precise enough to see any constant left out
    assert abs(draws.mean() - ours) < 3 * standard_error, (draws.mean(), ours, standard_error)


# ---- the backend ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hyper", [{"weight_concentration": 0.01}, {"weight_prior": "dirichlet_process"}], ids=["dirichlet", "dp"]
)
def test_vb_prunes_surplus_components(hyper: dict) -> None:
    x, labels, _ = _data(1500, 2, 3, 6.0, 15)
    model = _model(x, 8, **hyper)
    init = initialize(model, x, InitConfig(), seed=0)
    result = VB().fit(model, x, init, VBOptions(), lambda s: None)
    assert result.converged
    assert result.extras["effective_k"] == 3 and len(result.extras["pruned"]) == 5
    kept = sorted(set(range(8)) - set(result.extras["pruned"]))
    assert (result.params["weights"][kept] >= 0.01).all()
    predicted = torch.argmax(model.log_joint(x, result.params), dim=1).numpy()
    assert adjusted_rand_score(labels, predicted) > 0.95


def test_fit_reports_each_sweep_and_stops_at_tol() -> None:
    x, _, _ = _data(500, 2, 3, 3.0, 16)
    model = _model(x, 3, "diag")
    init = initialize(model, x, InitConfig(), seed=1)
    steps = []
    result = VB().fit(model, x, init, VBOptions(tol=1e-5), steps.append)
    assert result.converged and result.point_estimate == "posterior_mean"
    assert [s.step for s in steps] == list(range(result.n_steps + 1))
    assert result.elbo == steps[-1].objective
    assert abs(steps[-1].objective - steps[-2].objective) < 1e-5
    assert all(abs(b.objective - a.objective) >= 1e-5 for a, b in zip(steps[:-2], steps[1:-1], strict=True))
    assert steps[-1].log_likelihood == pytest.approx(float(model.log_likelihood(x, result.params).mean()))
    assert result.elbo < steps[-1].log_likelihood  # a lower bound on the evidence, below the fit
    json.dumps(dict(result.extras))
    short = VB().fit(model, x, init, VBOptions(max_iter=2, tol=0.0), lambda s: None)
    assert not short.converged and short.n_steps == 2


def test_vb_keeps_the_datas_dtype() -> None:
    x, _, _ = _data(400, 2, 3, 3.0, 17)
    model = _model(x, 3)
    init = initialize(model, x, InitConfig(), seed=2)
    double = VB().fit(model, x, init, VBOptions(max_iter=20, tol=0.0), lambda s: None)
    single = VB().fit(model, x.float(), init, VBOptions(max_iter=20, tol=0.0), lambda s: None)
    assert all(value.dtype == torch.float32 for value in single.params.values())
    assert single.elbo == pytest.approx(double.elbo, rel=1e-4)
    np.testing.assert_allclose(single.params["means"].numpy(), double.params["means"].numpy(), atol=1e-3)


@pytest.mark.parametrize("covariance", ["full", "tied"])
def test_float32_posterior_is_symmetric_far_from_the_origin(covariance: str) -> None:
    """Data centred at 1e3 (Old Faithful's scale is 70): in float32 the uncentred second moments
    would leave rounding noise as large as the covariance and unequal triangles, which Pyro's
    Wishart refuses; the scatter is taken about the data's mean instead."""
    x64 = _data(300, 3, 3, 4.0, 0)[0] + 1e3
    model = _model(x64, 3, covariance)
    resp = torch.softmax(model.log_joint(x64, initialize(model, x64, InitConfig(), seed=0)), dim=1)
    q = variational_m_step(x64.float(), resp.float(), model.prior, covariance, 1e-6)
    exact = variational_m_step(x64, resp, model.prior, covariance, 1e-6).covariances
    assert torch.equal(q.covariances, q.covariances.mT)
    torch.testing.assert_close(q.covariances.double(), exact, rtol=1e-4, atol=0)
    assert len(posterior_draws(model, q, 3)) == 3  # Pyro's Wishart accepts its parameters


def test_vb_needs_a_prior_and_names_the_fix() -> None:
    x, _, _ = _data(100, 2, 2, 4.0, 18)
    model = GaussianMixture.from_config(GMMOptions(k=2), x)
    with pytest.raises(UserError, match=r"backends\.vb: .*proper prior.*model\.prior: conjugate"):
        VB().check(model, VBOptions())
    VB().check(_model(x, 2, "spherical", weight_prior="dirichlet_process"), VBOptions())


@pytest.mark.parametrize(("backend", "options"), [(EM, EMOptions), (MAP, MAPOptions)])
def test_posterior_mode_backends_refuse_the_stick_breaking_prior(backend, options) -> None:
    x, _, _ = _data(100, 2, 2, 4.0, 19)
    model = _model(x, 2, weight_prior="dirichlet_process")
    with pytest.raises(UserError, match=r"model\.hyperparameters\.weight_prior: .*vb or svi"):
        backend().check(model, options())
