"""What coordinate-ascent variational Bayes (``backends/vb.py``) needs of a mixture with conjugate
priors, Bishop PRML §10.2 and §10.4.

The posterior of weights π (K,), component parameters θ (K, D) and assignments z is approximated
by q(π) q(θ) Π_n q(z_n): q(π) = Dirichlet(α) (K,), the conjugate of the weights' Dirichlet(α0)
prior; each entry θ_kd in the family of its prior, family(a0, b0), at its own (a_kd, b_kd) (a
Gamma for Poisson rates, a Beta for Bernoulli probabilities); q(z_n) categorical. Each factor is
the exact optimum given the others. The Dirichlet part is the same for every such mixture and
lives here, as pure functions on tensors (the gmm's q(π) uses them too); a model fills in its
component family through the hooks of ``ConjugateVB``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.distributions import Dirichlet, kl_divergence

from .base import Params

__all__ = [
    "ConjugatePosterior",
    "ConjugateVB",
    "dirichlet_expected_log",
    "dirichlet_kl",
    "dirichlet_mean",
    "dirichlet_posterior",
]


# ---- q(π) = Dirichlet(α) --------------------------------------------------------------------


def dirichlet_posterior(nk: Tensor, alpha0: float) -> Tensor:
    """α (K,) of q(π) optimal given the expected counts nk = Σ_n q(z_n = k) (K,)."""
    return alpha0 + nk


def dirichlet_expected_log(concentration: Tensor) -> Tensor:
    """E_q[log π_k] = ψ(α_k) - ψ(Σ_j α_j): (K,), or row by row for (..., K)."""
    return torch.digamma(concentration) - torch.digamma(concentration.sum(-1, keepdim=True))


def dirichlet_mean(concentration: Tensor) -> Tensor:
    """E_q[π_k] = α_k / Σ_j α_j: (K,)."""
    return concentration / concentration.sum()


def dirichlet_kl(concentration: Tensor, alpha0: float) -> Tensor:
    """KL(Dirichlet(α) || Dirichlet(α0, ..., α0)), a scalar; for (..., K) the sum over rows."""
    prior = Dirichlet(torch.full_like(concentration, alpha0))
    return kl_divergence(Dirichlet(concentration), prior).sum()


# ---- q(π) q(θ) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConjugatePosterior:
    """q(π) q(θ) of a mixture with conjugate priors.

    weight_concentration  (K,) α of q(π) = Dirichlet(α)
    a, b                  (K, D) the parameters of each q(θ_kd) = family(a_kd, b_kd): Gamma(shape
                          a, rate b) for Poisson rates, Beta(a, b) for Bernoulli probabilities
    """

    weight_concentration: Tensor
    a: Tensor
    b: Tensor


class ConjugateVB(ABC):
    """CAVI for a mixture whose weights have a Dirichlet(α0) prior and whose components'
    parameter θ (K, D), the global site ``component_site`` sampled in the plate ``"components"``,
    has independent entries with prior family(a0, b0), conjugate to the likelihood; ``prior`` is
    (α0, a0, b0), or None for flat priors (which have no posterior to approximate).

    A model gives the family, its update, its expected log-density and its mean; the Dirichlet
    part, the expected log-joint, the KL to the prior, the point estimate and the guide's global
    sites follow here.
    """

    k: int
    prior: tuple[float, float, float] | None
    component_site: ClassVar[str]

    @abstractmethod
    def component_family(self, a: Tensor, b: Tensor) -> dist.TorchDistribution:
        """The family of one θ_kd at parameters a, b (equal shapes), with their batch shape:
        q(θ) at a posterior's (a, b), p(θ) at the prior's (a0, b0)."""

    @abstractmethod
    def component_posterior(self, x: Tensor, resp: Tensor) -> tuple[Tensor, Tensor]:
        """(a, b) (K, D) of q(θ) optimal given q(z) = resp (N, K) for x (N, D): the prior's
        (a0, b0) plus the responsibility-weighted sufficient statistics."""

    @abstractmethod
    def expected_log_density(self, x: Tensor, q: ConjugatePosterior) -> Tensor:
        """E_q[log p(x_n | θ_k)] for x (N, D), every constant included: (N, K)."""

    @abstractmethod
    def component_mean(self, q: ConjugatePosterior) -> Tensor:
        """E_q[θ] (K, D)."""

    def _prior(self) -> tuple[float, float, float]:
        assert self.prior is not None, "variational Bayes needs a proper prior"
        return self.prior

    def variational_update(self, x: Tensor, resp: Tensor) -> ConjugatePosterior:
        """q(π) q(θ) optimal given q(z) = resp (N, K) for x (N, D)."""
        a, b = self.component_posterior(x, resp)
        return ConjugatePosterior(dirichlet_posterior(resp.sum(0), self._prior()[0]), a, b)

    def variational_log_joint(self, x: Tensor, q: ConjugatePosterior) -> Tensor:
        """log ρ_nk = E_q[log π_k + log p(x_n | θ_k)] for x (N, D): (N, K); its softmax over k
        is the q(z) optimal given q(π) q(θ)."""
        return dirichlet_expected_log(q.weight_concentration) + self.expected_log_density(x, q)

    def variational_kl(self, q: ConjugatePosterior) -> Tensor:
        """KL(q(π) q(θ) || p(π) p(θ)), a scalar: minus the global part of the ELBO."""
        return dirichlet_kl(q.weight_concentration, self._prior()[0]) + self.components_kl(q)

    def components_kl(self, q: ConjugatePosterior) -> Tensor:
        """KL(q(θ) || p(θ)), a scalar: the components' part of ``variational_kl``."""
        _, a0, b0 = self._prior()
        posterior = self.component_family(q.a, q.b)
        prior = self.component_family(torch.full_like(q.a, a0), torch.full_like(q.b, b0))
        return kl_divergence(posterior, prior).sum()

    def posterior_mean(self, q: ConjugatePosterior) -> Params:
        """The point estimate E_q[π], E_q[θ]."""
        weights = dirichlet_mean(q.weight_concentration)
        return {"weights": weights, self.component_site: self.component_mean(q)}

    def sample_posterior(self, q: ConjugatePosterior, components: pyro.plate | None = None) -> None:
        """The global sites drawn from q(π) q(θ) with ``pyro.sample``, in the declaration's
        plates: the global part of a guide; given the plate ``components`` of a declaration that
        entered it already, only the components' (a hidden Markov model's emissions)."""
        if components is None:
            pyro.sample("weights", dist.Dirichlet(q.weight_concentration))
        with pyro.plate("components", self.k) if components is None else components:
            pyro.sample(self.component_site, self.component_family(q.a, q.b).to_event(1))
