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

And for a hidden Markov model over one of those mixtures' components (MacKay's variational
Bayesian HMM): q(start) and each transition row Dirichlet, the emissions' q(θ) the mixture's,
and q(z) over whole state sequences by the forward–backward recursions.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator
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
from ..models._hmm import EStep, forward_backward
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
from ..models.hmm import HiddenMarkovModel
from .base import (
    BACKENDS,
    Backend,
    FitError,
    FitResult,
    Options,
    Report,
    StepInfo,
    one_line,
)
from .em import e_step, fixes, reg_covar

__all__ = [
    "CAVIFit",
    "CAVIState",
    "CAVISweep",
    "HMMPosterior",
    "Posterior",
    "VB",
    "VBOptions",
    "Variational",
    "WEIGHT_FAMILIES",
    "cavi_update",
    "components_kl",
    "conjugate_elbo",
    "conjugate_update",
    "elbo",
    "elbo_global",
    "expected_log_density",
    "expected_log_joint",
    "hmm_expected_logs",
    "hmm_point_estimate",
    "hmm_variational_e_step",
    "hmm_variational_kl",
    "hmm_variational_update",
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
    # a component whose expected share of the data (E[π_k]; a hidden Markov model's state: of the
    # time steps) is below it is reported as pruned
    prune_threshold: float = Field(1e-2, ge=0, lt=1)
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


def expected_log_density(x: Tensor, q: Variational) -> Tensor:
    """E_q[log N(x_n | μ_k, Λ_k^-1)] for x (N, D); returns (N, K).

    The model's Gaussian density at the plug-in E[Λ_k] plus what the expectation adds:
    ½ (E[log |Λ_k|] - log |E[Λ_k]|) and -D / (2 β_k) from the spread of μ_k.
    """
    d = x.shape[1]
    log_gauss = gaussian_log_prob(x, q.means, precision_cholesky(_full_covariances(q)))
    gap = COVARIANCE_TYPES[q.covariance].log_det_gap(q.degrees_of_freedom, d)
    return log_gauss + 0.5 * gap - 0.5 * d / q.mean_precision


def expected_log_joint(x: Tensor, q: Variational) -> Tensor:
    """log ρ_nk = E_q[log π_k + log N(x_n | μ_k, Λ_k^-1)] for x (N, D); returns (N, K)."""
    log_weights = WEIGHT_FAMILIES[q.weight_prior].expected_log(q.weight_concentration)
    return log_weights + expected_log_density(x, q)


def elbo_global(q: Variational, prior: ConjugatePrior) -> Tensor:
    """E_q[log p(π, μ, Λ) - log q(π, μ, Λ)] = -KL(q(π) || p(π)) - KL(q(μ, Λ) || p(μ, Λ)), a scalar."""
    kl_weights = WEIGHT_FAMILIES[q.weight_prior].kl(q.weight_concentration, prior.weight_concentration)
    return -(kl_weights + components_kl(q, prior))


def components_kl(q: Variational, prior: ConjugatePrior) -> Tensor:
    """KL(q(μ, Λ) || p(μ, Λ)), a scalar: the components' part of -``elbo_global``."""
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
    return kl_means + kl_precisions


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


# ---- hidden Markov models: MacKay's variational Bayesian HMM ----------------------------------
#
# q(start) q(A) q(θ) q(z): q(start) and each row of q(A) Dirichlet, q(θ) the emission mixture's
# component families (its q(π) unused), q(z) over whole state sequences. Given q(start) q(A) q(θ),
# the optimal q(z) ∝ exp E_q[log p(x, z | start, A, θ)] is a Markov chain: the forward–backward
# recursions at the sub-normalized start* = exp E[log start], A* = exp E[log A] and emission
# densities exp E[log p(x_t | θ_k)] give its marginals, its expected counts, and its normalizer
# Z̃ = Σ_z exp E_q[log p(x, z | ·)], whence the ELBO at that q(z): log Z̃ - KL(q(start, A, θ) || p).
# Given q(z), each Dirichlet adds the expected counts to its prior and q(θ) is the mixture's update
# with the smoothed state probabilities as responsibilities (MacKay 1997; Beal 2003, ch. 3).


@dataclass(frozen=True)
class HMMPosterior:
    """q(start) q(A) q(θ) of a hidden Markov model with conjugate priors.

    start        (K,) the concentration of q(start) = Dirichlet
    transitions  (K, K) row i: the concentration of q(A_i·) = Dirichlet (the row moved from)
    emissions    q(θ) of the emission mixture's components (its q(π) part not used)
    """

    start: Tensor
    transitions: Tensor
    emissions: Variational | ConjugatePosterior


def _emission_update(model: HiddenMarkovModel, x: Tensor, resp: Tensor, regularization: float) -> Posterior:
    emission = model.emission
    if isinstance(emission, ConjugateVB):
        return emission.variational_update(x, resp)
    return variational_m_step(x, resp, emission.prior, emission.covariance, regularization)


def _emission_expected_log(model: HiddenMarkovModel, x: Tensor, q: Posterior) -> Tensor:
    """E_q[log p(x_n | θ_k)] (N, K)."""
    if isinstance(q, ConjugatePosterior):
        return cast(Tensor, model.emission.expected_log_density(x, q))
    return expected_log_density(x, q)


def _emission_kl(model: HiddenMarkovModel, q: Posterior) -> Tensor:
    if isinstance(q, ConjugatePosterior):
        return cast(Tensor, model.emission.components_kl(q))
    return components_kl(q, model.emission.prior)


def _emission_mean(model: HiddenMarkovModel, q: Posterior) -> Params:
    if isinstance(q, ConjugatePosterior):
        return {model.emission.component_site: model.emission.component_mean(q)}
    return {"means": q.means, "covariances": _full_covariances(q)}


def hmm_variational_update(
    model: HiddenMarkovModel, x: Tensor, estep: EStep, regularization: float = 0.0
) -> HMMPosterior:
    """q(start) q(A) q(θ) optimal given the q(z) whose sums ``estep`` holds."""
    return HMMPosterior(
        model.start_concentration + estep.first,
        model.transition_concentration + estep.transitions,
        _emission_update(model, x, estep.posteriors, regularization),
    )


def hmm_expected_logs(model: HiddenMarkovModel, x: Tensor, q: HMMPosterior) -> tuple[Tensor, Tensor, Tensor]:
    """E_q[log start] (K,), E_q[log A] (K, K) and E_q[log p(x_n | θ_k)] (N, K): the optimal q(z) is
    the Markov chain of the HMM at these log-parameters (sub-normalized)."""
    return (
        dirichlet_expected_log(q.start),
        dirichlet_expected_log(q.transitions),
        _emission_expected_log(model, x, q.emissions),
    )


def hmm_variational_e_step(model: HiddenMarkovModel, x: Tensor, q: HMMPosterior) -> EStep:
    """The q(z) optimal given q: its sums over the data, and as ``log_likelihood`` log Z̃."""
    log_start, log_transitions, log_emission = hmm_expected_logs(model, x, q)
    return forward_backward(
        log_emission, model.sequence_lengths(x.shape[0]), torch.exp(log_start), torch.exp(log_transitions)
    )


def hmm_variational_kl(model: HiddenMarkovModel, q: HMMPosterior) -> Tensor:
    """KL(q(start) q(A) q(θ) || p(start) p(A) p(θ)), a scalar."""
    return (
        dirichlet_kl(q.start, model.start_concentration)
        + dirichlet_kl(q.transitions, model.transition_concentration)
        + _emission_kl(model, q.emissions)
    )


def hmm_point_estimate(model: HiddenMarkovModel, q: HMMPosterior) -> Params:
    """E_q[start], E_q[A], and the emissions' point estimate as the mixture's."""
    return {
        "start": dirichlet_mean(q.start),
        "transitions": q.transitions / q.transitions.sum(1, keepdim=True),
        **_emission_mean(model, q.emissions),
    }


# ---- the loop ---------------------------------------------------------------------------------


def point_estimate(q: Variational) -> Params:
    """weights E[π] (normalized: the truncated sticks leave mass off the K components), means
    E[μ_k] = m_k, and covariances E[Λ_k]^-1 = (ν_k W_k)^-1 (scikit-learn's ``covariances_``;
    not E[Λ_k^-1] = W_k^-1 / (ν_k - D - 1), which need not exist)."""
    weights = WEIGHT_FAMILIES[q.weight_prior].expected(q.weight_concentration)
    return {"weights": weights / weights.sum(), "means": q.means, "covariances": _full_covariances(q)}


def _point_estimate(model: LatentModel, q: Posterior | HMMPosterior) -> Params:
    if isinstance(q, HMMPosterior):
        assert isinstance(model, HiddenMarkovModel)
        return hmm_point_estimate(model, q)
    if isinstance(model, ConjugateVB):
        assert isinstance(q, ConjugatePosterior)
        return model.posterior_mean(q)
    assert isinstance(q, Variational)
    return point_estimate(q)


@dataclass(frozen=True)
class CAVIFit:
    posterior: Posterior | HMMPosterior
    elbo: float  # per point, every constant included
    n_steps: int
    converged: bool
    occupancy: Tensor  # (K,) each component's expected share of the data, as ``CAVISweep``'s


class CAVISweep(NamedTuple):
    """One coordinate-ascent sweep's q(θ), its ELBO summed over points, and each component's
    expected share of the data (K,): E_q[π] for a mixture; for a hidden Markov model the mean over
    time steps of q(z_t = k)."""

    posterior: Posterior | HMMPosterior
    elbo: Tensor
    occupancy: Tensor


def _singular(step: int) -> FitError:
    return FitError(
        f"step {step}: a covariance matrix is not positive definite. Increase "
        "backends.vb.reg_covar, set data.standardize: true, or lower model.k."
    )


def _mixture_sweeps(
    model: LatentModel, x: Tensor, init: Params, regularization: float
) -> Iterator[CAVISweep]:
    """q(θ) ← its optimum given q(z), then q(z) ← its optimum given q(θ), from the
    responsibilities of ``init``; the ELBO is that of the q(z) q(θ) was fitted to."""
    log_resp = e_step(model, x, init)[1]
    for step in itertools.count():
        if isinstance(model, ConjugateVB):
            state, total = conjugate_update(model, x, log_resp)
        else:
            assert isinstance(model, GaussianMixture) and model.prior is not None
            try:
                state, total = cavi_update(x, log_resp, model.prior, model.covariance, regularization)
            except torch.linalg.LinAlgError:
                raise _singular(step) from None
        yield CAVISweep(state.posterior, total, _point_estimate(model, state.posterior)["weights"])
        log_resp = next_log_resp(state)


def _hmm_sweeps(
    model: HiddenMarkovModel, x: Tensor, init: Params, regularization: float
) -> Iterator[CAVISweep]:
    """q(start) q(A) q(θ) ← its optimum given q(z), then q(z) ← its optimum given those, from the
    smoothed posterior of ``init``; the ELBO is that of the new q(z), log Z̃ - KL."""
    estep = model.e_step(x, init)
    for step in itertools.count():
        try:
            q = hmm_variational_update(model, x, estep, regularization)
        except torch.linalg.LinAlgError:
            raise _singular(step) from None
        estep = hmm_variational_e_step(model, x, q)
        total = estep.log_likelihood - hmm_variational_kl(model, q)
        yield CAVISweep(q, total, estep.posteriors.mean(0))


def run_cavi(
    model: LatentModel,
    x: Tensor,
    init: Params,
    options: VBOptions,
    on_step: Callable[[int, CAVISweep, float], None] = lambda step, sweep, elbo: None,
) -> CAVIFit:
    """CAVI for a gmm, a ``ConjugateVB`` model or a hidden Markov model over one of them, with a
    prior, from the posterior of the states under ``init``, until the ELBO per point changes by
    less than ``tol`` or after ``max_iter`` sweeps; ``on_step`` sees each sweep and its ELBO per
    point (step 0: q(θ) fitted to the initial posterior)."""
    n = x.shape[0]
    params = {name: value.to(x) for name, value in init.items()}
    regularization = reg_covar(model, options.reg_covar)
    if isinstance(model, HiddenMarkovModel):
        sweeps = _hmm_sweeps(model, x, params, regularization)
    else:
        sweeps = _mixture_sweeps(model, x, params, regularization)
    previous: float | None = None
    converged = False
    for step, sweep in zip(range(options.max_iter + 1), sweeps, strict=False):
        per_point = float(sweep.elbo) / n
        if not math.isfinite(per_point):
            raise FitError(f"step {step}: the ELBO is {per_point}. {fixes(model, 'vb')}")
        on_step(step, sweep, per_point)
        if previous is not None and abs(per_point - previous) < options.tol:
            converged = True
            break
        previous = per_point
    return CAVIFit(sweep.posterior, per_point, step, converged, sweep.occupancy)


def _sample_gmm_posterior(
    model: GaussianMixture, q: Variational, components: pyro.plate | None = None
) -> None:
    """The gmm's global sites drawn from q(π) q(μ, Λ) with ``pyro.sample``; given the plate
    ``components`` of a declaration that entered it already, only the components' (a hidden
    Markov model's emissions)."""
    weights = components is None
    k, d = q.means.shape
    kind = COVARIANCE_TYPES[q.covariance]
    precision_posterior = kind.variational_distribution(q.degrees_of_freedom, q.covariances, d)
    if weights and not model.stick_breaking:
        pyro.sample("weights", dist.Dirichlet(q.weight_concentration))
    if kind.shared:
        precision = pyro.sample("precision", precision_posterior)
    with pyro.plate("components", k) if components is None else components:
        if weights and model.stick_breaking:
            pyro.sample("sticks", dist.Beta(q.weight_concentration[0], q.weight_concentration[1]))
        if not kind.shared:
            precision = pyro.sample("precision", precision_posterior)
        full_precision = q.mean_precision[:, None, None] * model.full_precision(precision)
        pyro.sample("locs", dist.MultivariateNormal(q.means, precision_matrix=full_precision))


def variational_guide(
    model: LatentModel, q: Posterior | HMMPosterior, resp: Tensor | None = None
) -> Callable[..., None]:
    """A Pyro guide of exactly the CAVI families of a gmm, a ``ConjugateVB`` model or a hidden
    Markov model over one of them, fixed at q(θ) = q and, for a mixture when given, q(z) = resp
    (N, K) enumerated: with it Pyro's ``TraceEnum_ELBO`` estimates the same ELBO, and its draws are
    draws from the variational posterior."""

    def guide(x: Tensor | None = None) -> None:
        # global variables
        if isinstance(q, HMMPosterior):
            assert isinstance(model, HiddenMarkovModel)
            pyro.sample("start", dist.Dirichlet(q.start))
            components = pyro.plate("components", model.k)  # one plate, entered again, as declared
            with components:
                pyro.sample("transitions", dist.Dirichlet(q.transitions))
            _sample_posterior(model.emission, q.emissions, components)
        else:
            _sample_posterior(model, q)

        # local variables
        if resp is not None and x is not None:
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Categorical(resp), infer={"enumerate": "parallel"})

    return guide


def _sample_posterior(model: LatentModel, q: Posterior, components: pyro.plate | None = None) -> None:
    if isinstance(model, ConjugateVB):
        assert isinstance(q, ConjugatePosterior)
        model.sample_posterior(q, components)
    else:
        assert isinstance(model, GaussianMixture) and isinstance(q, Variational)
        _sample_gmm_posterior(model, q, components)


def posterior_draws(model: LatentModel, q: Posterior | HMMPosterior, num: int) -> list[Params]:
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
            if "weights" in draw:
                draw["weights"] = draw["weights"] / draw["weights"].sum()  # the kept sticks leave mass
            draws.append(draw)
    return draws


VB_MODELS = (GaussianMixture, ConjugateVB)  # the mixtures whose CAVI updates are derived here


def _derived(model: LatentModel) -> bool:
    """Whether CAVI is derived here for ``model``: one of ``VB_MODELS``, or a hidden Markov model
    whose emissions are their components."""
    if isinstance(model, HiddenMarkovModel):
        return isinstance(model.emission, VB_MODELS)
    return isinstance(model, VB_MODELS)


@BACKENDS.register("vb")
class VB(Backend[VBOptions]):
    name = "vb"
    options = VBOptions
    variational = True

    def check(self, model: LatentModel, options: VBOptions) -> None:
        if not _derived(model):
            derived = ", ".join(
                name for name in MODELS if issubclass(MODELS.get(name), (*VB_MODELS, HiddenMarkovModel))
            )
            raise UserError(
                f"backends.vb: coordinate-ascent VB is derived for mixtures with conjugate priors and "
                f"hidden Markov models over them ({derived}), but model.name is {model.name!r}. Use one "
                "of them, or the svi backend."
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

        def on_step(step: int, sweep: CAVISweep, elbo: float) -> None:
            nonlocal scoring
            began = time.perf_counter()
            seconds = began - start - scoring
            log_likelihood = float(model.log_likelihood(x, _point_estimate(model, sweep.posterior)).mean())
            scoring += time.perf_counter() - began
            report(StepInfo(step, seconds, elbo, log_likelihood))

        fit = run_cavi(model, x, init, options, on_step)
        seconds = time.perf_counter() - start - scoring
        params = _point_estimate(model, fit.posterior)
        pruned = [k for k, w in enumerate(fit.occupancy.tolist()) if w < options.prune_threshold]
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
