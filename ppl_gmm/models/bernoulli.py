"""A mixture of independent Bernoullis for binary data, declared once in Pyro.

Global sites: ``weights`` (K) Dirichlet(α0) and ``probs`` (K, D) Beta(a0, b0) each, or flat
priors with ``prior: none``. Local: ``z`` Categorical(weights), enumerated; ``x`` (D) independent
Bernoulli(probs[z]). Point estimates hold float64 ``weights`` (K) and ``probs`` (K, D).
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
class BernoulliMixture(ExpFamilyEM, ConjugateVB, LatentModel):
    name = "bernoulli_mixture"
    options = BernoulliOptions
    component_axes = {"weights": (0,), "probs": (0,)}
    pivot = "probs"
    component_site = "probs"  # the global site of q(θ) in variational Bayes
    standardizable = False

    def __init__(self, k: int, dim: int, prior: tuple[float, float, float] | None) -> None:
        self.k, self.dim, self.prior = k, dim, prior  # prior: (α0, a0, b0)

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> BernoulliMixture:
        assert isinstance(cfg, BernoulliOptions)
        hyper = cfg.hyperparameters
        prior = (hyper.weight_concentration, hyper.prob_a, hyper.prob_b) if cfg.prior == "conjugate" else None
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
            weights_prior = Flat(constraints.simplex, (), (k,))
            probs_prior = Flat(constraints.unit_interval, (k,), (d,))
        else:
            alpha0, a0, b0 = (torch.tensor(v, dtype=like.dtype, device=like.device) for v in self.prior)
            weights_prior = dist.Dirichlet(alpha0.expand(k))
            probs_prior = dist.Beta(a0, b0).expand((k, d)).to_event(1)
        weights = pyro.sample("weights", weights_prior)
        with pyro.plate("components", k):
            probs = pyro.sample("probs", probs_prior)

        # local variables
        with pyro.plate("data", n, subsample_size=subsample) as index:
            if x is not None and subsample is not None:
                x = x[index]
            z = pyro.sample("z", dist.Categorical(weights))
            return pyro.sample("x", dist.Bernoulli(Vindex(probs)[..., z, :]).to_event(1), obs=x)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weights": (self.k,), "probs": (self.k, self.dim)}

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
                f"{where}: model bernoulli_mixture needs binary values (0 or 1), but row {row} holds "
                f"{value:g} ({bad.size} such row(s)). Binarize the data, or use model.name: gmm."
            )

    def init_from_points(self, x: Tensor, index: Tensor, spread: Params) -> Params:
        """Equal weights, probabilities halfway between the points x[index] and the data's
        means (``spread``), so that none starts at 0 or 1 unless the data's does."""
        weights = torch.full((self.k,), 1.0 / self.k, dtype=x.dtype, device=x.device)
        probs = _inside(0.5 * (x[index] + spread["probs"]))
        return {"weights": weights, "probs": probs}

    def check_em(self, backend: str) -> None:
        if self.prior is not None and min(self.prior) < 1.0:
            raise UserError(
                f"model.hyperparameters: {backend} needs the posterior mode, which exists only with "
                f"weight_concentration, prob_a and prob_b of at least 1, but found {self.prior}. Try 2.0."
            )

    # ---- closed-form EM: T(x) = x, η = logit p, A(η) = -Σ_d log(1 - p_d) ----------------------

    def sufficient(self, rows: Tensor) -> Tensor:
        return rows

    def natural(self, params: Params) -> tuple[Tensor, Tensor]:
        probs = _inside(params["probs"])  # a float64 start cast to float32 may round to 0 or 1
        return torch.logit(probs), torch.log(params["weights"]) + torch.log1p(-probs).sum(1)

    def m_step_moments(self, nk: Tensor, sums: Tensor, use_prior: bool) -> Params:
        nk = nk + 10 * torch.finfo(nk.dtype).eps
        if self.prior is None or not use_prior:
            probs = _inside(sums / nk[:, None])
            return {"weights": nk / nk.sum(), "probs": probs}
        alpha0, a0, b0 = self.prior
        weights = nk + alpha0 - 1.0
        probs = (sums + a0 - 1.0) / (nk[:, None] + a0 + b0 - 2.0)
        return {"weights": weights / weights.sum(), "probs": probs}

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
