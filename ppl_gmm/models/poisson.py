"""A mixture of independent Poissons for count data, declared once in Pyro (``_independent.py``).

Global sites: ``weights`` (K) Dirichlet(α0) and ``rates`` (K, D) Gamma(a0, rate b0) each, or flat
priors with ``prior: none``. Local: ``z`` Categorical(weights), enumerated; ``x`` (D) independent
Poisson(rates[z]). Point estimates hold float64 ``weights`` (K) and ``rates`` (K, D).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyro.distributions as dist
import torch
from pydantic import Field
from torch import Tensor
from torch.distributions import constraints

from ..config import ModelOptions, Strict
from ..errors import UserError
from ._independent import IndependentMixture
from .base import MODELS, Params
from .conjugate import ConjugatePosterior

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
class PoissonMixture(IndependentMixture):
    name = "poisson_mixture"
    options = PoissonOptions
    site = "rates"
    support = constraints.positive
    mode_fields = ("weight_concentration", "rate_shape")

    @classmethod
    def conjugate_prior(cls, cfg: Any, x: Tensor) -> tuple[float, float, float]:
        hyper = cfg.hyperparameters
        return (
            hyper.weight_concentration,
            hyper.rate_shape,
            hyper.rate_rate or hyper.rate_shape / max(float(x.mean()), 1e-3),
        )

    def likelihood(self, theta: Tensor) -> dist.TorchDistribution:
        return dist.Poisson(theta)

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
                f"{where}: model poisson_mixture needs counts (non-negative integers), but row {row + 1} "
                f"(counted from 1, a CSV header not counted) holds {value:g} ({bad.size} such row(s)). "
                "Use counts, or model.name: gmm."
            )

    # ---- closed-form EM: T(x) = x, η = log λ, A(η) = Σ_d λ_d, log h(x) = -Σ_d log x_d! ------------

    def sufficient(self, rows: Tensor) -> Tensor:
        return rows

    def log_base(self, rows: Tensor) -> Tensor:
        return -torch.lgamma(rows + 1.0).sum(1)

    def natural(self, params: Params) -> tuple[Tensor, Tensor]:
        rates = params["rates"]
        return torch.log(rates), torch.log(params["weights"]) - rates.sum(1)

    def m_step_moments(self, nk: Tensor, sums: Tensor, use_prior: bool) -> Params:
        nk = nk + 10 * torch.finfo(nk.dtype).eps
        weights = self.m_step_weights(nk, use_prior)
        if self.prior is None or not use_prior:
            return {"weights": weights, "rates": (sums / nk[:, None]).clamp_min(RATE_FLOOR)}
        _, a0, b0 = self.prior
        return {"weights": weights, "rates": (sums + a0 - 1.0) / (nk[:, None] + b0)}

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
