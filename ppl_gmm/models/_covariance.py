"""The Gaussian mixture's covariance types, one object each: how a type stores its covariances
(the native shape), estimates them (scatter and divisor), counts its parameters, declares its
precisions' prior, and gives their variational posterior q(Λ) for coordinate-ascent VB (stored as
(ν, covariances = E_q[Λ]^-1), as scikit-learn's BayesianGaussianMixture stores it).
``COVARIANCE_TYPES`` picks one by name, once; nothing else compares the names.

Native shapes: full (K, D, D), tied (D, D), diag (K, D), spherical (K,). The scatter about means
is Σ_n r_nk (x_n - μ_k)(x_n - μ_k)^T in the native shape; the maximum-likelihood covariance is
the scatter over ``ml_count``, the posterior mode under the conjugate prior (scatter + W0^-1
+ β0 (μ_k - m0)(...)^T) over ``map_count``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import Gamma, constraints, kl_divergence

from ._gmm_em import unvech
from .base import Flat
from .distributions import Wishart

__all__ = ["COVARIANCE_TYPES", "CovarianceType", "Moments"]


class Moments(NamedTuple):
    """The statistics the M-step reads, of points measured from the fit's center: nk (K,)
    Σ r_nk; sums (K, D) Σ r_nk x_n; second: full (K, D(D+1)/2) Σ r_nk φ(x_n), tied (D(D+1)/2,)
    Σ φ(x_n), diag and spherical (K, D) Σ r_nk x_n², with φ in ``_gmm_em``'s order."""

    nk: Tensor
    sums: Tensor
    second: Tensor


def _eye_like(d: int, ref: Tensor) -> Tensor:
    return torch.eye(d, dtype=ref.dtype, device=ref.device)


def _symmetric(matrices: Tensor) -> Tensor:
    """Matrix products of symmetric results round their two triangles differently; Pyro's
    Wishart checks symmetry, to about 1e-5 relative."""
    return 0.5 * (matrices + matrices.mT)


def _matrix_log_det(matrices: Tensor) -> Tensor:
    return 2.0 * torch.log(torch.diagonal(torch.linalg.cholesky(matrices), dim1=-2, dim2=-1)).sum(-1)


class CovarianceType:
    """Full covariances, one (D, D) matrix per component, with a Wishart prior on each precision."""

    kernel = "quadratic"  # the E-step's features φ: products x_i x_j ("diag": squares x_i²)
    weighted_second = True  # the second-moment statistic weighted by the responsibilities
    shared = False  # one covariance for all components (the precision site outside the plate)

    def native(self, covariances: Tensor) -> Tensor:
        """The native shape of full covariances (K, D, D) (or a batch of them)."""
        return covariances

    def to_full(self, native: Tensor, k: int, d: int) -> Tensor:
        return native

    def scatter(self, x: Tensor, resp: Tensor, nk: Tensor, means: Tensor, xtx: Tensor) -> Tensor:
        """The scatter of x (N, D) about means (K, D) with responsibilities resp (N, K); xtx
        (D, D) is x^T x (used by tied)."""
        out = torch.empty(means.shape[0], x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
        for k in range(means.shape[0]):
            diff = x - means[k]
            out[k] = (resp[:, k, None] * diff).T @ diff
        return out

    def scatter_stats(self, stats: Moments, means: Tensor) -> Tensor:
        """The scatter about means (K, D) from the statistics alone."""
        second = unvech(stats.second, means.shape[1])
        cross = means[:, :, None] * stats.sums[:, None, :]
        return second - cross - cross.mT + stats.nk[:, None, None] * means[:, :, None] * means[:, None, :]

    def ml_count(self, nk: Tensor, d: int) -> Tensor:
        return nk[:, None, None]

    def map_count(self, nk: Tensor, d: int, k: int, nu0: float) -> Tensor:
        return (nu0 - d + nk)[:, None, None]

    def mean_deviation(self, dev: Tensor) -> Tensor:
        """β0's term of the posterior mode for deviations dev (K, D) of the means from m0."""
        return dev[:, :, None] * dev[:, None, :]

    def n_cov_params(self, k: int, d: int) -> int:
        return k * d * (d + 1) // 2

    def flat_prior(self, k: int, d: int) -> dist.TorchDistribution:
        """The improper flat prior of the ``precision`` site."""
        return Flat(constraints.positive_definite, (k,), (d, d))

    def precision_prior(self, nu0: Tensor, c0: Tensor, k: int, d: int) -> dist.TorchDistribution:
        """The conjugate prior of the ``precision`` site, for W0^-1 = c0 in the native shape."""
        return Wishart(nu0, precision_matrix=c0).expand((k,))

    def prior_scale(self, c0: Tensor, d: int) -> Tensor:
        """What the prior adds to the scatter, as a full (D, D) matrix."""
        return c0

    def default_scale(self, empirical: Tensor) -> Tensor:
        """The data-based default of W0^-1 in the native shape, from the (D, D) covariance."""
        return empirical

    def check_degrees_of_freedom(self, nu0: float, d: int) -> str | None:
        """Why ν0 is not allowed, or None."""
        return f"a Wishart prior needs more than D - 1 = {d - 1}" if nu0 <= d - 1 else None

    # variational Bayes: q(Λ_k) = Wishart(ν_k, W_k), stored as ν_k and E[Λ_k]^-1 = (ν_k W_k)^-1

    def variational_posterior(
        self, nk: Tensor, sk: Tensor, dev: Tensor, shrink: Tensor, nu0: float, c0: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(ν, covariances) of q(Λ) optimal given q(z): nk (K,), sk the empirical covariances
        (native), dev (K, D) = x̄_k - m0, shrink (K,) = β0 N_k / β_k, W0^-1 = c0 (native);
        scikit-learn's formulas where they agree."""
        dof = nu0 + nk
        scale = c0 + nk[:, None, None] * sk + shrink[:, None, None] * dev[:, :, None] * dev[:, None, :]
        return dof, _symmetric(scale / dof[:, None, None])

    def log_det_gap(self, dof: Tensor, d: int) -> Tensor:
        """E_q[log |Λ_k|] - log |E_q[Λ_k]|, which does not depend on the covariances."""
        i = torch.arange(d, dtype=dof.dtype, device=dof.device)
        return torch.digamma((dof[..., None] - i) / 2).sum(-1) + d * math.log(2.0) - d * torch.log(dof)

    def variational_kl(self, dof: Tensor, cov: Tensor, nu0: float, c0: Tensor, d: int) -> Tensor:
        """Σ_k KL(q(Λ_k) || p(Λ_k)), a scalar: here KL(W(ν, W) || W(ν0, W0)) for W^-1 = ν cov
        and W0^-1 = c0."""
        log_det_cov = _matrix_log_det(cov)
        e_log_det = self.log_det_gap(dof, d) - log_det_cov
        nu0_t = torch.as_tensor(nu0, dtype=dof.dtype, device=dof.device)
        # log B(W, ν) = -ν/2 log|W| - νD/2 log 2 - log Γ_D(ν/2), the Wishart's log normalizer
        log_norm = 0.5 * dof * (d * torch.log(dof) + log_det_cov - d * math.log(2.0)) - torch.mvlgamma(
            dof / 2, d
        )
        log_norm0 = 0.5 * nu0_t * (_matrix_log_det(c0) - d * math.log(2.0)) - torch.mvlgamma(nu0_t / 2, d)
        trace = torch.diagonal(torch.linalg.solve(cov, c0.expand_as(cov)), dim1=-2, dim2=-1).sum(-1)
        kl = log_norm - log_norm0 + 0.5 * (dof - nu0_t) * e_log_det - 0.5 * dof * d + 0.5 * trace
        return kl.sum()

    def variational_distribution(self, dof: Tensor, cov: Tensor, d: int) -> dist.TorchDistribution:
        """q(Λ) as a distribution of the ``precision`` site."""
        return dist.Wishart(dof, precision_matrix=dof[..., None, None] * cov)  # W^-1 = ν E[Λ]^-1


class Tied(CovarianceType):
    """One (D, D) covariance shared by all components, one Wishart prior on its precision."""

    weighted_second = False
    shared = True

    def native(self, covariances: Tensor) -> Tensor:
        return covariances[..., 0, :, :]

    def to_full(self, native: Tensor, k: int, d: int) -> Tensor:
        return native.expand(k, d, d).clone()

    def scatter(self, x: Tensor, resp: Tensor, nk: Tensor, means: Tensor, xtx: Tensor) -> Tensor:
        cross = means.T @ (resp.T @ x)
        return xtx - cross - cross.T + (nk[:, None] * means).T @ means

    def scatter_stats(self, stats: Moments, means: Tensor) -> Tensor:
        cross = means.T @ stats.sums
        return unvech(stats.second, means.shape[1]) - cross - cross.T + (stats.nk[:, None] * means).T @ means

    def ml_count(self, nk: Tensor, d: int) -> Tensor:
        return nk.sum()

    def map_count(self, nk: Tensor, d: int, k: int, nu0: float) -> Tensor:
        return nu0 - d - 1 + k + nk.sum()

    def mean_deviation(self, dev: Tensor) -> Tensor:
        return dev.T @ dev

    def n_cov_params(self, k: int, d: int) -> int:
        return d * (d + 1) // 2

    def flat_prior(self, k: int, d: int) -> dist.TorchDistribution:
        return Flat(constraints.positive_definite, (), (d, d))

    def precision_prior(self, nu0: Tensor, c0: Tensor, k: int, d: int) -> dist.TorchDistribution:
        return Wishart(nu0, precision_matrix=c0)

    def variational_posterior(
        self, nk: Tensor, sk: Tensor, dev: Tensor, shrink: Tensor, nu0: float, c0: Tensor
    ) -> tuple[Tensor, Tensor]:
        # one Λ for all components: it sees all N points and all K means' deviations
        n = nk.sum()
        dof = nu0 + n
        return dof, _symmetric((c0 + n * sk + (shrink[:, None] * dev).T @ dev) / dof)


class Diag(CovarianceType):
    """A diagonal covariance per component, a Gamma(ν0 / 2, c0 / 2) prior on each precision."""

    kernel = "diag"

    def native(self, covariances: Tensor) -> Tensor:
        return torch.diagonal(covariances, dim1=-2, dim2=-1)

    def to_full(self, native: Tensor, k: int, d: int) -> Tensor:
        return torch.diag_embed(native)

    def scatter(self, x: Tensor, resp: Tensor, nk: Tensor, means: Tensor, xtx: Tensor) -> Tensor:
        return resp.T @ (x * x) - 2.0 * means * (resp.T @ x) + nk[:, None] * means**2

    def scatter_stats(self, stats: Moments, means: Tensor) -> Tensor:
        return stats.second - 2.0 * means * stats.sums + stats.nk[:, None] * means**2

    def ml_count(self, nk: Tensor, d: int) -> Tensor:
        return nk[:, None]

    def map_count(self, nk: Tensor, d: int, k: int, nu0: float) -> Tensor:
        return (nu0 - 1 + nk)[:, None]

    def mean_deviation(self, dev: Tensor) -> Tensor:
        return dev**2

    def n_cov_params(self, k: int, d: int) -> int:
        return k * d

    def flat_prior(self, k: int, d: int) -> dist.TorchDistribution:
        return Flat(constraints.positive, (k,), (d,))

    def precision_prior(self, nu0: Tensor, c0: Tensor, k: int, d: int) -> dist.TorchDistribution:
        return dist.Gamma(nu0 / 2, c0 / 2).expand((k, d)).to_event(1)

    def prior_scale(self, c0: Tensor, d: int) -> Tensor:
        return torch.diag(c0)

    def default_scale(self, empirical: Tensor) -> Tensor:
        return torch.diagonal(empirical).clone()

    def check_degrees_of_freedom(self, nu0: float, d: int) -> str | None:
        return None

    # q(Λ_kd) = Gamma(ν_k / 2, rate ν_k cov_kd / 2) per coordinate

    def variational_posterior(
        self, nk: Tensor, sk: Tensor, dev: Tensor, shrink: Tensor, nu0: float, c0: Tensor
    ) -> tuple[Tensor, Tensor]:
        dof = nu0 + nk
        return dof, (c0 + nk[:, None] * sk + shrink[:, None] * dev**2) / dof[:, None]

    def log_det_gap(self, dof: Tensor, d: int) -> Tensor:
        return d * (torch.digamma(dof / 2) - torch.log(dof / 2))

    def variational_kl(self, dof: Tensor, cov: Tensor, nu0: float, c0: Tensor, d: int) -> Tensor:
        shape = (dof[:, None] / 2).expand_as(cov)
        return kl_divergence(Gamma(shape, shape * cov), Gamma(torch.full_like(c0, nu0 / 2), c0 / 2)).sum()

    def variational_distribution(self, dof: Tensor, cov: Tensor, d: int) -> dist.TorchDistribution:
        shape = (dof[:, None] / 2).expand_as(cov)
        return dist.Gamma(shape, shape * cov).to_event(1)


class Spherical(Diag):
    """One variance per component, a Gamma(D ν0 / 2, D c0 / 2) prior on each precision."""

    def native(self, covariances: Tensor) -> Tensor:
        return torch.diagonal(covariances, dim1=-2, dim2=-1).mean(-1)

    def to_full(self, native: Tensor, k: int, d: int) -> Tensor:
        return native[:, None, None] * _eye_like(d, native)

    def scatter(self, x: Tensor, resp: Tensor, nk: Tensor, means: Tensor, xtx: Tensor) -> Tensor:
        return super().scatter(x, resp, nk, means, xtx).sum(dim=1)

    def scatter_stats(self, stats: Moments, means: Tensor) -> Tensor:
        return super().scatter_stats(stats, means).sum(-1)

    def ml_count(self, nk: Tensor, d: int) -> Tensor:
        return nk * d

    def map_count(self, nk: Tensor, d: int, k: int, nu0: float) -> Tensor:
        return d * (nu0 + 1 + nk) - 2

    def mean_deviation(self, dev: Tensor) -> Tensor:
        return (dev**2).sum(-1)

    def n_cov_params(self, k: int, d: int) -> int:
        return k

    def flat_prior(self, k: int, d: int) -> dist.TorchDistribution:
        return Flat(constraints.positive, (k,), ())

    def precision_prior(self, nu0: Tensor, c0: Tensor, k: int, d: int) -> dist.TorchDistribution:
        return dist.Gamma(d * nu0 / 2, d * c0 / 2).expand((k,))

    def prior_scale(self, c0: Tensor, d: int) -> Tensor:
        # the Gamma(D ν0/2, D c0/2) prior adds D c0 to the summed squared deviations
        return d * c0 * _eye_like(d, c0)

    def default_scale(self, empirical: Tensor) -> Tensor:
        return torch.diagonal(empirical).mean()

    # q(Λ_k) = Gamma(D ν_k / 2, rate D ν_k cov_k / 2), one precision per component

    def variational_posterior(
        self, nk: Tensor, sk: Tensor, dev: Tensor, shrink: Tensor, nu0: float, c0: Tensor
    ) -> tuple[Tensor, Tensor]:
        dof = nu0 + nk
        return dof, (c0 + nk * sk + shrink * (dev**2).mean(1)) / dof

    def log_det_gap(self, dof: Tensor, d: int) -> Tensor:
        return d * (torch.digamma(d * dof / 2) - torch.log(d * dof / 2))

    def variational_kl(self, dof: Tensor, cov: Tensor, nu0: float, c0: Tensor, d: int) -> Tensor:
        shape = d * dof / 2
        prior = Gamma(torch.full_like(c0, d * nu0 / 2), d * c0 / 2)
        return kl_divergence(Gamma(shape, shape * cov), prior).sum()

    def variational_distribution(self, dof: Tensor, cov: Tensor, d: int) -> dist.TorchDistribution:
        shape = d * dof / 2
        return dist.Gamma(shape, shape * cov)


COVARIANCE_TYPES: dict[str, CovarianceType] = {
    "full": CovarianceType(),
    "tied": Tied(),
    "diag": Diag(),
    "spherical": Spherical(),
}
