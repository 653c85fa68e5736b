"""The Gaussian hidden Markov model (Bishop ch. 13): states z_t with start probabilities ``start``
(K) and a transition matrix ``transitions`` (K, K), rows the state moved from; each observation
x_t | z_t = k ~ N(``means``[k], ``covariances``[k]) with the Gaussian mixture's four covariance
types (their parameters and conjugate prior are the gmm's).

The data are sequences: rows of x one sequence after another, each sequence's number of rows in
``lengths`` (bound to the model for the data it fits: ``bind``). Declared once in Pyro: the states
of all sequences advance together under ``pyro.markov`` (padded to the longest sequence, the
padding masked out), each z_t enumerated, so Pyro's ``TraceEnum_ELBO`` sums them out by the
forward algorithm in time linear in the length.

Exact EM is Baum–Welch: the scaled forward–backward recursions batched over sequences
(``_hmm.py``), the emissions' M-step the gmm's with the smoothed state probabilities as
responsibilities, the start and transition probabilities from expected counts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal, cast

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pydantic import Field
from pyro import poutine
from pyro.ops.indexing import Vindex
from torch import Tensor
from torch.distributions import constraints

from ..config import ModelOptions, Strict
from ..errors import UserError
from ._hmm import EStep, forward_backward, padding, viterbi
from .base import MODELS, Flat, LatentModel, Params
from .gmm import ConjugatePrior, GaussianMixture, GMMHyperparameters, _default_prior

__all__ = ["GaussianHMM", "GaussianHMMOptions", "HMMHyperparameters"]


class HMMHyperparameters(Strict):
    """Dirichlet priors on the start probabilities and on each row of the transition matrix, the
    gmm's Normal–Wishart (by covariance type) on the emissions; null means its data-based
    default. Used only with ``model.prior: conjugate``."""

    start_concentration: float = Field(1.0, ge=1.0)  # at least 1, so that the mode exists
    transition_concentration: float = Field(1.0, ge=1.0)
    mean_precision: float = Field(1.0, gt=0)
    mean_prior: list[float] | None = None
    degrees_of_freedom: float | None = Field(None, gt=0)
    covariance_prior: float | list[float] | list[list[float]] | None = None


class GaussianHMMOptions(ModelOptions):
    name: Literal["gaussian_hmm"] = "gaussian_hmm"
    covariance: Literal["full", "diag", "tied", "spherical"] = "full"
    hyperparameters: HMMHyperparameters = HMMHyperparameters()


@MODELS.register("gaussian_hmm")
class GaussianHMM(LatentModel):
    """K-state hidden Markov model with Gaussian emissions of a covariance type."""

    name = "gaussian_hmm"
    options = GaussianHMMOptions
    component_axes = {"start": (0,), "transitions": (0, 1), "means": (0,), "covariances": (0,)}
    pivot = "means"
    backend_fields = {"reg_covar": 1e-6}
    sequential = True

    def __init__(
        self,
        k: int,
        dim: int,
        covariance: str,
        prior: ConjugatePrior | None,
        start_concentration: float = 1.0,
        transition_concentration: float = 1.0,
    ) -> None:
        self.k, self.dim, self.covariance = k, dim, covariance
        self.emission = GaussianMixture(k, dim, covariance, prior)
        self.start_concentration = start_concentration
        self.transition_concentration = transition_concentration
        self.lengths: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> GaussianHMM:
        assert isinstance(cfg, GaussianHMMOptions)
        hyper = cfg.hyperparameters
        prior = None
        if cfg.prior == "conjugate":
            gaussian = GMMHyperparameters(
                mean_precision=hyper.mean_precision,
                mean_prior=hyper.mean_prior,
                degrees_of_freedom=hyper.degrees_of_freedom,
                covariance_prior=hyper.covariance_prior,
            )
            prior = _default_prior(gaussian, cfg.covariance, cfg.k, x)
        model = cls(
            cfg.k,
            int(x.shape[1]),
            cfg.covariance,
            prior,
            hyper.start_concentration,
            hyper.transition_concentration,
        )
        model.example = x[:2].clone().to(torch.float64)
        return model

    def bind(self, lengths: np.ndarray | None) -> GaussianHMM:
        """This model for data cut into sequences of ``lengths`` rows (one per sequence, row
        order); None: the rows are one sequence."""
        bound = copy.copy(self)
        bound.lengths = None if lengths is None else torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        if bound.lengths is not None and bool((bound.lengths < 1).any()):
            raise UserError("data: every sequence needs at least one observation.")
        return bound

    def _lengths(self, n: int) -> Tensor:
        """The bound lengths, checked against x's n rows; unbound, the rows are one sequence."""
        if self.lengths is None:
            return torch.tensor([n])
        if int(self.lengths.sum()) != n:
            raise ValueError(f"the model is bound to sequences of {int(self.lengths.sum())} rows, not {n}")
        return self.lengths

    @property
    def has_prior(self) -> bool:
        return self.emission.prior is not None

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        k, d = self.k, self.dim
        return {"start": (k,), "transitions": (k, k), "means": (k, d), "covariances": (k, d, d)}

    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        """The gmm's means and covariances; start from Dirichlet(10); transitions that stay with
        probability about 0.8 and move elsewhere uniformly at random."""
        gaussian = self.emission.sample_truth(rng, separation)
        stay = rng.uniform(0.7, 0.9, size=self.k)
        moves = rng.dirichlet(np.full(max(self.k - 1, 1), 5.0), size=self.k)
        transitions = np.zeros((self.k, self.k))
        for i in range(self.k):
            if self.k == 1:
                transitions[i, i] = 1.0
                continue
            transitions[i, np.arange(self.k) != i] = (1 - stay[i]) * moves[i]
            transitions[i, i] = stay[i]
        return {
            "start": torch.from_numpy(rng.dirichlet(np.full(self.k, 10.0))),
            "transitions": torch.from_numpy(transitions),
            "means": gaussian["means"],
            "covariances": gaussian["covariances"],
        }

    def simulate(self, params: Params, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """The bound sequences' rows (their lengths sum to n) and states, drawn in NumPy, all
        sequences a time step at a time."""
        lengths = self._lengths(n)
        start, transitions, means, covariances = (
            params[name].numpy() for name in ("start", "transitions", "means", "covariances")
        )
        rows, mask = (value.numpy() for value in padding(lengths))
        uniform = rng.random(rows.shape)
        padded = np.empty(rows.shape, dtype=np.int64)
        start_cdf = np.cumsum(start / start.sum())
        transition_cdf = np.cumsum(transitions / transitions.sum(1, keepdims=True), axis=1)
        padded[0] = (uniform[0][:, None] > start_cdf[None, :-1]).sum(1)
        for t in range(1, rows.shape[0]):
            padded[t] = (uniform[t][:, None] > transition_cdf[padded[t - 1], :-1]).sum(1)
        states = np.empty(n, dtype=np.int64)
        states[rows[mask]] = padded[mask]
        noise = np.einsum(
            "nij,nj->ni", np.linalg.cholesky(covariances)[states], rng.standard_normal((n, self.dim))
        )
        return torch.from_numpy(means[states] + noise), torch.from_numpy(states)

    # ---- the declaration -------------------------------------------------------------------

    def _dirichlet(
        self, concentration: float, shape: tuple[int, ...], like: Tensor
    ) -> dist.TorchDistribution:
        batch = shape[:-1]
        if self.emission.prior is None:
            return Flat(constraints.simplex, batch, shape[-1:])
        return dist.Dirichlet(torch.full(shape, concentration, dtype=like.dtype, device=like.device))

    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Any:
        if batch_size is not None:
            raise UserError("a hidden Markov model's sequences are not sub-sampled: set batch_size: null.")
        like = x if x is not None else torch.zeros((), dtype=torch.get_default_dtype())
        rows_total = x.shape[0] if x is not None else n
        assert rows_total is not None
        lengths = self._lengths(rows_total)
        emission = self.emission
        start = pyro.sample("start", self._dirichlet(self.start_concentration, (self.k,), like))
        if emission._type.shared:
            precision = pyro.sample("precision", emission.precision_prior(like))
        with pyro.plate("components", self.k):
            transitions = pyro.sample(
                "transitions", self._dirichlet(self.transition_concentration, (self.k, self.k), like)
            )
            if not emission._type.shared:
                precision = pyro.sample("precision", emission.precision_prior(like))
            full_precision = emission.full_precision(precision)
            locs = pyro.sample("locs", emission.locs_prior(full_precision))
        rows, mask = padding(lengths)
        padded = None if x is None else x[rows]  # (T, S, D)
        z: Tensor | int = 0
        with pyro.plate("data", len(lengths)):
            for t in pyro.markov(range(rows.shape[0])):
                probs = start if t == 0 else Vindex(transitions)[..., z, :]
                with poutine.mask(mask=cast(torch.BoolTensor, mask[t])):
                    z = pyro.sample(f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"})
                    pyro.sample(
                        f"x_{t}",
                        dist.MultivariateNormal(
                            Vindex(locs)[..., z, :], precision_matrix=Vindex(full_precision)[..., z, :, :]
                        ),
                        obs=None if padded is None else padded[t],
                    )

    # ---- exact inference, equal to the declaration -----------------------------------------

    def _emission_params(self, params: Params) -> Params:
        weights = params["means"].new_full((self.k,), 1.0 / self.k)
        return {"weights": weights, "means": params["means"], "covariances": params["covariances"]}

    def log_emission(self, x: Tensor, params: Params) -> Tensor:
        """log p(x_n | z_n = k) (N, K)."""
        return self.emission.log_joint(x, self._emission_params(params)) + float(np.log(self.k))

    def e_step(self, x: Tensor, params: Params, posteriors: bool = True) -> EStep:
        """Forward–backward on the bound sequences: the E-step's sums and log-likelihoods."""
        return forward_backward(
            self.log_emission(x, params),
            self._lengths(x.shape[0]),
            params["start"],
            params["transitions"],
            posteriors,
        )

    def m_step_hmm(self, x: Tensor, estep: EStep, reg_covar: float = 0.0, use_prior: bool = True) -> Params:
        """θ maximizing the expected complete-data log-likelihood (+ log prior) for the E-step's
        posteriors: start and transitions from expected counts, the emissions by the gmm's
        M-step with γ as responsibilities."""
        first, counts = estep.first, estep.transitions
        if use_prior and self.has_prior:
            first = first + (self.start_concentration - 1.0)
            counts = counts + (self.transition_concentration - 1.0)
        emissions = self.emission.m_step(x, estep.posteriors, reg_covar, use_prior)
        tiny = torch.finfo(x.dtype).tiny
        return {
            "start": first / first.sum().clamp_min(tiny),
            "transitions": counts / counts.sum(1, keepdim=True).clamp_min(tiny),
            "means": emissions["means"],
            "covariances": emissions["covariances"],
        }

    def m_step(self, x: Tensor, resp: Tensor, reg_covar: float = 0.0, use_prior: bool = True) -> Params:
        """θ for assignments resp (N, K) of rows taken as independent (the seeding's k-means
        labels): the emissions by the gmm's M-step, start and transitions uniform."""
        emissions = self.emission.m_step(x, resp, reg_covar, use_prior)
        uniform = x.new_full((self.k,), 1.0 / self.k)
        return {
            "start": uniform,
            "transitions": uniform.expand(self.k, self.k).clone(),
            "means": emissions["means"],
            "covariances": emissions["covariances"],
        }

    def state_entropy(self, x: Tensor, params: Params) -> float:
        """H(z_1..T | x, θ) summed over the bound sequences: log p(x) - E[log p(x, z)] under the
        smoothed posterior, whose expectation needs only γ and the expected transition counts."""
        estep = self.e_step(x, params)
        log_b = self.log_emission(x, params)
        expected = (
            float((estep.first * torch.log(params["start"]).nan_to_num(neginf=0.0)).sum())
            + float((estep.transitions * torch.log(params["transitions"]).nan_to_num(neginf=0.0)).sum())
            + float((estep.posteriors * log_b).sum())
        )
        return estep.log_likelihood - expected

    def log_likelihood(self, x: Tensor, params: Params) -> Tensor:
        """log p(x_t | x_1..t-1, θ) per row (N,): the one-step predictive densities, whose sum over a
        sequence is its log-likelihood (the forward pass's log scales)."""
        return self.e_step(x, params, posteriors=False).step_log_likelihood

    def log_joint(self, x: Tensor, params: Params) -> Tensor:
        """log p(z_t = k | x, θ) + log p(x_t | x_1..t-1, θ) per row (N, K): its softmax over k is the
        smoothed state probability and its logsumexp the row's one-step predictive density, so
        that what reads responsibilities and log-likelihoods from it reads the HMM's."""
        estep = self.e_step(x, params)
        return torch.log(estep.posteriors) + estep.step_log_likelihood[:, None]

    def most_probable_states(self, x: Tensor, params: Params) -> Tensor:
        """The Viterbi path of each bound sequence (N,)."""
        return viterbi(
            self.log_emission(x, params), self._lengths(x.shape[0]), params["start"], params["transitions"]
        )

    def log_prior(self, params: Params) -> Tensor:
        prior = self.emission.prior
        if prior is None:
            return params["means"].new_zeros(())
        gaussian = self.emission.log_prior(self._emission_params(params))
        # the gmm's log prior includes its weights' Dirichlet at uniform weights: take it out
        weights_term = dist.Dirichlet(
            torch.full((self.k,), prior.weight_concentration, dtype=params["means"].dtype)
        ).log_prob(self._emission_params(params)["weights"])
        start = dist.Dirichlet(torch.full_like(params["start"], self.start_concentration)).log_prob(
            params["start"]
        )
        rows = dist.Dirichlet(torch.full_like(params["transitions"], self.transition_concentration))
        return gaussian - weights_term + start + rows.log_prob(params["transitions"]).sum()

    def n_params(self) -> int:
        k, d = self.k, self.dim
        return (k - 1) + k * (k - 1) + k * d + self.emission._type.n_cov_params(k, d)

    def to_sites(self, params: Params) -> dict[str, Tensor]:
        gaussian = self.emission.to_sites(self._emission_params(params))
        return {
            "start": params["start"].clone(),
            "transitions": params["transitions"].clone(),
            "locs": gaussian["locs"],
            "precision": gaussian["precision"],
        }

    def from_sites(self, sites: Mapping[str, Tensor]) -> Params:
        gaussian = self.emission.from_sites({"weights": sites["start"], **sites})
        return {
            "start": sites["start"],
            "transitions": sites["transitions"],
            "means": gaussian["means"],
            "covariances": gaussian["covariances"],
        }

    def project(self, params: Params) -> Params:
        gaussian = self.emission.project(self._emission_params(params))
        transitions = params["transitions"]
        return {
            "start": params["start"] / params["start"].sum(),
            "transitions": transitions / transitions.sum(1, keepdim=True),
            "means": gaussian["means"],
            "covariances": gaussian["covariances"],
        }

    def init_from_points(self, x: Tensor, index: Tensor, spread: Params) -> Params:
        params = dict(spread)
        params["means"] = x[index].clone()
        params["start"] = torch.full((self.k,), 1.0 / self.k, dtype=x.dtype, device=x.device)
        params["transitions"] = torch.full((self.k, self.k), 1.0 / self.k, dtype=x.dtype, device=x.device)
        return self.project(params)
