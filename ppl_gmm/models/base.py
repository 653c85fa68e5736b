"""What every latent model offers: its Pyro declaration and what exact inference needs of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import ModelConfig
from ..registry import Registry

__all__ = ["LatentModel", "MODELS", "Params"]

Params = Mapping[str, Tensor]
"""A point estimate: named tensors, listed in each model's documentation."""


class LatentModel(ABC):
    """A mixture-type latent model p(x, z | θ) p(θ) with K discrete states per point.

    ``model`` is the one declaration in Pyro. ``log_joint`` is the same density written for
    speed, and the tests prove the two agree; ``m_step`` is the closed-form maximizer of the
    expected complete-data log-joint (plus the log prior when there is one).
    """

    name: ClassVar[str]
    k: int
    max_plate_nesting: ClassVar[int] = 1

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: ModelConfig, x: Tensor) -> LatentModel:
        """Build the model; data-based defaults (prior hyperparameters) come from train ``x``."""

    @property
    @abstractmethod
    def has_prior(self) -> bool:
        """Whether θ has a proper prior (MAP and Bayesian backends) or none (maximum likelihood)."""

    @abstractmethod
    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Tensor:
        """The Pyro model, with the assignments marked for enumeration; with ``batch_size`` the data
        plate subsamples that many points and scales their likelihood up to all of them."""

    @abstractmethod
    def log_joint(self, x: Tensor, params: Params) -> Tensor:
        """log p(x_n, z_n = k | θ) for x: (N, D); returns (N, K)."""

    @abstractmethod
    def log_prior(self, params: Params) -> Tensor:
        """log p(θ), a scalar; zero for the improper flat prior of maximum likelihood."""

    @abstractmethod
    def m_step(self, x: Tensor, resp: Tensor, reg_covar: float, use_prior: bool = True) -> Params:
        """θ maximizing Σ_n Σ_k resp[n, k] log p(x_n, z_n = k | θ) (+ log p(θ))."""

    # Blocked EM: one pass over row blocks computes the E-step and the M-step's statistics, so
    # memory stays O(block × K × D) whatever N is.

    # Rows are measured from a fixed ``shift`` (D,), so that second moments keep their digits.

    @abstractmethod
    def prepare(self, params: Params, shift: Tensor | None = None) -> Any:
        """Per-iteration constants that make ``block_log_joint`` cheap."""

    # A block of B points becomes a design (R, B), points along columns, from which both the
    # log-joint and the statistics are computed (GEMMs with long rows).

    @abstractmethod
    def design_rows(self) -> int:
        """How many rows R a point's design has."""

    @abstractmethod
    def design_buffer(self, like: Tensor, rows: int) -> Any:
        """What ``design`` writes the designs of blocks of up to ``rows`` points into, reused from
        block to block; in like's dtype and device."""

    @abstractmethod
    def design(self, rows: Tensor, shift: Tensor, out: Any = None) -> Tensor:
        """The design (R, B) of points rows (B, D) measured from ``shift``, written into ``out``
        (from ``design_buffer``) when given."""

    @abstractmethod
    def block_log_joint(self, design: Tensor, prepared: Any, out: Tensor | None = None) -> Tensor:
        """``log_joint`` of a block's design, transposed: (K, B); written into ``out`` when given."""

    @abstractmethod
    def new_stats(self, shift: Tensor) -> Any:
        """Zero sufficient statistics of points measured from ``shift`` (D,)."""

    @abstractmethod
    def accumulate(self, stats: Any, design: Tensor, resp: Tensor) -> None:
        """Add points with design (R, B) and responsibilities resp (K, B) to ``stats`` in place."""

    @abstractmethod
    def add_stats(self, stats: Any, other: Any) -> None:
        """Add the statistics ``other`` (about the same shift) to ``stats`` in place."""

    @abstractmethod
    def m_step_stats(self, stats: Any, reg_covar: float, use_prior: bool = True) -> Params:
        """``m_step`` from accumulated statistics."""

    @abstractmethod
    def component_mass(self, stats: Any) -> Tensor:
        """Σ_n resp[n, k] of the statistics: (K,), in points."""

    @abstractmethod
    def reseed(self, params: Params, components: Sequence[int], x: Tensor) -> Params:
        """θ with each of ``components`` (which lost their points) restarted on x (N, D), by a
        deterministic rule that leaves it able to claim points at the next E-step."""

    @abstractmethod
    def n_params(self) -> int:
        """Free parameters, counted as scikit-learn counts them (for BIC and AIC)."""

    @abstractmethod
    def to_sites(self, params: Params) -> dict[str, Tensor]:
        """The values of the Pyro model's global sites for a point estimate."""

    @abstractmethod
    def from_sites(self, sites: Mapping[str, Tensor]) -> Params:
        """The point estimate for values of the global sites."""

    @abstractmethod
    def check_params(self, params: Params, where: str) -> Params:
        """Validate shapes against this model (a ``UserError`` naming ``where`` if they differ)
        and project onto its parameter space; returns float64 tensors."""

    def log_likelihood(self, x: Tensor, params: Params) -> Tensor:
        """log p(x_n | θ) with the assignment summed out; returns (N,)."""
        return torch.logsumexp(self.log_joint(x, params), dim=-1)


MODELS: Registry[type[LatentModel]] = Registry("model")
