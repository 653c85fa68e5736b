"""The Gaussian mixture, declared once in Pyro, with what exact EM needs of it.

Global sites of ``GaussianMixture.model``:

    weights    (K,)                 Dirichlet(α0) | flat on the simplex
    sticks     (K,)                 instead of weights, with ``weight_prior: dirichlet_process``:
                                    Beta(1, γ) per component, π_k = v_k Π_{j<k} (1 - v_j)
    precision  full (K, D, D)       Wishart(ν0, W0) | flat on positive-definite matrices
               tied (D, D)          one Wishart(ν0, W0) shared by all components
               diag (K, D)          Gamma(ν0 / 2, rate = c0 / 2) per coordinate
               spherical (K,)       Gamma(D ν0 / 2, rate = D c0 / 2)
    locs       (K, D)               N(m0, (β0 Λ_k)^-1) | flat on R^D

Local sites: ``z`` (Categorical(weights), enumerated) and ``x`` (MultivariateNormal(locs[z],
precision[z])). Under the stick-breaking prior ``z`` is uniform and a factor ``stick_mass`` adds
log π_z + log K: scikit-learn's truncation keeps all K sticks, so the π_k sum to less than one
and are no Categorical's probabilities, yet log p(x_n, z_n = k | θ) = log π_k + log N(x_n | θ_k).
Point estimates of the weights are normalized to sum to one.

``prior: none`` replaces each prior by a flat improper one, so the posterior mode
is the maximum-likelihood estimate. W0^-1 (``covariance_prior``, c0 for diag and spherical)
follows scikit-learn's BayesianGaussianMixture, as do the data-based defaults.

Point estimates hold float64 ``weights`` (K), ``means`` (K, D) and ``covariances`` (K, D, D):
full matrices whatever the covariance type, and consistent with it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch import Tensor
from torch.distributions import constraints

from ..config import HyperConfig, ModelConfig
from ..errors import UserError
from . import transforms  # noqa: F401  (registers biject_to(positive_definite) for guides)
from .base import MODELS, LatentModel, Params

__all__ = [
    "ConjugatePrior",
    "Flat",
    "GaussianMixture",
    "gaussian_log_prob",
    "precision_cholesky",
    "stick_breaking_log_weights",
    "sticks_from_weights",
]


class Flat(dist.ImproperUniform):
    """The improper flat prior of maximum likelihood; its zero log density takes the value's dtype
    (Pyro's ImproperUniform returns the default dtype, which breaks float64 ELBOs)."""

    def log_prob(self, value: Tensor) -> Tensor:
        batch_shape = value.shape[: value.dim() - self.event_dim]
        return value.new_zeros(()).expand(torch.broadcast_shapes(batch_shape, self.batch_shape))


@dataclass(frozen=True)
class ConjugatePrior:
    """Dirichlet–Normal–Wishart hyperparameters (float64).

    covariance_prior is W0^-1 in the covariance type's own shape: full and tied (D, D),
    diag (D,), spherical (). weight_prior ``dirichlet_process`` replaces Dirichlet(γ) on the
    weights by K sticks Beta(1, γ), γ = weight_concentration.
    """

    weight_concentration: float
    mean_precision: float
    mean_prior: Tensor
    degrees_of_freedom: float
    covariance_prior: Tensor
    weight_prior: str = "dirichlet"

    @property
    def stick_breaking(self) -> bool:
        return self.weight_prior == "dirichlet_process"


@dataclass(frozen=True)
class _CovarianceType:
    """How one covariance type stores, estimates and expands its covariances.

    Statistics and kernels for blocked EM are described at ``SufficientStats`` and ``Prepared``.

    scatter(x, resp, nk, means, xtx) -> Σ_n resp[n,k] (x_n - means_k)(...)^T in native shape
    ml_count(nk, n, d) -> the maximum-likelihood divisor of the scatter
    map_count(nk, n, d, k, nu0) -> the posterior-mode divisor (derived in the module docs)
    native(cov_full) -> the native shape of full covariances; to_full: the inverse
    """

    scatter: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    ml_count: Callable[[Tensor, int, int], Tensor]
    map_count: Callable[[Tensor, int, int, int, float], Tensor]
    native: Callable[[Tensor], Tensor]
    to_full: Callable[[Tensor, int, int], Tensor]
    n_cov_params: Callable[[int, int], int]
    mean_deviation: Callable[[Tensor], Tensor]
    # blocked EM: the second-moment statistic, whether it is weighted by the responsibilities
    # (tied sums φ(x) unweighted), and the scatter about any means from the statistics alone;
    # "quadratic" or "diag" picks the features φ of the E-step and the statistics
    second_shape: Callable[[int, int], tuple[int, ...]]
    weighted_second: bool
    scatter_stats: Callable[[SufficientStats, Tensor], Tensor]
    kernel: str


class SufficientStats(NamedTuple):
    """What the M-step needs from the data and the responsibilities, summed over row blocks.

    Everything is of x - shift (a fixed vector, e.g. the data mean, so that second moments do not
    lose digits to large offsets): nk (K,) Σ r_nk; sums (K, D) Σ r_nk (x_n - shift); second: full
    (K, D, D) Σ r_nk (x - shift)(x - shift)^T, tied (D, D) Σ (x - shift)(x - shift)^T, diag and
    spherical (K, D) Σ r_nk (x - shift)²; full keeps each pair i <= j once, (K, D(D+1)/2), and tied
    (D(D+1)/2,), in the order of the features φ(x) (``_offsets``; ``unvech`` lays them out).
    """

    shift: Tensor
    nk: Tensor
    sums: Tensor
    second: Tensor


class _MomentStats(SufficientStats):
    """Statistics whose nk, sums and second are views of one matrix ``raw``, Σ_n r_nk (φ(x_n), 1,
    x_n) in ``weighted_moments``' orientation, so that ``accumulate`` adds a block to all three
    with one GEMM (``new_stats`` makes them for full, diag and spherical). Everything else sees
    plain statistics; those made from them by arithmetic are plain."""

    raw: Tensor


def _offsets(d: int) -> tuple[int, int]:
    """The order of φ(x), the D(D+1)/2 products x_i x_j, i <= j, of a point of dimension D: for
    each offset o = 0, ..., ``spans`` - 1 the D products x_i x_{(i + o) mod D}, i = 0, ..., D - 1,
    then (D even) the ``half`` = D/2 products x_i x_{i + D/2}, i < D/2. Each pair comes once, and
    whole offsets make the features a few large products (``_BlockViews``)."""
    return ((d + 1) // 2, 0) if d % 2 else (d // 2, d // 2)


@functools.cache
def _pairs(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (i, j) of each feature of φ(x), in its order (see ``_offsets``); built once per D and
    device (each EM iteration asks twice), so never to be written to."""
    spans, half = _offsets(d)
    index = torch.arange(d, device=device)
    rows = torch.cat([index.repeat(spans), index[:half]])
    cols = torch.cat([(index + offset) % d for offset in range(spans)] + [index[:half] + half])
    return rows, cols


def wrap_rows(kernel: str, d: int) -> int:
    """How many rows of scratch a design needs after it: the first ``spans`` - 1 coordinates
    again, so that the products of each offset are one strided view (see ``_BlockViews``)."""
    return 0 if kernel == "diag" else _offsets(d)[0] - 1


def unvech(v: Tensor, d: int) -> Tensor:
    """Symmetric (..., D, D) matrices from their features (..., D(D+1)/2), in φ(x)'s order."""
    rows, cols = _pairs(d, v.device)
    out = v.new_zeros(*v.shape[:-1], d, d)
    out[..., rows, cols] = v
    out[..., cols, rows] = v
    return out


def _quadratic_weights(precisions: Tensor) -> Tensor:
    """Λ (K, D, D) → (K, D(D+1)/2) such that it @ φ(x) = x^T Λ_k x."""
    d = precisions.shape[-1]
    rows, cols = _pairs(d, precisions.device)
    return (precisions[:, rows, cols] * torch.where(rows == cols, 1.0, 2.0).to(precisions)).contiguous()


def _scatter_stats_full(stats: SufficientStats, means: Tensor) -> Tensor:
    second = unvech(stats.second, means.shape[1])
    cross = means[:, :, None] * stats.sums[:, None, :]
    return second - cross - cross.mT + stats.nk[:, None, None] * means[:, :, None] * means[:, None, :]


def _scatter_stats_tied(stats: SufficientStats, means: Tensor) -> Tensor:
    cross = means.T @ stats.sums
    return unvech(stats.second, means.shape[1]) - cross - cross.T + (stats.nk[:, None] * means).T @ means


def _scatter_stats_diag(stats: SufficientStats, means: Tensor) -> Tensor:
    return stats.second - 2.0 * means * stats.sums + stats.nk[:, None] * means**2


def _scatter_full(x: Tensor, resp: Tensor, nk: Tensor, means: Tensor, xtx: Tensor) -> Tensor:
    out = torch.empty(means.shape[0], x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    for k in range(means.shape[0]):
        diff = x - means[k]
        out[k] = (resp[:, k, None] * diff).T @ diff
    return out


def _scatter_diag(x: Tensor, resp: Tensor, nk: Tensor, means: Tensor, xtx: Tensor) -> Tensor:
    return resp.T @ (x * x) - 2.0 * means * (resp.T @ x) + nk[:, None] * means**2


def _scatter_spherical(x: Tensor, resp: Tensor, nk: Tensor, means: Tensor, xtx: Tensor) -> Tensor:
    return _scatter_diag(x, resp, nk, means, xtx).sum(dim=1)


def _scatter_tied(x: Tensor, resp: Tensor, nk: Tensor, means: Tensor, xtx: Tensor) -> Tensor:
    sums = resp.T @ x
    cross = means.T @ sums
    return xtx - cross - cross.T + (nk[:, None] * means).T @ means


def _eye_like(d: int, ref: Tensor) -> Tensor:
    return torch.eye(d, dtype=ref.dtype, device=ref.device)


COVARIANCE_TYPES: dict[str, _CovarianceType] = {
    "full": _CovarianceType(
        scatter=_scatter_full,
        ml_count=lambda nk, n, d: nk[:, None, None],
        map_count=lambda nk, n, d, k, nu0: (nu0 - d + nk)[:, None, None],
        native=lambda cov: cov,
        to_full=lambda c, k, d: c,
        n_cov_params=lambda k, d: k * d * (d + 1) // 2,
        mean_deviation=lambda dev: dev[:, :, None] * dev[:, None, :],
        second_shape=lambda k, d: (k, d * (d + 1) // 2),
        weighted_second=True,
        scatter_stats=_scatter_stats_full,
        kernel="quadratic",
    ),
    "tied": _CovarianceType(
        scatter=_scatter_tied,
        ml_count=lambda nk, n, d: nk.sum(),
        map_count=lambda nk, n, d, k, nu0: nu0 - d - 1 + k + nk.sum(),
        native=lambda cov: cov[0],
        to_full=lambda c, k, d: c.expand(k, d, d).clone(),
        n_cov_params=lambda k, d: d * (d + 1) // 2,
        mean_deviation=lambda dev: dev.T @ dev,
        second_shape=lambda k, d: (d * (d + 1) // 2,),
        weighted_second=False,
        scatter_stats=_scatter_stats_tied,
        kernel="quadratic",
    ),
    "diag": _CovarianceType(
        scatter=_scatter_diag,
        ml_count=lambda nk, n, d: nk[:, None],
        map_count=lambda nk, n, d, k, nu0: (nu0 - 1 + nk)[:, None],
        native=lambda cov: torch.diagonal(cov, dim1=-2, dim2=-1),
        to_full=lambda c, k, d: torch.diag_embed(c),
        n_cov_params=lambda k, d: k * d,
        mean_deviation=lambda dev: dev**2,
        second_shape=lambda k, d: (k, d),
        weighted_second=True,
        scatter_stats=_scatter_stats_diag,
        kernel="diag",
    ),
    "spherical": _CovarianceType(
        scatter=_scatter_spherical,
        ml_count=lambda nk, n, d: nk * d,
        map_count=lambda nk, n, d, k, nu0: d * (nu0 + 1 + nk) - 2,
        native=lambda cov: torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1),
        to_full=lambda c, k, d: c[:, None, None] * _eye_like(d, c),
        n_cov_params=lambda k, d: k,
        mean_deviation=lambda dev: (dev**2).sum(-1),
        second_shape=lambda k, d: (k, d),
        weighted_second=True,
        scatter_stats=lambda stats, means: _scatter_stats_diag(stats, means).sum(-1),
        kernel="diag",
    ),
}


def precision_cholesky(covariances: Tensor) -> Tensor:
    """Upper-triangular U with U U^T = Σ^-1, for covariances (..., D, D)."""
    chol = torch.linalg.cholesky(covariances)
    eye = _eye_like(covariances.shape[-1], covariances).expand_as(covariances)
    return torch.linalg.solve_triangular(chol, eye, upper=False).mT


def gaussian_log_prob(x: Tensor, means: Tensor, prec_chol: Tensor) -> Tensor:
    """log N(x_n | means_k, Σ_k) for x (N, D), means (K, D), prec_chol (K, D, D); returns (N, K)."""
    d = x.shape[1]
    y = torch.einsum("nd,kde->nke", x, prec_chol) - torch.einsum("kd,kde->ke", means, prec_chol)
    log_det = torch.log(torch.diagonal(prec_chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (d * math.log(2 * math.pi) + (y * y).sum(-1)) + log_det


@dataclass(frozen=True)
class Prepared:
    """Per-iteration constants of the E-step, so that a row block's log-joint is one GEMM:
    (x - μ)^T Λ (x - μ) = φ(x) · q(Λ) - 2 x · Λμ + μ^T Λ μ, with φ the row's features, so
    log p(x, k | θ) = coefficients_k · (φ(x), 1, x) (see ``block_design``).

    kernel "quadratic" (full, tied): φ(x) the products x_i x_j, i <= j (in ``_offsets``' order),
    matrix (K, D(D+1)/2); kernel "diag" (diag, spherical): φ(x) = x², matrix (K, D) the precisions.
    linear (K, D) the Λ_k μ_k; const (K, 1) the μ_k^T Λ_k μ_k; log_norm (K, 1) log π_k + ½ log|Λ_k|
    - D/2 log 2π; coefficients (K, F + 1 + D) the rows (-½ matrix_k, log_norm_k - ½ const_k,
    linear_k). Points and means are measured from ``shift`` (D,), so that the expansion keeps its
    digits.
    """

    kernel: str
    shift: Tensor
    matrix: Tensor
    linear: Tensor
    const: Tensor
    log_norm: Tensor
    coefficients: Tensor


def prepare_gaussians(
    weights: Tensor, means: Tensor, covariances: Tensor, kernel: str, shift: Tensor
) -> Prepared:
    """The E-step constants for weights (K,), means (K, D), covariances (K, D, D)."""
    d = means.shape[1]
    centered = means - shift
    chol = torch.linalg.cholesky(covariances)
    log_det = -2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    if kernel == "diag":
        precisions = 1.0 / torch.diagonal(covariances, dim1=-2, dim2=-1)
        linear = centered * precisions
        matrix = precisions.contiguous()
    else:
        full = torch.cholesky_inverse(chol)
        linear = (full @ centered[:, :, None]).squeeze(-1)
        matrix = _quadratic_weights(full)
    const = (linear * centered).sum(-1)[:, None]
    log_norm = (torch.log(weights) + 0.5 * log_det - 0.5 * d * math.log(2 * math.pi))[:, None]
    coefficients = torch.cat([-0.5 * matrix, log_norm - 0.5 * const, linear], dim=1)
    return Prepared(kernel, shift, matrix, linear.contiguous(), const, log_norm, coefficients)


def phi_count(kernel: str, d: int) -> int:
    """How many features φ(x) a point of dimension ``d`` has under ``kernel``."""
    return d if kernel == "diag" else d * (d + 1) // 2


class _BlockViews:
    """The views of a flat buffer that the design of a block of ``b`` points needs, made once:
    the design (F + 1 + D, B) holds φ(x) (F rows), 1 and x (D rows), then come ``wrap_rows`` of
    scratch. φ(x) takes two or three kernels whatever D (see ``_offsets``): with the views ready,
    a block costs five or six calls into torch, which keeps the worker lanes of a pass from
    queueing for the interpreter."""

    def __init__(self, buffer: Tensor, shift: Tensor, kernel: str, d: int, b: int) -> None:
        f = phi_count(kernel, d)
        lines = f + 1 + d + wrap_rows(kernel, d)
        grid = buffer[: lines * b].view(lines, b)
        self.shift = shift
        self.column = shift[:, None]
        self.design = grid[: f + 1 + d]
        self.x = grid[f + 1 : f + 1 + d]
        self.ones = grid[f]
        self.wrap: tuple[Tensor, Tensor] | None = None  # (source, copy)
        self.products: list[tuple[Tensor, Tensor, Tensor]] = []  # torch.mul's (left, right, out)
        if kernel == "diag":
            self.products.append((self.x, self.x, grid[:f]))
            return
        spans, half = _offsets(d)
        wrapped = grid[f + 1 :]  # x, then its first spans - 1 rows again
        if spans > 1:
            self.wrap = (wrapped[: spans - 1], wrapped[d:])
        windows = wrapped.as_strided((spans, d, b), (b, b, 1))  # offset o: rows o, ..., o + D - 1
        self.products.append((windows, self.x, grid[: spans * d].view(spans, d, b)))
        if half:
            self.products.append((self.x[:half], self.x[half:], grid[spans * d : f]))

    def fill(self, rows: Tensor, ones: bool) -> Tensor:
        """The design of rows (B, D); ``ones``: whether to write its row of ones, which stays in
        place until a block of another size uses the buffer."""
        torch.sub(rows.T, self.column, out=self.x)
        if self.wrap is not None:
            self.wrap[1].copy_(self.wrap[0])
        for left, right, out in self.products:
            torch.mul(left, right, out=out)
        if ones:
            self.ones.fill_(1.0)
        return self.design


class DesignBuffer:
    """A flat buffer for the designs of blocks of up to ``rows`` points (``block_design``), with
    the views of the block sizes it has served, so that each block pays for its kernels only."""

    def __init__(self, like: Tensor, kernel: str, d: int, rows: int) -> None:
        self.kernel, self.d = kernel, d
        self.flat = like.new_empty((phi_count(kernel, d) + 1 + d + wrap_rows(kernel, d)) * rows)
        self._views: dict[int, _BlockViews] = {}
        self._last: _BlockViews | None = None  # whose layout the buffer holds

    def design(self, rows: Tensor, shift: Tensor) -> Tensor:
        """The design of rows (B, D) measured from ``shift``, in this buffer."""
        b = rows.shape[0]
        views = self._views.get(b)
        if views is None or views.shift is not shift:
            if len(self._views) >= 4:  # a pass has at most two block sizes per lane
                self._views.clear()
            views = self._views[b] = _BlockViews(self.flat, shift, self.kernel, self.d, b)
        design = views.fill(rows, ones=views is not self._last)
        self._last = views
        return design


def block_design(rows: Tensor, shift: Tensor, kernel: str, out: DesignBuffer | None = None) -> Tensor:
    """The design of points rows (B, D) measured from ``shift`` (D,): (F + 1 + D, B), one point per
    column, holding φ(x) (F rows), 1 and x (D rows). It is laid out transposed, points along
    columns, so that both GEMMs of a block (the log-joint and the statistics) have long rows.
    ``out``: a buffer for at least B points, reused (its views too) from block to block."""
    b, d = rows.shape
    if out is None:
        out = DesignBuffer(rows, kernel, d, b)
    return out.design(rows, shift)


def weighted_moments(design: Tensor, resp: Tensor) -> Tensor:
    """Σ_n design[:, n] resp[:, n]^T for a design (R, B) and responsibilities (K, B): (R, K).

    Both orientations of the GEMM give the same sums up to rounding, but not at the same speed.
    Measured with torch 2.13's MKL on one core (GFLOP/s of the two GEMMs alone, B = 2048-16384,
    the designs of D = 8 and 16): in float64 resp @ design^T was never slower and often much
    faster (R = 153, K = 16: 29-36 against 20-26; K = 8: 19-31 against 9-14; R = 17, K = 8: 21
    against 14); in float32 it was faster up to K = 8 (R = 153: 47-56 against 37-44), and
    design @ resp^T faster at K = 16 (R = 45: 66-72 against 50-52). Those figures are from the
    Intel machine of the README's earlier runs; on the 2-vCPU AMD EPYC of its latest runs (one
    core, best of 5, B = 4096-25000) the same choice won: float64 17-22 against 13-19, float32
    K = 8 35-41 against 31-32, K = 16 53-64 against 41-50. The choice depends on shapes and dtype
    only, so results stay reproducible."""
    if _moments_by_rows(design.dtype, resp.shape[0]):
        return torch.mm(design, resp.T)
    return torch.mm(resp, design.T).T


def _moments_by_rows(dtype: torch.dtype, k: int) -> bool:
    """Whether ``weighted_moments`` computes design @ resp^T, (R, K), rather than resp @ design^T."""
    return dtype == torch.float32 and k > 8


def block_log_joint(design: Tensor, prepared: Prepared, out: Tensor | None = None) -> Tensor:
    """log π_k + log N(x_n | μ_k, Σ_k) for a block's design (F + 1 + D, B) (``block_design``):
    (K, B), written into ``out`` (K, B) when given."""
    return torch.mm(prepared.coefficients, design, out=out)


def stick_breaking_log_weights(sticks: Tensor) -> Tensor:
    """log π_k = log v_k + Σ_{j<k} log(1 - v_j) for sticks (..., K); returns (..., K)."""
    log_rest = torch.log1p(-sticks)
    before = torch.nn.functional.pad(torch.cumsum(log_rest, dim=-1)[..., :-1], (1, 0))
    return torch.log(sticks) + before


def sticks_from_weights(weights: Tensor) -> Tensor:
    """v_k = π_k / (1 - Σ_{j<k} π_j) for weights (K,) on the simplex, clamped inside (0, 1).

    The remaining mass is summed from the tail, which stays accurate for small late weights;
    the last stick would be exactly one, which Beta(1, γ) gives zero or infinite density.
    """
    remaining = torch.flip(torch.cumsum(torch.flip(weights, (-1,)), dim=-1), (-1,))
    eps = torch.finfo(weights.dtype).eps
    return torch.clamp(weights / remaining, eps, 1.0 - eps)


def _default_prior(cfg: HyperConfig, covariance: str, k: int, x: Tensor) -> ConjugatePrior:
    """scikit-learn's BayesianGaussianMixture defaults, from the train data x (N, D)."""
    x = x.to(torch.float64)
    d = x.shape[1]
    empirical = torch.atleast_2d(torch.cov(x.T)) if x.shape[0] > 1 else torch.eye(d, dtype=x.dtype)
    native_default = {
        "full": empirical,
        "tied": empirical,
        "diag": torch.diagonal(empirical).clone(),
        "spherical": torch.diagonal(empirical).mean(),
    }[covariance]
    if cfg.covariance_prior is None:
        cov_prior = native_default
        if not _positive_definite(native_default):
            raise UserError(
                "model.hyperparameters.covariance_prior: its default, the train data's covariance, "
                "is singular or overflows (a feature is constant, a linear combination of others, or "
                "near float64's limits), so it cannot scale the precisions' prior. Drop or rescale "
                "that feature, or set model.hyperparameters.covariance_prior, e.g. 1.0."
            )
    else:
        cov_prior = _native_covariance_prior(cfg.covariance_prior, covariance, d)
    if cfg.mean_prior is None:
        mean_prior = x.mean(0)
    else:
        mean_prior = torch.tensor(cfg.mean_prior, dtype=torch.float64)
        if mean_prior.shape != (d,):
            raise UserError(
                f"model.hyperparameters.mean_prior: expected {d} numbers (one per feature), "
                f"but found {mean_prior.numel()}."
            )
    nu0 = float(d) if cfg.degrees_of_freedom is None else cfg.degrees_of_freedom
    if covariance in ("full", "tied") and nu0 <= d - 1:
        raise UserError(
            f"model.hyperparameters.degrees_of_freedom: a Wishart prior needs more than D - 1 = "
            f"{d - 1}, but found {nu0}. Try {d}."
        )
    if cfg.weight_concentration is not None:
        alpha0 = cfg.weight_concentration
    else:
        alpha0 = 1.0 / k if cfg.weight_prior == "dirichlet_process" else 1.0
    return ConjugatePrior(alpha0, cfg.mean_precision, mean_prior, nu0, cov_prior, cfg.weight_prior)


def _positive_definite(native: Tensor) -> bool:
    """Whether a covariance in its native shape ((D, D) matrix, (D,) diagonal or () scale) is."""
    if not torch.isfinite(native).all():
        return False
    if native.ndim < 2:
        return bool((native > 0).all())
    return int(torch.linalg.cholesky_ex(native).info) == 0


def _native_covariance_prior(value: object, covariance: str, d: int) -> Tensor:
    field = "model.hyperparameters.covariance_prior"
    try:
        tensor = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):  # ragged rows
        raise UserError(
            f"{field}: expected a number, {d} diagonal entries or a {d}×{d} matrix, but found {value!r}."
        ) from None
    if tensor.ndim == 0:
        tensor = tensor * torch.eye(d, dtype=torch.float64)
    elif tensor.ndim == 1:
        if tensor.shape != (d,):
            raise UserError(f"{field}: expected {d} diagonal entries, but found {tensor.numel()}.")
        tensor = torch.diag(tensor)
    if tensor.shape != (d, d):
        raise UserError(f"{field}: expected a {d}×{d} matrix, but found shape {tuple(tensor.shape)}.")
    if not torch.allclose(tensor, tensor.T) or torch.linalg.eigvalsh(tensor).min() <= 0:
        raise UserError(f"{field}: must be symmetric positive definite.")
    native = COVARIANCE_TYPES[covariance].native(tensor[None])
    return native if covariance == "tied" else native[0]


@MODELS.register("gmm")
class GaussianMixture(LatentModel):
    """K-component Gaussian mixture with a covariance type and an optional conjugate prior."""

    name = "gmm"

    def __init__(self, k: int, dim: int, covariance: str, prior: ConjugatePrior | None) -> None:
        self.k = k
        self.dim = dim
        self.covariance = covariance
        self.prior = prior
        self._type = COVARIANCE_TYPES[covariance]

    @classmethod
    def from_config(cls, cfg: ModelConfig, x: Tensor) -> GaussianMixture:
        prior = None
        if cfg.prior == "conjugate":
            prior = _default_prior(cfg.hyperparameters, cfg.covariance, cfg.k, x)
        return cls(cfg.k, int(x.shape[1]), cfg.covariance, prior)

    @property
    def has_prior(self) -> bool:
        return self.prior is not None

    @property
    def stick_breaking(self) -> bool:
        """Whether the weights are declared by truncated stick-breaking (site ``sticks``)."""
        return self.prior is not None and self.prior.stick_breaking

    @property
    def weight_site(self) -> str:
        return "sticks" if self.stick_breaking else "weights"

    # ---- the declaration -------------------------------------------------------------------

    def _prior_tensor(self, value: Tensor, like: Tensor) -> Tensor:
        return value.to(dtype=like.dtype, device=like.device)

    def weights_prior(self, like: Tensor) -> dist.TorchDistribution:
        """The prior of the ``weights`` site, or of the ``sticks`` site (batch (K,))."""
        k = self.k
        if self.prior is None:
            return Flat(constraints.simplex, (), (k,))
        concentration = torch.full(
            (k,), self.prior.weight_concentration, dtype=like.dtype, device=like.device
        )
        if self.stick_breaking:
            return dist.Beta(torch.ones_like(concentration), concentration)
        return dist.Dirichlet(concentration)

    def precision_prior(self, like: Tensor) -> dist.TorchDistribution:
        """The prior of the ``precision`` site, batch (K,) except for tied."""
        k, d, p = self.k, self.dim, self.prior
        batch = () if self.covariance == "tied" else (k,)
        if p is None:
            support, event = {
                "full": (constraints.positive_definite, (d, d)),
                "tied": (constraints.positive_definite, (d, d)),
                "diag": (constraints.positive, (d,)),
                "spherical": (constraints.positive, ()),
            }[self.covariance]
            return Flat(support, batch, event)
        c0 = self._prior_tensor(p.covariance_prior, like)
        nu0 = torch.tensor(p.degrees_of_freedom, dtype=like.dtype, device=like.device)
        if self.covariance in ("full", "tied"):
            return dist.Wishart(nu0, precision_matrix=c0).expand(batch)
        if self.covariance == "diag":
            return dist.Gamma(nu0 / 2, c0 / 2).expand((k, d)).to_event(1)
        return dist.Gamma(d * nu0 / 2, d * c0 / 2).expand((k,))

    def locs_prior(self, full_precision: Tensor) -> dist.TorchDistribution:
        """The prior of the ``locs`` site given (K, D, D) precisions, batch (K,)."""
        if self.prior is None:
            return Flat(constraints.real_vector, (self.k,), (self.dim,))
        m0 = self._prior_tensor(self.prior.mean_prior, full_precision)
        return dist.MultivariateNormal(m0, precision_matrix=self.prior.mean_precision * full_precision)

    def full_precision(self, precision: Tensor) -> Tensor:
        """(K, D, D) precision matrices from the ``precision`` site's value."""
        return self._type.to_full(precision, self.k, self.dim)

    @config_enumerate
    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Tensor:
        like = x if x is not None else torch.zeros((), dtype=torch.get_default_dtype())
        n = x.shape[0] if x is not None else n
        # mini-batches: the plate subsamples and scales the likelihood by n / batch_size
        subsample = None if batch_size is None or n is None or batch_size >= n else batch_size

        # global variables
        if not self.stick_breaking:
            weights = pyro.sample("weights", self.weights_prior(like))
        if self.covariance == "tied":
            precision = pyro.sample("precision", self.precision_prior(like))
        with pyro.plate("components", self.k):
            if self.stick_breaking:
                sticks = pyro.sample("sticks", self.weights_prior(like))
            if self.covariance != "tied":
                precision = pyro.sample("precision", self.precision_prior(like))
            full_precision = self.full_precision(precision)
            locs = pyro.sample("locs", self.locs_prior(full_precision))

        # local variables
        with pyro.plate("data", n, subsample_size=subsample) as index:
            if x is not None and subsample is not None:
                x = x[index]
            if self.stick_breaking:
                z = pyro.sample("z", dist.Categorical(logits=like.new_zeros(self.k)))
                # the components' plate dim becomes an event dim, so batch dims (particles) align
                log_weights = stick_breaking_log_weights(sticks).unsqueeze(-2)
                pyro.factor("stick_mass", Vindex(log_weights)[..., z] + math.log(self.k))
            else:
                z = pyro.sample("z", dist.Categorical(weights))
            return pyro.sample(
                "x",
                dist.MultivariateNormal(
                    Vindex(locs)[..., z, :], precision_matrix=Vindex(full_precision)[..., z, :, :]
                ),
                obs=x,
            )

    # ---- what exact inference needs, equal to the declaration ------------------------------

    block_rows: int = 4096  # rows per block: large enough for fast GEMMs, small enough for cache

    def prepare(self, params: Params, shift: Tensor | None = None) -> Prepared:
        """The E-step's per-iteration constants for θ (see ``Prepared``)."""
        means = params["means"]
        shift = means.new_zeros(means.shape[1]) if shift is None else shift
        return prepare_gaussians(params["weights"], means, params["covariances"], self._type.kernel, shift)

    def design_rows(self) -> int:
        """How many rows a point's design (φ(x), 1, x) has (see ``block_design``)."""
        return phi_count(self._type.kernel, self.dim) + 1 + self.dim

    def design_buffer(self, like: Tensor, rows: int) -> DesignBuffer:
        """A buffer, in like's dtype and device, for the designs of blocks of up to ``rows``."""
        return DesignBuffer(like, self._type.kernel, self.dim, rows)

    def design(self, rows: Tensor, shift: Tensor, out: DesignBuffer | None = None) -> Tensor:
        """The design (F + 1 + D, B) of points rows (B, D) measured from ``shift``, shared by the
        E-step and the statistics; ``out`` from ``design_buffer`` (see ``block_design``)."""
        return block_design(rows, shift, self._type.kernel, out)

    def block_log_joint(self, design: Tensor, prepared: Prepared, out: Tensor | None = None) -> Tensor:
        """log p(x_n, z_n = k | θ) for a block's design; returns (K, B)."""
        return block_log_joint(design, prepared, out)

    def log_joint(self, x: Tensor, params: Params) -> Tensor:
        shift = x.mean(0)
        prepared = self.prepare(params, shift)
        blocks = [block_log_joint(self.design(rows, shift), prepared).T for rows in x.split(self.block_rows)]
        return torch.cat(blocks) if len(blocks) != 1 else blocks[0]

    def new_stats(self, shift: Tensor) -> SufficientStats:
        """Zero statistics about ``shift`` (D,), in its dtype and device."""
        k, d = self.k, self.dim
        zeros = shift.new_zeros
        if not self._type.weighted_second:
            return SufficientStats(shift, zeros(k), zeros(k, d), zeros(self._type.second_shape(k, d)))
        f = phi_count(self._type.kernel, d)
        if _moments_by_rows(shift.dtype, k):
            raw = zeros(f + 1 + d, k)
            stats = _MomentStats(shift, raw[f], raw[f + 1 :].T, raw[:f].T)
        else:
            raw = zeros(k, f + 1 + d)
            stats = _MomentStats(shift, raw[:, f], raw[:, f + 1 :], raw[:, :f])
        stats.raw = raw
        return stats

    def accumulate(self, stats: SufficientStats, design: Tensor, resp: Tensor) -> None:
        """Add points with design (F + 1 + D, B) (measured from stats.shift) and responsibilities
        resp (K, B) to ``stats``, in place: one GEMM gives Σ_n r_nk (φ(x_n), 1, x_n)."""
        raw = getattr(stats, "raw", None)
        if raw is not None:  # see _MomentStats
            if _moments_by_rows(raw.dtype, self.k):
                raw.addmm_(design, resp.T)
            else:
                raw.addmm_(resp, design.T)
            return
        f = design.shape[0] - self.dim - 1
        if self._type.weighted_second:
            moments = weighted_moments(design, resp)
            stats.second.add_(moments[:f].T)
        else:
            moments = weighted_moments(design[f:], resp)
            stats.second.add_(design[:f].sum(1))
        stats.nk.add_(moments[-self.dim - 1])
        stats.sums.add_(moments[-self.dim :].T)

    def add_stats(self, stats: SufficientStats, other: SufficientStats) -> None:
        for mine, theirs in zip(stats[1:], other[1:], strict=True):
            mine.add_(theirs)

    def log_prior(self, params: Params) -> Tensor:
        weights = params["weights"]
        if self.prior is None:
            return torch.zeros((), dtype=weights.dtype, device=weights.device)
        sites = self.to_sites(params)
        full_precision = self.full_precision(sites["precision"])
        return (
            self.weights_prior(weights).log_prob(sites[self.weight_site]).sum()
            + self.precision_prior(weights).log_prob(sites["precision"]).sum()
            + self.locs_prior(full_precision).log_prob(sites["locs"]).sum()
        )

    def m_step(self, x: Tensor, resp: Tensor, reg_covar: float, use_prior: bool = True) -> Params:
        stats = self.new_stats(x.mean(0))
        for rows, block_resp in zip(x.split(self.block_rows), resp.split(self.block_rows), strict=True):
            self.accumulate(stats, self.design(rows, stats.shift), block_resp.T)
        return self.m_step_stats(stats, reg_covar, use_prior)

    def m_step_stats(self, stats: SufficientStats, reg_covar: float, use_prior: bool = True) -> Params:
        """The M-step from sufficient statistics alone (see ``m_step``)."""
        d = self.dim
        like = stats.sums
        nk = stats.nk + 10 * torch.finfo(like.dtype).eps
        n = nk.sum()
        kind = self._type
        prior = self.prior if use_prior else None
        if prior is not None and prior.stick_breaking:
            raise ValueError(
                "Expected a Dirichlet weight prior, but found dirichlet_process, whose posterior "
                "mode lies on the boundary. Try use_prior=False, or the vb backend."
            )
        if prior is None:
            weights = nk / n
            centered_means = stats.sums / nk[:, None]
            cov = kind.scatter_stats(stats, centered_means) / kind.ml_count(nk, n, d)
        else:
            raw = nk + prior.weight_concentration - 1.0
            weights = raw / raw.sum()
            beta0 = prior.mean_precision
            m0 = prior.mean_prior.to(like) - stats.shift
            centered_means = (beta0 * m0 + stats.sums) / (beta0 + nk)[:, None]
            scale = kind.native(self._prior_scale(like)[None])
            numerator = scale + kind.scatter_stats(stats, centered_means)
            numerator = numerator + beta0 * kind.mean_deviation(centered_means - m0)
            cov = numerator / kind.map_count(nk, n, d, self.k, prior.degrees_of_freedom)
        covariances = kind.to_full(cov, self.k, d) + reg_covar * _eye_like(d, like)
        return {"weights": weights, "means": centered_means + stats.shift, "covariances": covariances}

    def component_mass(self, stats: SufficientStats) -> Tensor:
        return stats.nk

    def reseed(self, params: Params, components: Sequence[int], x: Tensor) -> Params:
        """Each of ``components`` restarted in turn at the point of x (N, D) that the live
        components explain worst (the lowest log p(x_n | θ); the first on ties), with the live
        components' pooled covariance Σ_k π_k Σ_k / Σ_k π_k, which keeps the covariance type, and
        half the largest live component's weight, taken from it. A restarted component is live
        for the next one."""
        weights, means, covariances = (params[name].clone() for name in ("weights", "means", "covariances"))
        live = torch.ones(self.k, dtype=torch.bool, device=weights.device)
        live[list(components)] = False
        if self.covariance == "tied":
            pooled = covariances[live][0]  # exactly the shared matrix, not a rounded average
        else:
            share = weights[live] / weights[live].sum()
            pooled = (share[:, None, None] * covariances[live]).sum(0)
        for k in components:
            means[k] = x[self._worst_explained(x, weights[live], means[live], covariances[live])]
            covariances[k] = pooled
            largest = int(torch.argmax(torch.where(live, weights, -1.0)))
            weights[k] = weights[largest] = weights[largest] / 2
            live[k] = True
        return {"weights": weights / weights.sum(), "means": means, "covariances": covariances}

    def _worst_explained(self, x: Tensor, weights: Tensor, means: Tensor, covariances: Tensor) -> int:
        """The index of the point of x (N, D) with the lowest log Σ_k π_k N(x_n | μ_k, Σ_k) for
        the given components, in row blocks (memory O(block × K))."""
        shift = x[: self.block_rows].mean(0)
        prepared = prepare_gaussians(weights, means, covariances, self._type.kernel, shift)
        worst, where = math.inf, 0
        for start in range(0, x.shape[0], self.block_rows):
            design = self.design(x[start : start + self.block_rows], shift)
            log_density = torch.logsumexp(block_log_joint(design, prepared), dim=0)
            value, index = torch.min(log_density, dim=0)
            if float(value) < worst:
                worst, where = float(value), start + int(index)
        return where

    def _prior_scale(self, like: Tensor) -> Tensor:
        """W0^-1 as a full (D, D) matrix."""
        assert self.prior is not None
        c0 = self.prior.covariance_prior.to(like)
        if self.covariance in ("full", "tied"):
            return c0
        if self.covariance == "diag":
            return torch.diag(c0)
        # spherical: the Gamma(D ν0/2, D c0/2) prior adds D c0 to the summed squared deviations
        return self.dim * c0 * _eye_like(self.dim, like)

    def n_params(self) -> int:
        k, d = self.k, self.dim
        return self._type.n_cov_params(k, d) + k * d + k - 1

    def to_sites(self, params: Params) -> dict[str, Tensor]:
        precision = torch.linalg.inv(params["covariances"])
        precision = 0.5 * (precision + precision.mT)
        weights = params["weights"].detach()
        if self.stick_breaking:
            weights = sticks_from_weights(weights / weights.sum())
        # copies: guides initialized from these values may update them in place
        return {
            self.weight_site: weights.clone(),
            "locs": params["means"].detach().clone(),
            "precision": self._type.native(precision).detach().clone(),
        }

    def from_sites(self, sites: Mapping[str, Tensor]) -> Params:
        covariances = torch.linalg.inv(self.full_precision(sites["precision"]))
        if self.stick_breaking:
            # the truncation leaves mass off the K components; a point estimate is a mixture
            weights = torch.softmax(stick_breaking_log_weights(sites["sticks"]), dim=-1)
        else:
            weights = sites["weights"]
        return {
            "weights": weights,
            "means": sites["locs"],
            "covariances": 0.5 * (covariances + covariances.mT),
        }

    def check_params(self, params: Params, where: str) -> Params:
        k, d = self.k, self.dim
        expected = {"weights": (k,), "means": (k, d), "covariances": (k, d, d)}
        for name, shape in expected.items():
            if name not in params:
                raise UserError(
                    f"{where}: has no tensor {name!r}; a Gaussian mixture needs {sorted(expected)}."
                )
            found = tuple(params[name].shape)
            if found != shape:
                what = "model.k" if found[:1] != shape[:1] else "the data's dimension"
                raise UserError(
                    f"{where}: {name} has shape {found}, but {what} needs {shape} "
                    f"(k={k}, dim={d}). Start from a run with the same k and features."
                )
        weights = params["weights"].to(torch.float64)
        covariances = params["covariances"].to(torch.float64)
        native = self._type.native(covariances)
        if self.covariance == "tied":
            native = (weights[:, None, None] * covariances).sum(0)
        covariances = self._type.to_full(native, k, d)
        return {
            "weights": weights / weights.sum(),
            "means": params["means"].to(torch.float64),
            "covariances": covariances,
        }
