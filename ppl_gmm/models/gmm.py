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

Exact EM uses the design kernel of ``_gmm_em.py`` behind the ``ClosedFormEM`` hooks: its
statistics are one matrix of Σ_n r_nk (φ(x_n), 1, x_n) (key ``moments``, or ``moments_t``
transposed), plus, for tied, Σ_n φ(x_n) (key ``second``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch import Tensor
from torch.distributions import constraints

from ..config import ModelOptions, Strict
from ..errors import UserError
from . import transforms  # noqa: F401  (registers biject_to(positive_definite) for guides)
from ._covariance import COVARIANCE_TYPES, Moments
from ._gmm_em import (
    DesignBuffer,
    Prepared,
    block_design,
    block_log_joint,
    moments_by_rows,
    phi_count,
    prepare_gaussians,
)
from .base import MODELS, ClosedFormEM, Flat, LatentModel, Params, Stats
from .distributions import PrecisionMultivariateNormal

__all__ = [
    "COVARIANCE_TYPES",
    "ConjugatePrior",
    "Flat",
    "GMMHyperparameters",
    "GMMOptions",
    "GaussianMixture",
    "gaussian_log_prob",
    "make_synthetic",
    "precision_cholesky",
    "stick_breaking_log_weights",
    "sticks_from_weights",
]


class GMMHyperparameters(Strict):
    """Conjugate prior hyperparameters; null means the data-based default (as scikit-learn's
    BayesianGaussianMixture). Used only with ``model.prior: conjugate``."""

    # dirichlet: π ~ Dirichlet(γ); dirichlet_process: scikit-learn's truncated stick-breaking,
    # K sticks v_k ~ Beta(1, γ) (posterior inference only: its mode lies on the boundary)
    weight_prior: Literal["dirichlet", "dirichlet_process"] = "dirichlet"
    # γ per component; default 1.0 for the Dirichlet (flat: keeps MAP weights inside the
    # simplex), 1/K for the dirichlet_process (scikit-learn's default)
    weight_concentration: float | None = Field(None, gt=0)
    mean_precision: float = Field(1.0, gt=0)  # beta_0: prior strength on the means
    mean_prior: list[float] | None = None  # m_0 (D); default: the train mean
    degrees_of_freedom: float | None = Field(None, gt=0)  # nu_0; default: D
    # the Wishart's inverse scale W_0^-1: a number, a (D) diagonal or a (D, D) matrix;
    # default: the train covariance, projected on the covariance type
    covariance_prior: float | list[float] | list[list[float]] | None = None


class GMMOptions(ModelOptions):
    name: Literal["gmm"] = "gmm"
    covariance: Literal["full", "diag", "tied", "spherical"] = "full"
    hyperparameters: GMMHyperparameters = GMMHyperparameters()


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


@MODELS.register("gmm")
class GaussianMixture(LatentModel, ClosedFormEM):
    """K-component Gaussian mixture with a covariance type and an optional conjugate prior."""

    name = "gmm"
    options = GMMOptions
    component_axes = {"weights": (0,), "means": (0,), "covariances": (0,)}
    pivot = "means"
    backend_fields = {"reg_covar": 1e-6}

    def __init__(self, k: int, dim: int, covariance: str, prior: ConjugatePrior | None) -> None:
        self.k = k
        self.dim = dim
        self.covariance = covariance
        self.prior = prior
        self._type = COVARIANCE_TYPES[covariance]

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> GaussianMixture:
        assert isinstance(cfg, GMMOptions)
        prior = None
        if cfg.prior == "conjugate":
            prior = _default_prior(cfg.hyperparameters, cfg.covariance, cfg.k, x)
        return cls(cfg.k, int(x.shape[1]), cfg.covariance, prior)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        k, d = self.k, self.dim
        return {"weights": (k,), "means": (k, d), "covariances": (k, d, d)}

    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        """Weights from Dirichlet(10), means at least ``separation`` apart where the space allows
        it, covariances with eigenvalues in [0.5, 1.5] (full whatever the covariance type)."""
        k, dim = self.k, self.dim
        weights = rng.dirichlet(np.full(k, 10.0))
        radius = separation * max(1.0, k ** (1.0 / dim))
        means = np.empty((k, dim))
        for j in range(k):
            candidates = rng.uniform(-radius, radius, size=(256, dim))
            if j == 0:
                means[j] = candidates[0]
                continue
            gaps = np.linalg.norm(candidates[:, None, :] - means[None, :j], axis=-1).min(axis=1)
            ok = np.flatnonzero(gaps >= separation)
            means[j] = candidates[ok[0] if ok.size else int(np.argmax(gaps))]
        rotations = np.linalg.qr(rng.standard_normal((k, dim, dim)))[0]
        eigen = rng.uniform(0.5, 1.5, size=(k, dim))
        covariances = np.einsum("kij,kj,klj->kil", rotations, eigen, rotations)
        truth = {"weights": weights, "means": means, "covariances": covariances}
        return {name: torch.from_numpy(value) for name, value in truth.items()}

    def simulate(self, params: Params, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """n points of the mixture at θ, drawn in NumPy (faster than the declaration at large n,
        and the same distribution)."""
        weights, means, covariances = (params[name].numpy() for name in ("weights", "means", "covariances"))
        labels = rng.choice(self.k, size=n, p=weights / weights.sum())
        noise = np.einsum(
            "nij,nj->ni", np.linalg.cholesky(covariances)[labels], rng.standard_normal((n, self.dim))
        )
        return torch.from_numpy(means[labels] + noise), torch.from_numpy(labels)

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
        """The prior of the ``precision`` site, batch (K,) except for a shared (tied) one."""
        if self.prior is None:
            return self._type.flat_prior(self.k, self.dim)
        c0 = self._prior_tensor(self.prior.covariance_prior, like)
        nu0 = torch.tensor(self.prior.degrees_of_freedom, dtype=like.dtype, device=like.device)
        return self._type.precision_prior(nu0, c0, self.k, self.dim)

    def locs_prior(self, precision_tril: Tensor) -> dist.TorchDistribution:
        """The prior of the ``locs`` site given the (K, D, D) precisions' Cholesky factors, batch (K,)."""
        if self.prior is None:
            return Flat(constraints.real_vector, (self.k,), (self.dim,))
        m0 = self._prior_tensor(self.prior.mean_prior, precision_tril)
        # β0 Λ = (√β0 C)(√β0 C)ᵀ
        return PrecisionMultivariateNormal(
            m0, precision_tril=math.sqrt(self.prior.mean_precision) * precision_tril
        )

    def full_precision(self, precision: Tensor) -> Tensor:
        """(K, D, D) precision matrices from the ``precision`` site's value."""
        return self._type.to_full(precision, self.k, self.dim)

    def precision_tril(self, precision: Tensor) -> Tensor:
        """The (K, D, D) precisions' Cholesky factors from the ``precision`` site's value: one
        factorization for the locations' prior and the likelihood."""
        return torch.linalg.cholesky(self.full_precision(precision))

    @config_enumerate
    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Tensor:
        like = x if x is not None else torch.zeros((), dtype=torch.get_default_dtype())
        n = x.shape[0] if x is not None else n
        # mini-batches: the plate subsamples and scales the likelihood by n / batch_size
        subsample = None if batch_size is None or n is None or batch_size >= n else batch_size

        # global variables
        if not self.stick_breaking:
            weights = pyro.sample("weights", self.weights_prior(like))
        if self._type.shared:
            precision = pyro.sample("precision", self.precision_prior(like))
        with pyro.plate("components", self.k):
            if self.stick_breaking:
                sticks = pyro.sample("sticks", self.weights_prior(like))
            if not self._type.shared:
                precision = pyro.sample("precision", self.precision_prior(like))
            precision_tril = self.precision_tril(precision)
            locs = pyro.sample("locs", self.locs_prior(precision_tril))

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
                PrecisionMultivariateNormal(
                    Vindex(locs)[..., z, :], precision_tril=Vindex(precision_tril)[..., z, :, :]
                ),
                obs=x,
            )

    # ---- what exact inference needs, equal to the declaration ------------------------------

    block_rows: int = 4096  # rows per block: large enough for fast GEMMs, small enough for cache

    def check_mode(self, method: str) -> None:
        if self.stick_breaking:
            raise UserError(
                f"model.hyperparameters.weight_prior: {method} needs the posterior mode, but found "
                "'dirichlet_process', whose mode lies on the boundary of the sticks' space (or does "
                "not exist). Use the vb or svi backend, or set model.hyperparameters.weight_prior: "
                "dirichlet."
            )

    def check_em(self, method: str) -> None:
        self.check_mode(method)
        prior = self.prior
        if prior is not None and prior.weight_concentration < 1:
            raise UserError(
                f"model.hyperparameters.weight_concentration: {method} needs a Dirichlet "
                f"concentration of at least 1 for the weights' mode to exist, but found "
                f"{prior.weight_concentration}. Try 1.0."
            )

    def em_center(self, x: Tensor) -> Tensor:
        """Points are measured from the mean of x: second moments about a typical point keep
        their digits."""
        return x.mean(0)

    def prepare(self, params: Params, center: Tensor | None = None) -> Prepared:
        """The E-step's per-iteration constants for θ (see ``Prepared``)."""
        means = params["means"]
        center = means.new_zeros(means.shape[1]) if center is None else center
        return prepare_gaussians(params["weights"], means, params["covariances"], self._type.kernel, center)

    def design_rows(self) -> int:
        """How many rows a point's design (φ(x), 1, x) has (see ``block_design``)."""
        return phi_count(self._type.kernel, self.dim) + 1 + self.dim

    def design_buffer(self, like: Tensor, rows: int) -> DesignBuffer:
        """A buffer, in like's dtype and device, for the designs of blocks of up to ``rows``."""
        return DesignBuffer(like, self._type.kernel, self.dim, rows)

    def design(self, rows: Tensor, center: Tensor | None = None, out: DesignBuffer | None = None) -> Tensor:
        """The design (F + 1 + D, B) of points rows (B, D) measured from ``center``, shared by the
        E-step and the statistics; ``out`` from ``design_buffer`` (see ``block_design``)."""
        center = rows.new_zeros(self.dim) if center is None else center
        return block_design(rows, center, self._type.kernel, out)

    def block_log_joint(self, design: Tensor, prepared: Prepared, out: Tensor | None = None) -> Tensor:
        """log p(x_n, z_n = k | θ) for a block's design; returns (K, B)."""
        return block_log_joint(design, prepared, out)

    def log_joint(self, x: Tensor, params: Params) -> Tensor:
        shift = x.mean(0)
        prepared = self.prepare(params, shift)
        blocks = [block_log_joint(self.design(rows, shift), prepared).T for rows in x.split(self.block_rows)]
        return torch.cat(blocks) if len(blocks) != 1 else blocks[0]

    def new_stats(self, like: Tensor) -> Stats:
        """Zero statistics in like's dtype and device (see the module's docstring)."""
        k, d = self.k, self.dim
        f = phi_count(self._type.kernel, d)
        rows = f + 1 + d if self._type.weighted_second else 1 + d
        stats = (
            {"moments_t": like.new_zeros(rows, k)}
            if moments_by_rows(like.dtype, k)
            else {"moments": like.new_zeros(k, rows)}
        )
        if not self._type.weighted_second:
            stats["second"] = like.new_zeros(f)
        return stats

    def accumulate(self, stats: Stats, design: Tensor, resp: Tensor) -> None:
        """Add points with design (F + 1 + D, B) (measured from the fit's center) and
        responsibilities resp (K, B) to ``stats``, in place: one GEMM adds Σ_n r_nk (φ(x_n), 1,
        x_n) (tied: Σ_n r_nk (1, x_n), and Σ_n φ(x_n) unweighted)."""
        if "second" in stats:
            f = design.shape[0] - self.dim - 1
            stats["second"].add_(design[:f].sum(1))
            design = design[f:]
        if "moments_t" in stats:
            stats["moments_t"].addmm_(design, resp.T)
        else:
            stats["moments"].addmm_(resp, design.T)

    def moments(self, stats: Stats) -> Moments:
        """The views nk, sums and second of the statistics (see ``Moments``)."""
        f = 0 if "second" in stats else phi_count(self._type.kernel, self.dim)
        raw = stats["moments_t"].T if "moments_t" in stats else stats["moments"]
        second = stats["second"] if "second" in stats else raw[:, :f]
        return Moments(raw[:, f], raw[:, f + 1 :], second)

    def expected_log_joint(self, stats: Stats, prepared: Prepared) -> Tensor:
        """Σ_n Σ_k r_nk log p(x_n, z_n = k | θ) from the statistics alone: ``block_log_joint`` is
        affine in a point's features, log p(x, k | θ) = log_norm_k - ½ (matrix_k · φ(x)
        - 2 linear_k · x + const_k), with x and the means measured from the same center."""
        nk, sums, second = self.moments(stats)
        if second.dim() == 1:  # tied: Σ_n φ(x_n) unweighted; one precision, and Σ_k r_nk = 1
            quadratic = prepared.matrix[0] @ second
        else:
            quadratic = (prepared.matrix * second).sum()
        per_count = (prepared.log_norm - 0.5 * prepared.const).squeeze(1)
        return nk @ per_count + (prepared.linear * sums).sum() - 0.5 * quadratic

    def log_prior(self, params: Params) -> Tensor:
        weights = params["weights"]
        if self.prior is None:
            return torch.zeros((), dtype=weights.dtype, device=weights.device)
        sites = self.to_sites(params)
        return (
            self.weights_prior(weights).log_prob(sites[self.weight_site]).sum()
            + self.precision_prior(weights).log_prob(sites["precision"]).sum()
            + self.locs_prior(self.precision_tril(sites["precision"])).log_prob(sites["locs"]).sum()
        )

    def m_step(self, x: Tensor, resp: Tensor, reg_covar: float = 0.0, use_prior: bool = True) -> Params:
        center = x.mean(0)
        stats = self.new_stats(x)
        for rows, block_resp in zip(x.split(self.block_rows), resp.split(self.block_rows), strict=True):
            self.accumulate(stats, self.design(rows, center), block_resp.T)
        return self.m_step_stats(stats, center, reg_covar, use_prior)

    def m_step_stats(
        self, stats: Stats, center: Tensor | None = None, reg_covar: float = 0.0, use_prior: bool = True
    ) -> Params:
        """The M-step from sufficient statistics alone (see ``m_step``)."""
        d = self.dim
        moments = self.moments(stats)
        like = moments.sums
        shift = like.new_zeros(d) if center is None else center
        nk = moments.nk + 10 * torch.finfo(like.dtype).eps
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
            centered_means = moments.sums / nk[:, None]
            cov = kind.scatter_stats(moments, centered_means) / kind.ml_count(nk, d)
        else:
            raw = nk + prior.weight_concentration - 1.0
            weights = raw / raw.sum()
            beta0 = prior.mean_precision
            m0 = prior.mean_prior.to(like) - shift
            centered_means = (beta0 * m0 + moments.sums) / (beta0 + nk)[:, None]
            scale = kind.native(self._prior_scale(like)[None])
            numerator = scale + kind.scatter_stats(moments, centered_means)
            numerator = numerator + beta0 * kind.mean_deviation(centered_means - m0)
            cov = numerator / kind.map_count(nk, d, self.k, prior.degrees_of_freedom)
        covariances = kind.to_full(cov, self.k, d) + reg_covar * _eye_like(d, like)
        if prior is None and reg_covar == 0.0:
            _check_not_flat(covariances)
        return {"weights": weights, "means": centered_means + shift, "covariances": covariances}

    def component_mass(self, stats: Stats) -> Tensor:
        return self.moments(stats).nk

    def reseed(self, params: Params, components: Sequence[int], x: Tensor) -> Params:
        """Each of ``components`` restarted in turn at the point of x (N, D) that the live
        components explain worst (the lowest log p(x_n | θ); the first on ties), with the live
        components' pooled covariance Σ_k π_k Σ_k / Σ_k π_k, which keeps the covariance type, and
        half the largest live component's weight, taken from it. A restarted component is live
        for the next one."""
        weights, means, covariances = (params[name].clone() for name in ("weights", "means", "covariances"))
        live = torch.ones(self.k, dtype=torch.bool, device=weights.device)
        live[list(components)] = False
        if self._type.shared:
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
        return self._type.prior_scale(self.prior.covariance_prior.to(like), self.dim)

    def n_params(self) -> int:
        k, d = self.k, self.dim
        return self._type.n_cov_params(k, d) + k * d + k - 1

    def to_sites(self, params: Params) -> dict[str, Tensor]:
        precision = torch.linalg.inv(params["covariances"])
        precision = 0.5 * (precision + precision.mT)
        weights = params["weights"]
        if self.stick_breaking:
            weights = sticks_from_weights(weights / weights.sum())
        # copies: guides initialized from these values may update them in place
        return {
            self.weight_site: weights.clone(),
            "locs": params["means"].clone(),
            "precision": self._type.native(precision).clone(),
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

    def project(self, params: Params) -> Params:
        """Covariances projected on the covariance type (tied: their weighted average), weights
        normalized."""
        k, d = self.k, self.dim
        weights = params["weights"]
        covariances = params["covariances"]
        native = self._type.native(covariances)
        if self._type.shared:
            native = (weights[:, None, None] * covariances).sum(0)
        return {
            "weights": weights / weights.sum(),
            "means": params["means"],
            "covariances": self._type.to_full(native, k, d),
        }


# ---- helpers: Gaussian densities, stick-breaking, the prior from the config ------------------


def _eye_like(d: int, ref: Tensor) -> Tensor:
    return torch.eye(d, dtype=ref.dtype, device=ref.device)


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


def make_synthetic(
    n: int, dim: int, k: int, separation: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """n points (n, D), their labels (n,) and the truth of a random K-component full-covariance
    mixture (``GaussianMixture.sample_truth``)."""
    model = GaussianMixture(k, dim, "full", None)
    truth = model.sample_truth(rng, separation)
    x, labels = model.simulate(truth, n, rng)
    return x.numpy(), labels.numpy(), {name: value.numpy() for name, value in truth.items()}


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


FLAT = 1e12  # a correlation matrix this ill-conditioned holds points on a lower-dimensional plane


def _check_not_flat(covariances: Tensor) -> None:
    """Raise ``LinAlgError`` if a maximum-likelihood covariance without regularization is singular
    to working precision: its correlation matrix (the covariance scaled to unit diagonal, so the
    features' own scales do not count) has a condition number above ``FLAT``, as when a component
    has collapsed onto D or fewer points in D dimensions. Its log density would be rounding noise,
    and the likelihood is unbounded there."""
    if covariances.shape[-1] == 1:
        return
    scale = (
        torch.diagonal(covariances, dim1=-2, dim2=-1).clamp_min(torch.finfo(covariances.dtype).tiny).rsqrt()
    )
    correlation = covariances * scale[:, :, None] * scale[:, None, :]
    eigenvalues = torch.linalg.eigvalsh(correlation)
    if bool((eigenvalues[:, 0] * FLAT < eigenvalues[:, -1]).any()):
        raise torch.linalg.LinAlgError("a component's covariance is singular to working precision")


def _default_prior(cfg: GMMHyperparameters, covariance: str, k: int, x: Tensor) -> ConjugatePrior:
    """scikit-learn's BayesianGaussianMixture defaults, from the train data x (N, D)."""
    x = x.to(torch.float64)
    d = x.shape[1]
    empirical = torch.atleast_2d(torch.cov(x.T)) if x.shape[0] > 1 else torch.eye(d, dtype=x.dtype)
    kind = COVARIANCE_TYPES[covariance]
    native_default = kind.default_scale(empirical)
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
    problem = kind.check_degrees_of_freedom(nu0, d)
    if problem:
        raise UserError(f"model.hyperparameters.degrees_of_freedom: {problem}, but found {nu0}. Try {d}.")
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
    kind = COVARIANCE_TYPES[covariance]
    native = kind.native(tensor[None])
    return native if kind.shared else native[0]
