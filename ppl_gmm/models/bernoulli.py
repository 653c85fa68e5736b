"""A mixture of independent Bernoullis for binary data, declared once in Pyro (``_independent.py``).

Global sites: ``weights`` (K) Dirichlet(α0) and ``probs`` (K, D) Beta(a0, b0) each, or flat
priors with ``prior: none``. Local: ``z`` Categorical(weights), enumerated; ``x`` (D) independent
Bernoulli(probs[z]). Point estimates hold float64 ``weights`` (K) and ``probs`` (K, D).
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

__all__ = ["BernoulliMixture", "BernoulliOptions"]

PROB_FLOOR = 1e-10  # maximum-likelihood probabilities stay inside (0, 1), so their logits are finite


def _inside(probs: Tensor) -> Tensor:
    """probs clamped to [floor, 1 - floor], the floor PROB_FLOOR or, where 1 - PROB_FLOOR rounds
    to 1 (float32), the dtype's epsilon."""
    floor = max(PROB_FLOOR, torch.finfo(probs.dtype).eps)
    return probs.clamp(floor, 1.0 - floor)


class BernoulliHyperparameters(Strict):
    weight_concentration: float = Field(1.0, gt=0)  # α0 of the weights' Dirichlet
    # a0 and b0 of each probability's Beta: 2 and 2 add one pseudo-count of each value (Laplace
    # smoothing), so MAP probabilities stay inside (0, 1)
    prob_a: float = Field(2.0, gt=0)
    prob_b: float = Field(2.0, gt=0)


class BernoulliOptions(ModelOptions):
    name: Literal["bernoulli_mixture"] = "bernoulli_mixture"
    hyperparameters: BernoulliHyperparameters = BernoulliHyperparameters()


@MODELS.register("bernoulli_mixture")
class BernoulliMixture(IndependentMixture):
    name = "bernoulli_mixture"
    options = BernoulliOptions
    site = "probs"
    support = constraints.unit_interval
    mode_fields = ("weight_concentration", "prob_a", "prob_b")

    @classmethod
    def conjugate_prior(cls, cfg: Any, x: Tensor) -> tuple[float, float, float]:
        hyper = cfg.hyperparameters
        return hyper.weight_concentration, hyper.prob_a, hyper.prob_b

    def likelihood(self, theta: Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(theta)

    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        """Weights from Dirichlet(10), probabilities Beta(1 / ``separation``, 1 / ``separation``):
        the larger the separation, the nearer 0 or 1 each is."""
        weights = rng.dirichlet(np.full(self.k, 10.0))
        probs = rng.beta(1.0 / separation, 1.0 / separation, size=(self.k, self.dim))
        probs = np.clip(probs, 1e-3, 1.0 - 1e-3)
        return {"weights": torch.from_numpy(weights), "probs": torch.from_numpy(probs)}

    @classmethod
    def check_data(cls, x: np.ndarray, where: str) -> None:
        bad = np.flatnonzero(((x != 0) & (x != 1)).any(axis=1))
        if bad.size:
            row = int(bad[0])
            value = x[row][(x[row] != 0) & (x[row] != 1)][0]
            raise UserError(
                f"{where}: model bernoulli_mixture needs binary values (0 or 1), but row {row + 1} "
                f"(counted from 1, a CSV header not counted) holds {value:g} ({bad.size} such row(s)). "
                "Binarize the data, or use model.name: gmm."
            )

    def project(self, params: Params) -> Params:
        """Weights normalized, probabilities inside [eps, 1 - eps]."""
        return {**super().project(params), "probs": _inside(params["probs"])}

    # ---- closed-form EM: T(x) = x, η = logit p, A(η) = -Σ_d log(1 - p_d) ----------------------

    def sufficient(self, rows: Tensor) -> Tensor:
        return rows

    def natural(self, params: Params) -> tuple[Tensor, Tensor]:
        probs = _inside(params["probs"])  # a float64 start cast to float32 may round to 0 or 1
        return torch.logit(probs), torch.log(params["weights"]) + torch.log1p(-probs).sum(1)

    def m_step_moments(self, nk: Tensor, sums: Tensor, use_prior: bool) -> Params:
        nk = nk + 10 * torch.finfo(nk.dtype).eps
        weights = self.m_step_weights(nk, use_prior)
        if self.prior is None or not use_prior:
            return {"weights": weights, "probs": _inside(sums / nk[:, None])}
        _, a0, b0 = self.prior
        return {"weights": weights, "probs": (sums + a0 - 1.0) / (nk[:, None] + a0 + b0 - 2.0)}

    # ---- variational Bayes: q(p_kd) = Beta(a_kd, b_kd) ----------------------------------------

    def component_family(self, a: Tensor, b: Tensor) -> dist.TorchDistribution:
        return dist.Beta(a, b)

    def component_posterior(self, x: Tensor, resp: Tensor) -> tuple[Tensor, Tensor]:
        """a = a0 + Σ_n r_nk x_nd (ones), b = b0 + Σ_n r_nk (1 - x_nd) (zeros)."""
        _, a0, b0 = self._prior()
        return a0 + resp.T @ x, b0 + resp.T @ (1.0 - x)

    def expected_log_density(self, x: Tensor, q: ConjugatePosterior) -> Tensor:
        """Σ_d x_nd E[log p_kd] + (1 - x_nd) E[log(1 - p_kd)], with E[log p] = ψ(a) - ψ(a + b)
        and E[log(1 - p)] = ψ(b) - ψ(a + b)."""
        total = torch.digamma(q.a + q.b)
        e_log_ones, e_log_zeros = torch.digamma(q.a) - total, torch.digamma(q.b) - total
        return x @ (e_log_ones - e_log_zeros).T + e_log_zeros.sum(1)

    def component_mean(self, q: ConjugatePosterior) -> Tensor:
        return q.a / (q.a + q.b)
