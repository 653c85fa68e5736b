"""A mixture of independent Poissons for count data, declared once in Pyro.

Global sites: ``weights`` (K) Dirichlet(α0) and ``rates`` (K, D) Gamma(a0, b0) each, or flat
priors with ``prior: none``. Local: ``z`` Categorical(weights), enumerated; ``x`` (D) independent
Poisson(rates[z]). Point estimates hold float64 ``weights`` (K) and ``rates`` (K, D).
"""

from __future__ import annotations

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
from .base import MODELS, ExpFamilyEM, Flat, LatentModel, Params
from .conjugate import ConjugatePosterior, ConjugateVB

__all__ = ["PoissonMixture", "PoissonOptions"]

RATE_FLOOR = 1e-10  # maximum-likelihood rates of a feature a component never counts stay above 0


class PoissonHyperparameters(Strict):
    weight_concentration: float = Field(1.0, gt=0)  # α0 of the weights' Dirichlet
    # a0 of each rate's Gamma: 2 adds one pseudo-count, so MAP rates stay positive
    rate_shape: float = Field(2.0, gt=0)
    rate_rate: float | None = Field(None, gt=0)  # b0; default a0 / the train mean count


class PoissonOptions(ModelOptions):
    name: Literal["poisson_mixture"] = "poisson_mixture"
    hyperparameters: PoissonHyperparameters = PoissonHyperparameters()


@MODELS.register("poisson_mixture")
class PoissonMixture(ExpFamilyEM, ConjugateVB, LatentModel):
    name = "poisson_mixture"
    options = PoissonOptions
    component_axes = {"weights": (0,), "rates": (0,)}
    pivot = "rates"
    component_site = "rates"  # the global site of q(θ) in variational Bayes
    standardizable = False

    def __init__(self, k: int, dim: int, prior: tuple[float, float, float] | None) -> None:
        self.k, self.dim, self.prior = k, dim, prior  # prior: (α0, a0, b0)

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> PoissonMixture:
        assert isinstance(cfg, PoissonOptions)
        hyper = cfg.hyperparameters
        rate = hyper.rate_rate or hyper.rate_shape / max(float(x.mean()), 1e-3)
        prior = (hyper.weight_concentration, hyper.rate_shape, rate) if cfg.prior == "conjugate" else None
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
            weights_prior, rates_prior = (
                Flat(constraints.simplex, (), (k,)),
                Flat(constraints.positive, (k,), (d,)),
            )
        else:
            alpha0, a0, b0 = (torch.tensor(v, dtype=like.dtype, device=like.device) for v in self.prior)
            weights_prior = dist.Dirichlet(alpha0.expand(k))
            rates_prior = dist.Gamma(a0, b0).expand((k, d)).to_event(1)
        weights = pyro.sample("weights", weights_prior)
        with pyro.plate("components", k):
            rates = pyro.sample("rates", rates_prior)

        # local variables
        with pyro.plate("data", n, subsample_size=subsample) as index:
            if x is not None and subsample is not None:
                x = x[index]
            z = pyro.sample("z", dist.Categorical(weights))
            return pyro.sample("x", dist.Poisson(Vindex(rates)[..., z, :]).to_event(1), obs=x)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weights": (self.k,), "rates": (self.k, self.dim)}

    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        """Weights from Dirichlet(10), rates Gamma(2, scale = ``separation``): mean 2·separation."""
        weights = rng.dirichlet(np.full(self.k, 10.0))
        rates = rng.gamma(2.0, separation, size=(self.k, self.dim))
        return {"weights": torch.from_numpy(weights), "rates": torch.from_numpy(rates)}

    @classmethod
    def check_data(cls, x: np.ndarray, where: str) -> None:
        bad = np.flatnonzero(((x < 0) | (x != np.round(x))).any(axis=1))
        if bad.size:
            row = int(bad[0])
            value = x[row][(x[row] < 0) | (x[row] != np.round(x[row]))][0]
            raise UserError(
                f"{where}: model poisson_mixture needs counts (non-negative integers), but row {row} "
                f"holds {value:g} ({bad.size} such row(s)). Use counts, or model.name: gmm."
            )

    def init_from_points(self, x: Tensor, index: Tensor, spread: Params) -> Params:
        """Equal weights, rates halfway between the points x[index] and the data's mean
        (``spread``), so that no rate starts at zero."""
        weights = torch.full((self.k,), 1.0 / self.k, dtype=x.dtype, device=x.device)
        return {"weights": weights, "rates": 0.5 * (x[index] + spread["rates"])}

    def check_em(self, backend: str) -> None:
        if self.prior is not None and min(self.prior[:2]) < 1.0:
            raise UserError(
                f"model.hyperparameters: {backend} needs the posterior mode, which exists only with "
                f"weight_concentration and rate_shape of at least 1, but found {self.prior[:2]}. Try 2.0."
            )

    # ---- closed-form EM: T(x) = x, log h(x) = -Σ_d log x_d! ---------------------------------

    def sufficient(self, rows: Tensor) -> Tensor:
        return rows

    def log_base(self, rows: Tensor) -> Tensor:
        return -torch.lgamma(rows + 1.0).sum(1)

    def natural(self, params: Params) -> tuple[Tensor, Tensor]:
        rates = params["rates"]
        return torch.log(rates), torch.log(params["weights"]) - rates.sum(1)

    def m_step_moments(self, nk: Tensor, sums: Tensor, use_prior: bool) -> Params:
        nk = nk + 10 * torch.finfo(nk.dtype).eps
        if self.prior is None or not use_prior:
            return {"weights": nk / nk.sum(), "rates": (sums / nk[:, None]).clamp_min(RATE_FLOOR)}
        alpha0, a0, b0 = self.prior
        weights = nk + alpha0 - 1.0
        return {"weights": weights / weights.sum(), "rates": (sums + a0 - 1.0) / (nk[:, None] + b0)}

    # ---- variational Bayes: q(λ_kd) = Gamma(a_kd, rate b_kd) ----------------------------------

    def component_family(self, a: Tensor, b: Tensor) -> dist.TorchDistribution:
        return dist.Gamma(a, b)

    def component_posterior(self, x: Tensor, resp: Tensor) -> tuple[Tensor, Tensor]:
        """a = a0 + Σ_n r_nk x_nd, b = b0 + Σ_n r_nk (the same for every feature)."""
        _, a0, b0 = self._prior()
        rate = (b0 + resp.sum(0))[:, None].expand(self.k, self.dim)
        return a0 + resp.T @ x, rate.contiguous()

    def expected_log_density(self, x: Tensor, q: ConjugatePosterior) -> Tensor:
        """Σ_d x_nd E[log λ_kd] - E[λ_kd] - log x_nd!, with E[log λ] = ψ(a) - log b, E[λ] = a / b."""
        e_log_rates = torch.digamma(q.a) - torch.log(q.b)
        return x @ e_log_rates.T - (q.a / q.b).sum(1) + self.log_base(x)[:, None]

    def component_mean(self, q: ConjugatePosterior) -> Tensor:
        return q.a / q.b
