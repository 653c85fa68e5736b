"""The multivariate Student-t mixture (robust clustering), declared in Pyro, with exact ECM.

Global sites of ``StudentTMixture.model``:

    weights    (K,)        Dirichlet(α0) | flat on the simplex
    precision  (K, D, D)   Wishart(ν0, W0) | flat on positive-definite matrices: the inverse scales
    locs       (K, D)      N(m0, (β0 Λ_k)^-1) | flat on R^D
    dofs       (K,)        Gamma(a, rate b) | flat on (0, ∞); absent when ``model.dofs`` fixes them

Local sites: ``z`` (Categorical(weights), enumerated) and ``x`` (MultivariateStudentT(dofs[z],
locs[z], scale_tril = chol(precision[z]^-1))). Point estimates hold float64 ``weights`` (K),
``means`` (K, D), ``covariances`` (K, D, D) (the scale matrices Σ_k, not the covariances
ν/(ν-2) Σ_k) and ``dofs`` (K).

Exact EM is ECM (McLachlan & Peel 2000, ch. 7; Liu & Rubin 1995): each t is a Gaussian scale
mixture, x | τ, z = k ~ N(μ_k, Σ_k / τ) with τ ~ Gamma(ν_k / 2, rate ν_k / 2), and the E-step at θ
gives, beside r_nk, the posterior q(τ_n | z_n = k) = Gamma((ν_k + D) / 2, (ν_k + δ_nk) / 2) with δ
the Mahalanobis distance; its mean is u_nk = (ν_k + D) / (ν_k + δ_nk). The CM-steps maximize the
expected complete-data log joint: weights, means and scales given ν (closed forms weighted by
r u), then each ν_k by a one-dimensional root find. A block's design carries the points and,
once ``block_log_joint`` has scored it at θ, that θ's E[τ], E[log τ] and entropy of q(τ) for
each component, which ``accumulate`` weighs by r: the statistics are sums over points as for
every ``ClosedFormEM``, so em, online_em and incremental_em run unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from scipy.optimize import brentq
from scipy.special import digamma
from torch import Tensor
from torch.distributions import constraints

from ..config import ModelOptions, Strict
from . import transforms  # noqa: F401  (registers biject_to(positive_definite) for guides)
from .base import MODELS, ClosedFormEM, Flat, LatentModel, Params, Stats
from .distributions import PrecisionMultivariateNormal, Wishart
from .gmm import ConjugatePrior, GaussianMixture, GMMHyperparameters, _default_prior

__all__ = ["DOFS_RANGE", "StudentTHyperparameters", "StudentTMixture", "StudentTOptions", "solve_dofs"]

DOFS_RANGE = (1e-2, 1e4)  # the ν-step's bracket: beyond 1e4 a t is a Gaussian to ~1e-4 per point


class StudentTHyperparameters(Strict):
    """The conjugate part is the gmm's (full covariance, Dirichlet weights); null means its
    data-based default. Used only with ``model.prior: conjugate``."""

    weight_concentration: float = Field(1.0, ge=1.0)  # α0; at least 1, so that the mode exists
    mean_precision: float = Field(1.0, gt=0)  # β0
    mean_prior: list[float] | None = None  # m0 (D); default: the train mean
    degrees_of_freedom: float | None = Field(None, gt=0)  # ν0 of the Wishart; default: D
    covariance_prior: float | list[float] | list[list[float]] | None = None  # W0^-1; default: train cov
    # ν_k ~ Gamma(2, rate 0.1) (Juárez & Steel 2010): mode 10, mean 20, and no mass at ν = 0
    dofs_shape: float = Field(2.0, ge=1.0)
    dofs_rate: float = Field(0.1, gt=0)


class StudentTOptions(ModelOptions):
    name: Literal["student_t_mixture"] = "student_t_mixture"
    # null: each component's ν estimated; a number: every ν_k fixed to it (1e6: nearly the gmm)
    dofs: float | None = Field(None, gt=0, allow_inf_nan=False)
    hyperparameters: StudentTHyperparameters = StudentTHyperparameters()


@dataclass(frozen=True)
class StudentTPrior:
    """The conjugate prior of (weights, means, scales) and the Gamma(a, rate b) prior of each ν_k."""

    gaussian: ConjugatePrior
    dofs_shape: float
    dofs_rate: float


@dataclass(frozen=True)
class Prepared:
    """θ's constants for the E-step, means measured from the fit's center: log_norm (K, 1) is
    log π_k + log Γ((ν+D)/2) - log Γ(ν/2) - D/2 log(νπ) - ½ log|Σ_k|; chol (K, D, D) = chol(Σ_k)
    and whiten its inverse; log_det (K,) = log|Σ_k|; dofs (K, 1)."""

    log_weights: Tensor
    means: Tensor
    chol: Tensor
    log_det: Tensor
    whiten: Tensor
    dofs: Tensor
    log_norm: Tensor


@MODELS.register("student_t_mixture")
class StudentTMixture(LatentModel, ClosedFormEM):
    """K-component multivariate Student-t mixture with full scale matrices."""

    name = "student_t_mixture"
    options = StudentTOptions
    component_axes = {"weights": (0,), "means": (0,), "covariances": (0,), "dofs": (0,)}
    pivot = "means"
    backend_fields = {"reg_covar": 1e-6}

    def __init__(self, k: int, dim: int, dofs: float | None, prior: StudentTPrior | None) -> None:
        self.k, self.dim, self.fixed_dofs, self.prior = k, dim, dofs, prior

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> StudentTMixture:
        assert isinstance(cfg, StudentTOptions)
        prior = None
        if cfg.prior == "conjugate":
            hyper = cfg.hyperparameters
            gaussian = GMMHyperparameters(
                weight_concentration=hyper.weight_concentration,
                mean_precision=hyper.mean_precision,
                mean_prior=hyper.mean_prior,
                degrees_of_freedom=hyper.degrees_of_freedom,
                covariance_prior=hyper.covariance_prior,
            )
            prior = StudentTPrior(
                _default_prior(gaussian, "full", cfg.k, x), hyper.dofs_shape, hyper.dofs_rate
            )
        model = cls(cfg.k, int(x.shape[1]), cfg.dofs, prior)
        model.example = x[:1].clone().to(torch.float64)
        return model

    @property
    def has_prior(self) -> bool:
        return self.prior is not None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        k, d = self.k, self.dim
        return {"weights": (k,), "means": (k, d), "covariances": (k, d, d), "dofs": (k,)}

    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        """The gmm's truth (weights, means ``separation`` apart, scales with eigenvalues in
        [0.5, 1.5]) and heavy tails: ν_k uniform in [3, 6], or the fixed ν."""
        truth = GaussianMixture(self.k, self.dim, "full", None).sample_truth(rng, separation)
        dofs = (
            rng.uniform(3.0, 6.0, size=self.k)
            if self.fixed_dofs is None
            else np.full(self.k, self.fixed_dofs)
        )
        return {**truth, "dofs": torch.from_numpy(dofs)}

    # ---- the declaration -------------------------------------------------------------------

    @config_enumerate
    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Tensor:
        like = x if x is not None else torch.zeros((), dtype=torch.get_default_dtype())
        n = x.shape[0] if x is not None else n
        subsample = None if batch_size is None or n is None or batch_size >= n else batch_size
        k = self.k

        # global variables
        weights = pyro.sample("weights", self._weights_prior(like))
        with pyro.plate("components", k):
            precision = pyro.sample("precision", self._precision_prior(like))
            locs = pyro.sample("locs", self._locs_prior(precision))
            if self.fixed_dofs is None:
                dofs = pyro.sample("dofs", self._dofs_prior(like))
            else:
                dofs = locs.new_full((k,), self.fixed_dofs)
        scale_tril = torch.linalg.cholesky(torch.linalg.inv(precision))

        # local variables
        with pyro.plate("data", n, subsample_size=subsample) as index:
            if x is not None and subsample is not None:
                x = x[index]
            z = pyro.sample("z", dist.Categorical(weights))
            component = dist.MultivariateStudentT(
                Vindex(dofs)[..., z], Vindex(locs)[..., z, :], Vindex(scale_tril)[..., z, :, :]
            )
            return pyro.sample("x", component, obs=x)

    def _tensor(self, value: float | Tensor, like: Tensor) -> Tensor:
        return torch.as_tensor(value, dtype=like.dtype, device=like.device)

    def _weights_prior(self, like: Tensor) -> dist.TorchDistribution:
        if self.prior is None:
            return Flat(constraints.simplex, (), (self.k,))
        return dist.Dirichlet(self._tensor(self.prior.gaussian.weight_concentration, like).expand(self.k))

    def _precision_prior(self, like: Tensor) -> dist.TorchDistribution:
        if self.prior is None:
            return Flat(constraints.positive_definite, (self.k,), (self.dim, self.dim))
        gaussian = self.prior.gaussian
        nu0 = self._tensor(gaussian.degrees_of_freedom, like)
        return Wishart(nu0, precision_matrix=self._tensor(gaussian.covariance_prior, like)).expand((self.k,))

    def _locs_prior(self, precision: Tensor) -> dist.TorchDistribution:
        if self.prior is None:
            return Flat(constraints.real_vector, (self.k,), (self.dim,))
        m0 = self._tensor(self.prior.gaussian.mean_prior, precision)
        return PrecisionMultivariateNormal(m0, self.prior.gaussian.mean_precision * precision)

    def _dofs_prior(self, like: Tensor) -> dist.TorchDistribution:
        if self.prior is None:
            return Flat(constraints.positive, (self.k,), ())
        shape, rate = self._tensor(self.prior.dofs_shape, like), self._tensor(self.prior.dofs_rate, like)
        return dist.Gamma(shape, rate).expand((self.k,))

    def to_sites(self, params: Params) -> dict[str, Tensor]:
        precision = torch.linalg.inv(params["covariances"])
        sites = {
            "weights": params["weights"].clone(),
            "precision": 0.5 * (precision + precision.mT),
            "locs": params["means"].clone(),
        }
        if self.fixed_dofs is None:
            sites["dofs"] = params["dofs"].clone()
        return sites

    def from_sites(self, sites: Mapping[str, Tensor]) -> Params:
        covariances = torch.linalg.inv(sites["precision"])
        locs = sites["locs"]
        dofs = sites["dofs"] if self.fixed_dofs is None else locs.new_full((self.k,), self.fixed_dofs)
        return {
            "weights": sites["weights"],
            "means": locs,
            "covariances": 0.5 * (covariances + covariances.mT),
            "dofs": dofs,
        }

    def project(self, params: Params) -> Params:
        """Weights normalized; the dofs set to ``model.dofs`` when it fixes them."""
        out = dict(super().project(params))
        if self.fixed_dofs is not None:
            out["dofs"] = torch.full_like(out["dofs"], self.fixed_dofs)
        return out

    # ---- ECM: the design is (x - center, E[τ], E[log τ], H(q(τ))) -----------------------------

    def em_center(self, x: Tensor) -> Tensor:
        """Points are measured from the mean of x, so that the second moments keep their digits."""
        return x.mean(0)

    def design_rows(self) -> int:
        return self.dim + 3 * self.k

    def design(self, rows: Tensor, center: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """(D + 3K, B): x - center (D rows) and room for the E-step's E[τ], E[log τ] and entropy
        of q(τ) per component (K rows each), which ``block_log_joint`` fills in."""
        b = rows.shape[0]
        design = (
            rows.new_empty(self.design_rows(), b)
            if out is None
            else out[: self.design_rows() * b].view(-1, b)
        )
        design[: self.dim] = (rows if center is None else rows - center).T
        return design

    def prepare(self, params: Params, center: Tensor | None = None) -> Prepared:
        means = params["means"] if center is None else params["means"] - center
        chol = torch.linalg.cholesky(params["covariances"])
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        dofs = params["dofs"]
        d = self.dim
        log_norm = (
            torch.log(params["weights"])
            + torch.lgamma(0.5 * (dofs + d))
            - torch.lgamma(0.5 * dofs)
            - 0.5 * d * torch.log(dofs * math.pi)
            - 0.5 * log_det
        )
        eye = torch.eye(d, dtype=chol.dtype, device=chol.device).expand_as(chol)
        whiten = torch.linalg.solve_triangular(chol, eye, upper=False)  # chol^-1: δ = |chol^-1 (x - μ)|²
        return Prepared(
            torch.log(params["weights"]), means, chol, log_det, whiten, dofs[:, None], log_norm[:, None]
        )

    def block_log_joint(self, design: Tensor, prepared: Prepared, out: Tensor | None = None) -> Tensor:
        """log π_k + log t(x_n | ν_k, μ_k, Σ_k), (K, B); writes q(τ)'s moments into the design."""
        d, k = self.dim, self.k
        delta = _mahalanobis(design[:d], prepared)
        dofs = prepared.dofs
        shape = 0.5 * (dofs + d)  # q(τ | z = k) = Gamma(shape, rate), rate = (ν + δ) / 2
        log_rate = torch.log(0.5 * (dofs + delta))
        result = prepared.log_norm - shape * torch.log1p(delta / dofs)
        digamma_shape = torch.digamma(shape)
        design[d : d + k] = shape / torch.exp(log_rate)
        design[d + k : d + 2 * k] = digamma_shape - log_rate
        design[d + 2 * k :] = shape - log_rate + torch.lgamma(shape) + (1.0 - shape) * digamma_shape
        if out is None:
            return result
        return out.copy_(result)

    def log_joint(self, x: Tensor, params: Params) -> Tensor:
        center = x.mean(0)
        return self.block_log_joint(self.design(x, center), self.prepare(params, center)).T

    def new_stats(self, like: Tensor) -> Stats:
        """nk = Σ r, su = Σ r u, sux = Σ r u x (K, D), suxx = Σ r u x x^T (K, D, D),
        slog = Σ r E[log τ], sent = Σ r H(q(τ)); x measured from the fit's center."""
        k, d = self.k, self.dim
        stats = {name: like.new_zeros(k) for name in ("nk", "su", "slog", "sent")}
        stats["sux"] = like.new_zeros(k, d)
        stats["suxx"] = like.new_zeros(k, d, d)
        return stats

    def accumulate(self, stats: Stats, design: Tensor, resp: Tensor) -> None:
        d, k = self.dim, self.k
        x = design[:d]
        weighted = resp * design[d : d + k]  # r u (K, B)
        stats["nk"].add_(resp.sum(1))
        stats["su"].add_(weighted.sum(1))
        stats["sux"].addmm_(weighted, x.T)
        # one GEMM, (K D, B) @ (B, D), rather than an einsum that torch runs as K small ones
        stats["suxx"].add_((weighted[:, None, :] * x[None]).reshape(k * d, -1).mm(x.T).view(k, d, d))
        stats["slog"].add_((resp * design[d + k : d + 2 * k]).sum(1))
        stats["sent"].add_((resp * design[d + 2 * k :]).sum(1))

    def component_mass(self, stats: Stats) -> Tensor:
        return stats["nk"]

    def expected_log_joint(self, stats: Stats, prepared: Prepared) -> Tensor:
        """Σ_n Σ_k r_nk (E_q[log p(x_n, τ, z_n = k | θ)] + H(q(τ_n | k))): a lower bound of
        Σ r log p(x, z | θ), equal to it at the θ of the E-step that made the statistics."""
        d = self.dim
        dofs = prepared.dofs[:, 0]
        mu = prepared.means
        scatter = (
            stats["suxx"]
            - mu[:, :, None] * stats["sux"][:, None, :]
            - stats["sux"][:, :, None] * mu[:, None, :]
            + stats["su"][:, None, None] * mu[:, :, None] * mu[:, None, :]
        )
        trace = torch.diagonal(torch.cholesky_solve(scatter, prepared.chol), dim1=-2, dim2=-1).sum(-1)
        half = 0.5 * dofs
        per_count = (
            prepared.log_weights
            - 0.5 * d * math.log(2 * math.pi)
            - 0.5 * prepared.log_det
            + half * torch.log(half)
            - torch.lgamma(half)
        )
        total = stats["nk"] @ per_count + (0.5 * d + half - 1.0) @ stats["slog"] - 0.5 * trace.sum()
        return total - half @ stats["su"] + stats["sent"].sum()

    def m_step_stats(
        self, stats: Stats, center: Tensor | None = None, reg_covar: float = 0.0, use_prior: bool = True
    ) -> Params:
        """The CM-steps: weights, means and scales given ν (weighted by r u), then each ν_k."""
        d = self.dim
        eps = 10 * torch.finfo(stats["nk"].dtype).eps
        nk, su = stats["nk"] + eps, stats["su"] + eps
        sux, suxx = stats["sux"], stats["suxx"]
        shift = sux.new_zeros(d) if center is None else center
        prior = self.prior if use_prior else None
        if prior is None:
            weights = nk / nk.sum()
            means = sux / su[:, None]
            numerator = suxx - means[:, :, None] * sux[:, None, :]
            count = nk
        else:
            gaussian = prior.gaussian
            raw = nk + gaussian.weight_concentration - 1.0
            weights = raw / raw.sum()
            beta0, m0 = gaussian.mean_precision, gaussian.mean_prior.to(sux) - shift
            means = (beta0 * m0 + sux) / (beta0 + su)[:, None]
            deviation = means - m0
            numerator = (
                suxx
                - means[:, :, None] * sux[:, None, :]
                - sux[:, :, None] * means[:, None, :]
                + su[:, None, None] * means[:, :, None] * means[:, None, :]
                + beta0 * deviation[:, :, None] * deviation[:, None, :]
                + gaussian.covariance_prior.to(sux)
            )
            count = nk + gaussian.degrees_of_freedom - d
        covariances = numerator / count[:, None, None]
        covariances = 0.5 * (covariances + covariances.mT) + reg_covar * torch.eye(
            d, dtype=sux.dtype, device=sux.device
        )
        if self.fixed_dofs is not None:
            dofs = torch.full_like(nk, self.fixed_dofs)
        else:
            gamma = (prior.dofs_shape, prior.dofs_rate) if prior is not None else None
            mean_term = ((stats["slog"] - stats["su"]) / nk).tolist()
            dofs = sux.new_tensor(
                [solve_dofs(c, n, gamma) for c, n in zip(mean_term, nk.tolist(), strict=True)]
            )
        return {"weights": weights, "means": means + shift, "covariances": covariances, "dofs": dofs}

    def m_step(self, x: Tensor, resp: Tensor, reg_covar: float = 0.0, use_prior: bool = True) -> Params:
        """θ maximizing Σ_n Σ_k resp[n, k] log p(x_n, z_n = k | θ) (+ log p(θ)): the t's have no
        closed-form fit, so ECME with the responsibilities held fixed, from the Gaussian fit (ν =
        30 unless fixed), until θ stops moving (at most ``M_STEP_ITERATIONS``)."""
        center = x.mean(0)
        design = self.design(x, center)
        d, k = self.dim, self.k
        design[d:] = 0.0  # τ = 1: the Gaussian fit, whose ν-step is skipped below
        design[d : d + k] = 1.0
        stats = self.new_stats(x)
        self.accumulate(stats, design, resp.T)
        params = dict(self.m_step_stats(stats, center, reg_covar, use_prior))
        params["dofs"] = torch.full_like(params["dofs"], 30.0 if self.fixed_dofs is None else self.fixed_dofs)
        for _ in range(M_STEP_ITERATIONS):
            self.block_log_joint(design, self.prepare(params, center))
            stats = self.new_stats(x)
            self.accumulate(stats, design, resp.T)
            new = dict(self.m_step_stats(stats, center, reg_covar, use_prior))
            if self.fixed_dofs is None:
                # ECME (Liu & Rubin 1995): ν_k maximizes the t log-likelihood itself, which
                # converges in far fewer steps than ECM's ν-step, and reaches ν = ∞ (the range's
                # end) at once when the weighted points have no heavier tails than a Gaussian's
                delta = _mahalanobis(design[:d], self.prepare(new, center))
                prior = self.prior if use_prior else None
                gamma = (prior.dofs_shape, prior.dofs_rate) if prior is not None else None
                new["dofs"] = new["dofs"].new_tensor(
                    [_dofs_ecme(delta[j], resp[:, j], d, gamma) for j in range(k)]
                )
            moved = max(
                float(((new[name] - params[name]).abs() / (1.0 + params[name].abs())).max()) for name in new
            )
            params = dict(new)
            if moved < 1e-13:
                break
        return params


M_STEP_ITERATIONS = 2000


def _mahalanobis(x: Tensor, prepared: Prepared) -> Tensor:
    """δ_kn = (x_n - μ_k)^T Σ_k^-1 (x_n - μ_k) for points x (D, B), measured as the means: (K, B)."""
    whitened = prepared.whiten @ x - (prepared.whiten @ prepared.means[:, :, None])  # (K, D, B)
    return whitened.pow(2).sum(1)


def _dofs_ecme(delta: Tensor, resp: Tensor, d: int, gamma: tuple[float, float] | None) -> float:
    """The ν in ``DOFS_RANGE`` where Σ_n r_n log t(x_n | ν, μ, Σ) (+ log Gamma(ν | a, b)) stops
    rising, for one component's distances δ (N,) and responsibilities r (N,)."""
    seen = resp > 0  # hard assignments (k-means seeding) leave most points out of a component
    delta_np, resp_np = delta[seen].double().cpu().numpy(), resp[seen].double().cpu().numpy()
    count = float(resp_np.sum())
    low, high = DOFS_RANGE

    def slope(nu: float) -> float:
        per_point = (nu + d) * delta_np / (nu * (nu + delta_np)) - np.log1p(delta_np / nu)
        value = 0.5 * (
            count * (digamma((nu + d) / 2) - digamma(nu / 2) - d / nu) + float(resp_np @ per_point)
        )
        if gamma is not None:
            value += (gamma[0] - 1.0) / nu - gamma[1]
        return value

    if slope(high) >= 0.0:
        return high
    if slope(low) <= 0.0:
        return low
    return float(brentq(slope, low, high, xtol=1e-14, rtol=1e-15, maxiter=500))


def solve_dofs(mean_term: float, count: float, gamma: tuple[float, float] | None = None) -> float:
    """The ν-step of ECM: the root in ``DOFS_RANGE`` of

        log(ν/2) + 1 - ψ(ν/2) + c + (2 / n) ((a - 1) / ν - b) = 0,

    c = (1/n) Σ_n r_n (E[log τ_n] - E[τ_n]) (``mean_term``), n = Σ_n r_n (``count``), and the
    Gamma(a, rate b) prior's term only with ``gamma``. The left side decreases in ν, so the root
    is unique; an end of the range when there is none inside it (c ≥ -1: no tails seen)."""
    low, high = DOFS_RANGE

    def slope(nu: float) -> float:
        value = math.log(nu / 2) + 1.0 - float(digamma(nu / 2)) + mean_term
        if gamma is not None:
            value += 2.0 / count * ((gamma[0] - 1.0) / nu - gamma[1])
        return value

    if slope(high) >= 0.0:
        return high
    if slope(low) <= 0.0:
        return low
    return float(brentq(slope, low, high, xtol=1e-14, rtol=1e-15, maxiter=500))
