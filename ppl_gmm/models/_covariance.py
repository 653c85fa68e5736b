"""The Gaussian mixture's covariance types, one object each: how a type stores its covariances
(the native shape), estimates them (scatter and divisor), counts its parameters, and declares its
precisions' prior. ``COVARIANCE_TYPES`` picks one by name, once; nothing else compares the names.

Native shapes: full (K, D, D), tied (D, D), diag (K, D), spherical (K,). The scatter about means
is Σ_n r_nk (x_n - μ_k)(x_n - μ_k)^T in the native shape; the maximum-likelihood covariance is
the scatter over ``ml_count``, the posterior mode under the conjugate prior (scatter + W0^-1
+ β0 (μ_k - m0)(...)^T) over ``map_count``.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import constraints

from ._gmm_em import unvech
from .base import Flat

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
        return dist.Wishart(nu0, precision_matrix=c0).expand((k,))

    def prior_scale(self, c0: Tensor, d: int) -> Tensor:
        """What the prior adds to the scatter, as a full (D, D) matrix."""
        return c0

    def default_scale(self, empirical: Tensor) -> Tensor:
        """The data-based default of W0^-1 in the native shape, from the (D, D) covariance."""
        return empirical

    def check_degrees_of_freedom(self, nu0: float, d: int) -> str | None:
        """Why ν0 is not allowed, or None."""
        return f"a Wishart prior needs more than D - 1 = {d - 1}" if nu0 <= d - 1 else None


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
        return dist.Wishart(nu0, precision_matrix=c0)


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


COVARIANCE_TYPES: dict[str, CovarianceType] = {
    "full": CovarianceType(),
    "tied": Tied(),
    "diag": Diag(),
    "spherical": Spherical(),
}
