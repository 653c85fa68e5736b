"""Variational Bayes by coordinate ascent (CAVI) for the conjugate Gaussian mixture, Bishop PRML §10.2.

The posterior of the model declared in ``models/gmm.py`` is approximated by
q(π) q(μ, Λ) Π_n q(z_n): q(π) Dirichlet (Beta sticks under the ``dirichlet_process`` weight prior),
q(μ_k | Λ_k) = N(m_k, (β_k Λ_k)^-1), q(Λ_k) Wishart(ν_k, W_k) for full and tied (one shared by
all components), a Gamma per coordinate for diag, one Gamma per component for spherical, and
q(z_n) categorical. Each family is the exact optimum given the others, so a sweep
(q(θ) ← optimum given q(z); q(z) ← optimum given q(θ)) never lowers the ELBO.

The precision posteriors are stored as scikit-learn's ``BayesianGaussianMixture`` stores them:
degrees of freedom ν_k and ``covariances`` = E_q[Λ_k]^-1 (= W_k^-1 / ν_k for the Wishart), in the
covariance type's native shape. Its M-step is this one for full, diag and spherical; its tied
posterior (ν0 + N/K) and its diag and spherical expected log-determinants (a Wishart's digamma sum)
are not the CAVI updates of this model, and this module follows the model.

The ELBO is the full one, every constant included, E_q[log p(X, Z, π, μ, Λ)] - E_q[log q]:
the quantity Pyro's ``TraceEnum_ELBO`` estimates for the declared model with these guide families.

The same loop runs CAVI for any other mixture with conjugate priors (``ConjugateVB`` in
``models/conjugate.py``: the Poisson and Bernoulli mixtures): q(π) Dirichlet, each component
parameter in its prior's family (Gamma, Beta), q(z_n) categorical, through the model's hooks.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, cast

import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from pyro import poutine
from torch import Tensor
from torch.distributions import Beta, kl_divergence

from ..errors import UserError
from ..evaluate import posterior_moments
from ..models.base import MODELS, LatentModel, Params
from ..models.conjugate import (
    ConjugatePosterior,
    ConjugateVB,
    dirichlet_expected_log,
    dirichlet_kl,
    dirichlet_mean,
    dirichlet_posterior,
)
from ..models.gmm import (
    COVARIANCE_TYPES,
    ConjugatePrior,
    GaussianMixture,
    gaussian_log_prob,
    precision_cholesky,
)
from .base import (
    BACKENDS,
    Backend,
    FitError,
    FitResult,
    Options,
    Report,
    StepInfo,
    one_line,
    refuse_sequences,
)
from .em import e_step, fixes, reg_covar

__all__ = [
    "CAVIFit",
    "CAVIState",
    "Posterior",
    "VB",
    "VBOptions",
    "Variational",
    "WEIGHT_FAMILIES",
    "cavi_update",
    "conjugate_elbo",
    "conjugate_update",
    "elbo",
    "elbo_global",
    "expected_log_joint",
    "next_log_resp",
    "point_estimate",
    "posterior_draws",
    "run_cavi",
    "variational_guide",
    "variational_m_step",
]


class VBOptions(Options):
    max_iter: int = Field(500, ge=0)  # CAVI sweeps at most
    tol: float = Field(1e-6, ge=0)  # on the change of the ELBO per point, as EM's rule
    # gmm only (null: its 1e-6), refused by other models: added to each component's empirical
    # covariance S_k, as scikit-learn does; any value > 0 makes the q(θ) update slightly
    # suboptimal, so the ELBO is monotone only with 0
    reg_covar: float | None = Field(None, ge=0)
    prune_threshold: float = Field(1e-2, ge=0, lt=1)  # E[π_k] below it: reported as pruned
    posterior_samples: int = Field(500, ge=2)  # q(θ) draws for the posterior sd kept for compare


@dataclass(frozen=True)
class Variational:
    """q(π) q(μ, Λ), named as scikit-learn's ``BayesianGaussianMixture`` attributes.

    weight_concentration  dirichlet: (K,) α_k; dirichlet_process: (2, K) the sticks' Beta(a_k, b_k)
    mean_precision        (K,) β_k
    means                 (K, D) m_k
    degrees_of_freedom    (K,) ν_k; tied: () one ν
    covariances           E_q[Λ_k]^-1, native shape: full (K, D, D), tied (D, D), diag (K, D),
                          spherical (K,)
    """

    weight_prior: str
    covariance: str
    weight_concentration: Tensor
    mean_precision: Tensor
    means: Tensor
    degrees_of_freedom: Tensor
    covariances: Tensor


Posterior = Variational | ConjugatePosterior
"""q(θ): the gmm's, or that of a mixture with conjugate priors (``ConjugateVB``)."""


# ---- q(π) ------------------------------------------------------------------------------------


def _exclusive_cumsum(values: Tensor) -> Tensor:
    """Σ_{j<k} values_j along the last dim (shifted, not cumsum - values: no cancellation)."""
    return torch.nn.functional.pad(torch.cumsum(values, dim=-1)[..., :-1], (1, 0))


@dataclass(frozen=True)
class _WeightFamily:
    """q(π) of one weight prior.

    posterior(nk (K,), γ) -> weight_concentration; expected_log(wc) -> E[log π_k] (K,);
    expected(wc) -> E[π_k] (K,); kl(wc, γ) -> KL(q(π) || p(π)), a scalar.
    """

    posterior: Callable[[Tensor, float], Tensor]
    expected_log: Callable[[Tensor], Tensor]
    expected: Callable[[Tensor], Tensor]
    kl: Callable[[Tensor, float], Tensor]


def _stick_posterior(nk: Tensor, gamma: float) -> Tensor:
    # v_k sees the points of component k as successes and those of later components as failures
    later = _exclusive_cumsum(nk.flip(-1)).flip(-1)
    return torch.stack([1.0 + nk, gamma + later])


def _stick_expected_log(wc: Tensor) -> Tensor:
    a, b = wc
    total = torch.digamma(a + b)
    return torch.digamma(a) - total + _exclusive_cumsum(torch.digamma(b) - total)


def _stick_expected(wc: Tensor) -> Tensor:
    a, b = wc
    return torch.exp(torch.log(a / (a + b)) + _exclusive_cumsum(torch.log(b / (a + b))))


WEIGHT_FAMILIES: dict[str, _WeightFamily] = {
    "dirichlet": _WeightFamily(dirichlet_posterior, dirichlet_expected_log, dirichlet_mean, dirichlet_kl),
    "dirichlet_process": _WeightFamily(
        posterior=_stick_posterior,
        expected_log=_stick_expected_log,
        expected=_stick_expected,
        kl=lambda wc, gamma: kl_divergence(
            Beta(wc[0], wc[1]), Beta(torch.ones_like(wc[1]), torch.full_like(wc[1], gamma))
        ).sum(),
    ),
}


# ---- q(Λ) ------------------------------------------------------------------------------------


# ---- the two coordinate updates and the ELBO --------------------------------------------------


def variational_m_step(
    x: Tensor, resp: Tensor, prior: ConjugatePrior, covariance: str, reg_covar: float
) -> Variational:
    """q(π) q(μ, Λ) optimal given q(z) = resp (N, K), as scikit-learn's ``_m_step``.

    reg_covar is added to the diagonal of each empirical covariance S_k before the update.
    """
    d = x.shape[1]
    kind = COVARIANCE_TYPES[covariance]
    # scikit-learn's guard against empty components; it moves the ELBO by ~1e-15
    nk = resp.sum(0) + 10 * torch.finfo(x.dtype).eps
    # the scatter about the data's mean: the same, but its second moments keep their digits (in
    # float32, x^T x of data far from the origin leaves rounding noise as large as a covariance)
    shift = x.mean(0)
    x = x - shift
    xk = (resp.T @ x) / nk[:, None]
    xtx = x.T @ x if kind.shared else x.new_zeros(())
    eye = kind.native(torch.eye(d, dtype=x.dtype, device=x.device)[None])
    sk = kind.scatter(x, resp, nk, xk, xtx) / kind.ml_count(nk, d) + reg_covar * eye
    xk = xk + shift
    m0 = prior.mean_prior.to(x)
    beta0 = prior.mean_precision
    beta = beta0 + nk
    means = (beta0 * m0 + nk[:, None] * xk) / beta[:, None]
    dof, covariances = COVARIANCE_TYPES[covariance].variational_posterior(
        nk, sk, xk - m0, beta0 * nk / beta, prior.degrees_of_freedom, prior.covariance_prior.to(x)
    )
    weights = WEIGHT_FAMILIES[prior.weight_prior].posterior(nk, prior.weight_concentration)
    return Variational(prior.weight_prior, covariance, weights, beta, means, dof, covariances)


def _full_covariances(q: Variational) -> Tensor:
    """E[Λ_k]^-1 as (K, D, D) matrices."""
    k, d = q.means.shape
    return COVARIANCE_TYPES[q.covariance].to_full(q.covariances, k, d)


def expected_log_joint(x: Tensor, q: Variational) -> Tensor:
    """log ρ_nk = E_q[log π_k + log N(x_n | μ_k, Λ_k^-1)] for x (N, D); returns (N, K).

    The model's Gaussian density at the plug-in E[Λ_k] plus what the expectation adds:
    ½ (E[log |Λ_k|] - log |E[Λ_k]|) and -D / (2 β_k) from the spread of μ_k.
    """
    d = x.shape[1]
    log_gauss = gaussian_log_prob(x, q.means, precision_cholesky(_full_covariances(q)))
    gap = COVARIANCE_TYPES[q.covariance].log_det_gap(q.degrees_of_freedom, d)
    log_weights = WEIGHT_FAMILIES[q.weight_prior].expected_log(q.weight_concentration)
    return log_weights + log_gauss + 0.5 * gap - 0.5 * d / q.mean_precision


def elbo_global(q: Variational, prior: ConjugatePrior) -> Tensor:
    """E_q[log p(π, μ, Λ) - log q(π, μ, Λ)] = -KL(q(π) || p(π)) - KL(q(μ, Λ) || p(μ, Λ)), a scalar."""
    d = q.means.shape[1]
    c0 = prior.covariance_prior.to(q.means)
    beta_ratio = prior.mean_precision / q.mean_precision
    # E_q(Λ)[KL(N(m_k, (β_k Λ_k)^-1) || N(m0, (β0 Λ_k)^-1))]
    prec_chol = precision_cholesky(_full_covariances(q))
    deviation = torch.einsum("kd,kde->ke", q.means - prior.mean_prior.to(q.means), prec_chol)
    mahalanobis = (deviation**2).sum(-1)
    spread = d * (beta_ratio - 1.0 - torch.log(beta_ratio))
    kl_means = 0.5 * (spread + prior.mean_precision * mahalanobis).sum()
    kl_precisions = COVARIANCE_TYPES[q.covariance].variational_kl(
        q.degrees_of_freedom, q.covariances, prior.degrees_of_freedom, c0, d
    )
    kl_weights = WEIGHT_FAMILIES[q.weight_prior].kl(q.weight_concentration, prior.weight_concentration)
    return -(kl_weights + kl_means + kl_precisions)


def _elbo_local(log_resp: Tensor, log_rho: Tensor) -> Tensor:
    """Σ_n Σ_k q(z_n = k) (log ρ_nk - log q(z_n = k)): E_q[log p(X, Z | θ)] + H[q(Z)]."""
    resp = log_resp.exp()
    return torch.where(resp > 0, resp * (log_rho - log_resp), 0.0).sum()


def elbo(x: Tensor, log_resp: Tensor, q: Variational, prior: ConjugatePrior) -> Tensor:
    """The ELBO in nats, summed over x (N, D), of any q(z) = exp(log_resp) (N, K) and q(θ) = q:
    E_q[log p(X, Z, π, μ, Λ)] - E_q[log q(Z, π, μ, Λ)], every constant included."""
    return _elbo_local(log_resp, expected_log_joint(x, q)) + elbo_global(q, prior)


class CAVIState(NamedTuple):
    """What carries across sweeps: q(θ) and the expectations of the next E-step."""

    posterior: Posterior
    log_rho: Tensor  # (N, K): E_q[log p(x_n, z_n = k | θ)]; its softmax over k is the next q(z)


def next_log_resp(state: CAVIState) -> Tensor:
    """log q(z_n = k) optimal given q(θ): (N, K)."""
    return state.log_rho - torch.logsumexp(state.log_rho, dim=1, keepdim=True)


def cavi_update(
    x: Tensor, log_resp: Tensor, prior: ConjugatePrior, covariance: str, reg_covar: float
) -> tuple[CAVIState, Tensor]:
    """q(θ) ← its optimum given q(z) = exp(log_resp) (N, K); returns the new state and the
    ELBO of (q(z), q(θ)) in nats, summed over points."""
    posterior = variational_m_step(x, log_resp.exp(), prior, covariance, reg_covar)
    log_rho = expected_log_joint(x, posterior)
    return CAVIState(posterior, log_rho), _elbo_local(log_resp, log_rho) + elbo_global(posterior, prior)


# ---- mixtures with conjugate priors: the same two updates through the model's hooks -------------


def conjugate_elbo(model: ConjugateVB, x: Tensor, log_resp: Tensor, q: ConjugatePosterior) -> Tensor:
    """The ELBO in nats, summed over x (N, D), of any q(z) = exp(log_resp) (N, K) and q(π) q(θ) = q:
    E_q[log p(X, Z, π, θ)] - E_q[log q(Z, π, θ)], every constant included."""
    return _elbo_local(log_resp, model.variational_log_joint(x, q)) - model.variational_kl(q)


def conjugate_update(model: ConjugateVB, x: Tensor, log_resp: Tensor) -> tuple[CAVIState, Tensor]:
    """q(π) q(θ) ← its optimum given q(z) = exp(log_resp) (N, K); returns the new state and the
    ELBO of (q(z), q(π) q(θ)) in nats, summed over points."""
    posterior = model.variational_update(x, log_resp.exp())
    log_rho = model.variational_log_joint(x, posterior)
    return CAVIState(posterior, log_rho), _elbo_local(log_resp, log_rho) - model.variational_kl(posterior)


# ---- the loop ---------------------------------------------------------------------------------


def point_estimate(q: Variational) -> Params:
    """weights E[π] (normalized: the truncated sticks leave mass off the K components), means
    E[μ_k] = m_k, and covariances E[Λ_k]^-1 = (ν_k W_k)^-1 (scikit-learn's ``covariances_``;
    not E[Λ_k^-1] = W_k^-1 / (ν_k - D - 1), which need not exist)."""
    weights = WEIGHT_FAMILIES[q.weight_prior].expected(q.weight_concentration)
    return {"weights": weights / weights.sum(), "means": q.means, "covariances": _full_covariances(q)}


def _point_estimate(model: LatentModel, q: Posterior) -> Params:
    if isinstance(model, ConjugateVB):
        assert isinstance(q, ConjugatePosterior)
        return model.posterior_mean(q)
    assert isinstance(q, Variational)
    return point_estimate(q)


@dataclass(frozen=True)
class CAVIFit:
    posterior: Posterior
    elbo: float  # per point, every constant included
    n_steps: int
    converged: bool


Update = Callable[[int, Tensor], tuple[CAVIState, Tensor]]
"""(step, log q(z) (N, K)) -> the state of q(θ) optimal given q(z), and the ELBO summed over points."""


def _update(model: LatentModel, x: Tensor, regularization: float) -> Update:
    if isinstance(model, ConjugateVB):
        return lambda step, log_resp: conjugate_update(model, x, log_resp)
    assert isinstance(model, GaussianMixture) and model.prior is not None
    prior = model.prior

    def update(step: int, log_resp: Tensor) -> tuple[CAVIState, Tensor]:
        try:
            return cavi_update(x, log_resp, prior, model.covariance, regularization)
        except torch.linalg.LinAlgError:
            raise FitError(
                f"step {step}: a covariance matrix is not positive definite. Increase "
                "backends.vb.reg_covar, set data.standardize: true, or lower model.k."
            ) from None

    return update


def run_cavi(
    model: LatentModel,
    x: Tensor,
    init: Params,
    options: VBOptions,
    on_step: Callable[[int, Posterior, float], None] = lambda step, q, elbo: None,
) -> CAVIFit:
    """CAVI for a gmm or a ``ConjugateVB`` model with a prior, from the responsibilities of
    ``init`` under the model, until the ELBO per point changes by less than ``tol`` or after
    ``max_iter`` sweeps; ``on_step`` sees each q(θ) and its ELBO per point (step 0: q(θ) fitted
    to the initial responsibilities)."""
    n = x.shape[0]
    params = {name: value.to(x) for name, value in init.items()}
    log_resp = e_step(model, x, params)[1]
    update = _update(model, x, reg_covar(model, options.reg_covar))
    previous: float | None = None
    converged = False
    for step in range(options.max_iter + 1):
        state, total = update(step, log_resp)
        per_point = float(total) / n
        if not math.isfinite(per_point):
            raise FitError(f"step {step}: the ELBO is {per_point}. {fixes(model, 'vb')}")
        on_step(step, state.posterior, per_point)
        if previous is not None and abs(per_point - previous) < options.tol:
            converged = True
            break
        previous = per_point
        log_resp = next_log_resp(state)
    return CAVIFit(state.posterior, per_point, step, converged)


def _sample_gmm_posterior(model: GaussianMixture, q: Variational) -> None:
    """The gmm's global sites drawn from q(π) q(μ, Λ) with ``pyro.sample``."""
    k, d = q.means.shape
    kind = COVARIANCE_TYPES[q.covariance]
    precision_posterior = kind.variational_distribution(q.degrees_of_freedom, q.covariances, d)
    if not model.stick_breaking:
        pyro.sample("weights", dist.Dirichlet(q.weight_concentration))
    if kind.shared:
        precision = pyro.sample("precision", precision_posterior)
    with pyro.plate("components", k):
        if model.stick_breaking:
            pyro.sample("sticks", dist.Beta(q.weight_concentration[0], q.weight_concentration[1]))
        if not kind.shared:
            precision = pyro.sample("precision", precision_posterior)
        full_precision = q.mean_precision[:, None, None] * model.full_precision(precision)
        pyro.sample("locs", dist.MultivariateNormal(q.means, precision_matrix=full_precision))


def variational_guide(model: LatentModel, q: Posterior, resp: Tensor | None = None) -> Callable[..., None]:
    """A Pyro guide of exactly the CAVI families of a gmm or a ``ConjugateVB`` model, fixed at
    q(θ) = q and, when given, q(z) = resp (N, K) enumerated: with it Pyro's ``TraceEnum_ELBO``
    estimates the same ELBO, and its draws are draws from the variational posterior."""

    def guide(x: Tensor | None = None) -> None:
        # global variables
        if isinstance(model, ConjugateVB):
            assert isinstance(q, ConjugatePosterior)
            model.sample_posterior(q)
        else:
            assert isinstance(model, GaussianMixture) and isinstance(q, Variational)
            _sample_gmm_posterior(model, q)

        # local variables
        if resp is not None and x is not None:
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Categorical(resp), infer={"enumerate": "parallel"})

    return guide


def posterior_draws(model: LatentModel, q: Posterior, num: int) -> list[Params]:
    """``num`` parameter draws from the variational posterior q(θ)."""
    guide = variational_guide(model, q)
    draws: list[Params] = []
    with warnings.catch_warnings():
        # torch's Wishart warns when a Bartlett draw is numerically singular, and draws again
        warnings.filterwarnings("ignore", "Singular sample detected")
        for _ in range(num):
            trace = poutine.trace(guide).get_trace()
            sites = {
                name: cast(Tensor, node["value"])
                for name, node in trace.nodes.items()
                if node["type"] == "sample"
            }
            draw = dict(model.from_sites(sites))
            draw["weights"] = draw["weights"] / draw["weights"].sum()  # the kept sticks leave mass
            draws.append(draw)
    return draws


VB_MODELS = (GaussianMixture, ConjugateVB)  # the models whose CAVI updates are derived here


@BACKENDS.register("vb")
class VB(Backend[VBOptions]):
    name = "vb"
    options = VBOptions
    variational = True

    def check(self, model: LatentModel, options: VBOptions) -> None:
        refuse_sequences(model, self.name, "its variational Bayes is not derived yet")
        if not isinstance(model, VB_MODELS):
            derived = ", ".join(name for name in MODELS if issubclass(MODELS.get(name), VB_MODELS))
            raise UserError(
                f"backends.vb: coordinate-ascent VB is derived for mixtures with conjugate priors "
                f"({derived}), but model.name is {model.name!r}. Use one of them, or the svi backend."
            )
        if not model.has_prior:
            raise UserError(
                "backends.vb: variational Bayes approximates a posterior, which needs a proper "
                "prior over the parameters; with model.prior: none the prior is flat and improper. "
                "Set model.prior: conjugate, or use the em backend for maximum likelihood."
            )

    def total_steps(self, options: VBOptions, n: int | None = None) -> int:
        return options.max_iter

    def objective_is_target(self, options: VBOptions) -> bool:
        return True  # CAVI's ELBO is exact: every expectation in closed form

    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: VBOptions, report: Report
    ) -> FitResult:
        start = time.perf_counter()
        scoring = 0.0  # the exact log-likelihood of each step's estimate is not the algorithm's cost

        def on_step(step: int, q: Posterior, elbo: float) -> None:
            nonlocal scoring
            began = time.perf_counter()
            seconds = began - start - scoring
            log_likelihood = float(model.log_likelihood(x, _point_estimate(model, q)).mean())
            scoring += time.perf_counter() - began
            report(StepInfo(step, seconds, elbo, log_likelihood))

        fit = run_cavi(model, x, init, options, on_step)
        seconds = time.perf_counter() - start - scoring
        params = _point_estimate(model, fit.posterior)
        pruned = [k for k, w in enumerate(params["weights"].tolist()) if w < options.prune_threshold]
        try:
            draws = posterior_draws(model, fit.posterior, options.posterior_samples)
        except (ValueError, torch.linalg.LinAlgError) as exc:  # Pyro's checks of q(θ)'s parameters
            gmm = ", increase backends.vb.reg_covar, or set data.standardize: true"
            raise FitError(
                f"step {fit.n_steps}: the variational posterior cannot be sampled ({one_line(exc)}). "
                f"Use dtype: float64{gmm if 'reg_covar' in model.backend_fields else ''}."
            ) from None
        return FitResult(
            params=params,
            n_steps=fit.n_steps,
            converged=fit.converged,
            fit_seconds=seconds,
            point_estimate="posterior_mean",
            elbo=fit.elbo,
            extras={"effective_k": model.k - len(pruned), "pruned": pruned},
            tensors={"posterior": posterior_moments(model, draws, init)},
        )
