"""What the Poisson and Bernoulli mixtures share: a mixture whose components draw each of the D
features independently from one exponential family, with conjugate priors.

Global sites: ``weights`` (K) Dirichlet(α0), and the components' parameter ``site`` (K, D), each
entry from ``component_family(a0, b0)`` (flat on ``support`` with ``prior: none``). Local: ``z``
Categorical(weights), enumerated; ``x`` (D) from ``likelihood`` at the component's parameters.
A model file gives the family's pieces; the declaration, the parameter layout and the weights'
part of every update are here.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch import Tensor
from torch.distributions.constraints import Constraint

from ..config import ModelOptions
from ..errors import UserError
from .base import ExpFamilyEM, Flat, LatentModel, Params
from .conjugate import ConjugateVB

__all__ = ["IndependentMixture"]


class IndependentMixture(ExpFamilyEM, ConjugateVB, LatentModel):
    site: ClassVar[str]  # the components' parameter, (K, D)
    support: ClassVar[Constraint]  # of each entry of ``site``
    # the hyperparameters, in the order of (α0, a0, b0), that must be at least 1 for a mode
    mode_fields: ClassVar[tuple[str, ...]]
    standardizable = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.component_axes = {"weights": (0,), cls.site: (0,)}
        cls.pivot = cls.component_site = cls.site

    def __init__(self, k: int, dim: int, prior: tuple[float, float, float] | None) -> None:
        self.k, self.dim, self.prior = k, dim, prior  # prior: (α0, a0, b0)

    @classmethod
    @abstractmethod
    def conjugate_prior(cls, cfg: Any, x: Tensor) -> tuple[float, float, float]:
        """(α0, a0, b0) from the model's options and the train data x (N, D)."""

    @abstractmethod
    def likelihood(self, theta: Tensor) -> dist.TorchDistribution:
        """The distribution of one feature given its parameters theta (..., D)."""

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> LatentModel:
        prior = cls.conjugate_prior(cfg, x) if cfg.prior == "conjugate" else None
        model = cls(cfg.k, int(x.shape[1]), prior)
        model.example = x[:1].clone()
        return model

    @property
    def has_prior(self) -> bool:
        return self.prior is not None

    @config_enumerate
    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Tensor:
        like = x if x is not None else torch.zeros((), dtype=torch.get_default_dtype())
        n = x.shape[0] if x is not None else n
        subsample = None if batch_size is None or n is None or batch_size >= n else batch_size
        k, d = self.k, self.dim

        # global variables
        if self.prior is None:
            weights_prior, theta_prior = (
                Flat(dist.constraints.simplex, (), (k,)),
                Flat(self.support, (k,), (d,)),
            )
        else:
            alpha0, a0, b0 = (torch.tensor(v, dtype=like.dtype, device=like.device) for v in self.prior)
            weights_prior = dist.Dirichlet(alpha0.expand(k))
            theta_prior = self.component_family(a0, b0).expand((k, d)).to_event(1)
        weights = pyro.sample("weights", weights_prior)
        with pyro.plate("components", k):
            theta = pyro.sample(self.site, theta_prior)

        # local variables
        with pyro.plate("data", n, subsample_size=subsample) as index:
            if x is not None and subsample is not None:
                x = x[index]
            z = pyro.sample("z", dist.Categorical(weights))
            return pyro.sample("x", self.likelihood(Vindex(theta)[..., z, :]).to_event(1), obs=x)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weights": (self.k,), self.site: (self.k, self.dim)}

    def check_em(self, method: str) -> None:
        values = dict(zip(self.mode_fields, self.prior or (), strict=False))
        low = {field: value for field, value in values.items() if value < 1.0}
        if low:
            fields = ", ".join(f"{field} = {value:g}" for field, value in low.items())
            raise UserError(
                f"model.hyperparameters: {method} needs the posterior mode, which exists only with "
                f"{' and '.join(self.mode_fields)} of at least 1, but found {fields}. Try 2.0."
            )

    def m_step_weights(self, nk: Tensor, use_prior: bool) -> Tensor:
        """The weights' part of the M-step: nk / N, or the Dirichlet posterior's mode."""
        if self.prior is not None and use_prior:
            nk = nk + self.prior[0] - 1.0
        return nk / nk.sum()

    def init_from_points(self, x: Tensor, index: Tensor, spread: Params) -> Params:
        """Equal weights, parameters halfway between the points x[index] and the data's means
        (``spread``), so that none starts on the boundary unless the data's does."""
        weights = torch.full((self.k,), 1.0 / self.k, dtype=x.dtype, device=x.device)
        return self.project({"weights": weights, self.site: 0.5 * (x[index] + spread[self.site])})
