"""Hidden Markov models (Bishop ch. 13): states z_t with start probabilities ``start`` (K) and a
transition matrix ``transitions`` (K, K), rows the state moved from; each observation x_t given
z_t = k from the k-th component of a mixture family, whose parameters, conjugate prior, M-step and
data checks the model borrows (its weights unused): ``gaussian_hmm`` (the gmm's four covariance
types: ``means`` (K, D), ``covariances`` (K, D, D)), ``poisson_hmm`` (independent Poisson
counts: ``rates`` (K, D)) and ``bernoulli_hmm`` (independent binary features: ``probs`` (K, D)).

The data are sequences: rows of x one sequence after another, each sequence's number of rows in
``lengths`` (bound to the model for the data it fits: ``bind``). Declared once in Pyro: the states
of all sequences advance together under ``pyro.markov`` (padded to the longest sequence, the
padding masked out), each z_t enumerated, so Pyro's ``TraceEnum_ELBO`` sums them out by the
forward algorithm in time linear in the length.

Exact EM is Baum–Welch: the scaled forward–backward recursions batched over sequences
(``_hmm.py``), the emissions' M-step the mixture's with the smoothed state probabilities as
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
from .bernoulli import BernoulliHyperparameters, BernoulliMixture
from .distributions import PrecisionMultivariateNormal
from .gmm import ConjugatePrior, GaussianMixture, GMMHyperparameters, _default_prior
from .poisson import PoissonHyperparameters, PoissonMixture

__all__ = [
    "BernoulliHMM",
    "BernoulliHMMOptions",
    "GaussianHMM",
    "GaussianHMMOptions",
    "HMMHyperparameters",
    "HiddenMarkovModel",
    "IndependentHMM",
    "PoissonHMM",
    "PoissonHMMOptions",
]


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


class PoissonHMMHyperparameters(Strict):
    """Dirichlet priors on the start probabilities and on each transition row; Gamma(a0, rate b0)
    on each rate as the Poisson mixture's (b0 null: a0 / the train mean count)."""

    start_concentration: float = Field(1.0, ge=1.0)
    transition_concentration: float = Field(1.0, ge=1.0)
    rate_shape: float = Field(2.0, ge=1.0)  # at least 1, so that the mode exists
    rate_rate: float | None = Field(None, gt=0)


class PoissonHMMOptions(ModelOptions):
    name: Literal["poisson_hmm"] = "poisson_hmm"
    hyperparameters: PoissonHMMHyperparameters = PoissonHMMHyperparameters()


class BernoulliHMMHyperparameters(Strict):
    """Dirichlet priors on the start probabilities and on each transition row; Beta(a0, b0) on
    each probability as the Bernoulli mixture's."""

    start_concentration: float = Field(1.0, ge=1.0)
    transition_concentration: float = Field(1.0, ge=1.0)
    prob_a: float = Field(2.0, ge=1.0)  # at least 1, so that the mode exists
    prob_b: float = Field(2.0, ge=1.0)


class BernoulliHMMOptions(ModelOptions):
    name: Literal["bernoulli_hmm"] = "bernoulli_hmm"
    hyperparameters: BernoulliHMMHyperparameters = BernoulliHMMHyperparameters()


class HiddenMarkovModel(LatentModel):
    """A K-state hidden Markov model whose emissions are the components of ``emission``, a mixture
    with a closed-form M-step (its weights unused). A subclass declares the emissions' global
    sites (``declare_emissions``) and an observation's distribution given its state
    (``emission_distribution``), and says which concentration the mixture's weights prior has."""

    sequential = True
    emission: Any  # a LatentModel with ClosedFormEM's m_step

    def __init__(
        self, emission: Any, start_concentration: float = 1.0, transition_concentration: float = 1.0
    ) -> None:
        self.emission = emission
        self.k, self.dim = emission.k, emission.dim
        self.start_concentration = start_concentration
        self.transition_concentration = transition_concentration
        self.lengths: Tensor | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mixture = getattr(cls, "mixture", None)
        if mixture is not None:
            axes = {name: axis for name, axis in mixture.component_axes.items() if name != "weights"}
            cls.component_axes = {"start": (0,), "transitions": (0, 1), **axes}
            cls.pivot = mixture.pivot
            cls.backend_fields = mixture.backend_fields
            cls.standardizable = mixture.standardizable

    @classmethod
    def check_data(cls, x: np.ndarray, where: str) -> None:
        cls.mixture.check_data(x, where)  # type: ignore[attr-defined]

    def check_mode(self, method: str) -> None:
        self.emission.check_mode(method)

    def bind(self, lengths: np.ndarray | None) -> HiddenMarkovModel:
        """This model for data cut into sequences of ``lengths`` rows (one per sequence, row
        order); None: the rows are one sequence."""
        bound = copy.copy(self)
        bound.lengths = None if lengths is None else torch.as_tensor(np.asarray(lengths), dtype=torch.long)
        if bound.lengths is not None and bool((bound.lengths < 1).any()):
            raise UserError("data: every sequence needs at least one observation.")
        return bound

    def sequence_lengths(self, n: int) -> Tensor:
        """The bound lengths, checked against x's n rows; unbound, the rows are one sequence."""
        if self.lengths is None:
            return torch.tensor([n])
        if int(self.lengths.sum()) != n:
            raise ValueError(f"the model is bound to sequences of {int(self.lengths.sum())} rows, not {n}")
        return self.lengths

    @property
    def has_prior(self) -> bool:
        return bool(self.emission.has_prior)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: shape for name, shape in self.emission.param_shapes().items() if name != "weights"}
        return {"start": (self.k,), "transitions": (self.k, self.k), **shapes}

    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        """The mixture's components; start from Dirichlet(10); transitions that stay with
        probability 0.7–0.9 and move elsewhere at random."""
        components = self._emissions(self.emission.sample_truth(rng, separation))
        stay = rng.uniform(0.7, 0.9, size=self.k)
        transitions = np.eye(self.k)
        if self.k > 1:
            moves = rng.dirichlet(np.full(self.k - 1, 5.0), size=self.k)
            for i in range(self.k):
                transitions[i, np.arange(self.k) != i] = (1 - stay[i]) * moves[i]
                transitions[i, i] = stay[i]
        start = torch.from_numpy(rng.dirichlet(np.full(self.k, 10.0)))
        return {"start": start, "transitions": torch.from_numpy(transitions), **components}

    def simulate(self, params: Params, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """The bound sequences' rows (their lengths sum to n) and states: the chain drawn in NumPy,
        all sequences a time step at a time, then each state's rows from its component."""
        lengths = self.sequence_lengths(n)
        start, transitions = params["start"].numpy(), params["transitions"].numpy()
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
        x = torch.empty(n, self.dim, dtype=torch.float64)
        for k in range(self.k):
            mine = np.flatnonzero(states == k)
            if mine.size:
                one = torch.zeros(self.k, dtype=torch.float64)
                one[k] = 1.0
                drawn, _ = self.emission.simulate({**self._emissions(params), "weights": one}, mine.size, rng)
                x[torch.from_numpy(mine)] = drawn.to(torch.float64)
        return x, torch.from_numpy(states)

    # ---- the declaration -------------------------------------------------------------------

    def _dirichlet(
        self, concentration: float, shape: tuple[int, ...], like: Tensor
    ) -> dist.TorchDistribution:
        if not self.has_prior:
            return Flat(constraints.simplex, shape[:-1], shape[-1:])
        return dist.Dirichlet(torch.full(shape, concentration, dtype=like.dtype, device=like.device))

    def declare_emissions(self, like: Tensor, components: pyro.plate) -> Any:
        """Sample the emissions' global sites (in the plate ``components`` where they are per
        state); returns what ``emission_distribution`` needs."""
        raise NotImplementedError

    def emission_distribution(self, declared: Any, z: Tensor) -> dist.TorchDistribution:
        """The distribution of an observation (event D) in state(s) z."""
        raise NotImplementedError

    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Any:
        if batch_size is not None:
            raise UserError("a hidden Markov model's sequences are not sub-sampled: set batch_size: null.")
        like = x if x is not None else torch.zeros((), dtype=torch.get_default_dtype())
        rows_total = x.shape[0] if x is not None else n
        assert rows_total is not None
        lengths = self.sequence_lengths(rows_total)
        start = pyro.sample("start", self._dirichlet(self.start_concentration, (self.k,), like))
        components = pyro.plate("components", self.k)  # one plate, entered again by the emissions
        with components:
            transitions = pyro.sample(
                "transitions", self._dirichlet(self.transition_concentration, (self.k, self.k), like)
            )
        declared = self.declare_emissions(like, components)
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
                        self.emission_distribution(declared, z),
                        obs=None if padded is None else padded[t],
                    )

    # ---- exact inference, equal to the declaration -----------------------------------------

    def _emissions(self, params: Params) -> dict[str, Tensor]:
        """The emission parameters of θ (or of a mixture's parameters): all but the weights."""
        skip = ("weights", "start", "transitions")
        return {name: value for name, value in params.items() if name not in skip}

    def _mixture(self, params: Params) -> dict[str, Tensor]:
        """θ's emissions as the mixture's parameters, at equal weights."""
        like = params[self.pivot]
        return {"weights": like.new_full((self.k,), 1.0 / self.k), **self._emissions(params)}

    def weights_concentration(self) -> float:
        """The concentration of the mixture's Dirichlet prior on its weights."""
        raise NotImplementedError

    def log_emission(self, x: Tensor, params: Params) -> Tensor:
        """log p(x_n | z_n = k) (N, K)."""
        return self.emission.log_joint(x, self._mixture(params)) + float(np.log(self.k))

    def e_step(self, x: Tensor, params: Params, posteriors: bool = True) -> EStep:
        """Forward–backward on the bound sequences: the E-step's sums and log-likelihoods."""
        return forward_backward(
            self.log_emission(x, params),
            self.sequence_lengths(x.shape[0]),
            params["start"],
            params["transitions"],
            posteriors,
        )

    def m_step_hmm(self, x: Tensor, estep: EStep, reg_covar: float = 0.0, use_prior: bool = True) -> Params:
        """θ maximizing the expected complete-data log-likelihood (+ log prior) for the E-step's
        posteriors: start and transitions from expected counts, the emissions by the mixture's
        M-step with γ as responsibilities."""
        first, counts = estep.first, estep.transitions
        if use_prior and self.has_prior:
            first = first + (self.start_concentration - 1.0)
            counts = counts + (self.transition_concentration - 1.0)
        tiny = torch.finfo(x.dtype).tiny
        return {
            "start": first / first.sum().clamp_min(tiny),
            "transitions": counts / counts.sum(1, keepdim=True).clamp_min(tiny),
            **self._emissions(self.emission.m_step(x, estep.posteriors, reg_covar, use_prior)),
        }

    def m_step(self, x: Tensor, resp: Tensor, reg_covar: float = 0.0, use_prior: bool = True) -> Params:
        """θ for assignments resp (N, K) of rows taken as independent (the seeding's k-means
        labels): the emissions by the mixture's M-step, start and transitions uniform."""
        uniform = x.new_full((self.k,), 1.0 / self.k)
        return {
            "start": uniform,
            "transitions": uniform.expand(self.k, self.k).clone(),
            **self._emissions(self.emission.m_step(x, resp, reg_covar, use_prior)),
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
            self.log_emission(x, params),
            self.sequence_lengths(x.shape[0]),
            params["start"],
            params["transitions"],
        )

    def log_prior(self, params: Params) -> Tensor:
        like = params[self.pivot]
        if not self.has_prior:
            return like.new_zeros(())
        mixture = self._mixture(params)
        # the mixture's log prior includes its weights' Dirichlet, here at equal weights: out
        weights = dist.Dirichlet(torch.full((self.k,), self.weights_concentration(), dtype=like.dtype))
        emissions = self.emission.log_prior(mixture) - weights.log_prob(mixture["weights"])
        start = dist.Dirichlet(torch.full_like(params["start"], self.start_concentration))
        rows = dist.Dirichlet(torch.full_like(params["transitions"], self.transition_concentration))
        return emissions + start.log_prob(params["start"]) + rows.log_prob(params["transitions"]).sum()

    def n_params(self) -> int:
        k = self.k
        return int(self.emission.n_params()) - (k - 1) + (k - 1) + k * (k - 1)

    def to_sites(self, params: Params) -> dict[str, Tensor]:
        sites = self.emission.to_sites(self._mixture(params))
        sites.pop("weights", None)
        return {"start": params["start"].clone(), "transitions": params["transitions"].clone(), **sites}

    def from_sites(self, sites: Mapping[str, Tensor]) -> Params:
        mixture = self.emission.from_sites({"weights": sites["start"], **sites})
        return {"start": sites["start"], "transitions": sites["transitions"], **self._emissions(mixture)}

    def project(self, params: Params) -> Params:
        transitions = params["transitions"]
        return {
            "start": params["start"] / params["start"].sum(),
            "transitions": transitions / transitions.sum(1, keepdim=True),
            **self._emissions(self.emission.project(self._mixture(params))),
        }

    def init_from_points(self, x: Tensor, index: Tensor, spread: Params) -> Params:
        uniform = x.new_full((self.k,), 1.0 / self.k)
        mixture = self.emission.init_from_points(x, index, self._mixture(spread))
        return self.project(
            {"start": uniform, "transitions": uniform.expand(self.k, self.k).clone(), **mixture}
        )


@MODELS.register("gaussian_hmm")
class GaussianHMM(HiddenMarkovModel):
    """Gaussian emissions of a covariance type: ``means`` (K, D), ``covariances`` (K, D, D)."""

    name = "gaussian_hmm"
    options = GaussianHMMOptions
    mixture = GaussianMixture

    def __init__(
        self,
        k: int,
        dim: int,
        covariance: str,
        prior: ConjugatePrior | None,
        start_concentration: float = 1.0,
        transition_concentration: float = 1.0,
    ) -> None:
        super().__init__(
            GaussianMixture(k, dim, covariance, prior), start_concentration, transition_concentration
        )
        self.covariance = covariance

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
        concentrations = (hyper.start_concentration, hyper.transition_concentration)
        model = cls(cfg.k, int(x.shape[1]), cfg.covariance, prior, *concentrations)
        model.example = x[:2].clone().to(torch.float64)
        return model

    def weights_concentration(self) -> float:
        assert self.emission.prior is not None
        return float(self.emission.prior.weight_concentration)

    def declare_emissions(self, like: Tensor, components: pyro.plate) -> tuple[Tensor, Tensor]:
        emission = self.emission
        if emission._type.shared:
            precision = pyro.sample("precision", emission.precision_prior(like))
        with components:
            if not emission._type.shared:
                precision = pyro.sample("precision", emission.precision_prior(like))
            precision_tril = emission.precision_tril(precision)
            locs = pyro.sample("locs", emission.locs_prior(precision_tril))
        return locs, precision_tril

    def emission_distribution(self, declared: tuple[Tensor, Tensor], z: Tensor) -> dist.TorchDistribution:
        locs, precision_tril = declared
        return PrecisionMultivariateNormal(
            Vindex(locs)[..., z, :], precision_tril=Vindex(precision_tril)[..., z, :, :]
        )


class IndependentHMM(HiddenMarkovModel):
    """Emissions of D independent features from one family (the Poisson or Bernoulli mixture's
    components): ``<site>`` (K, D)."""

    hyperparameters: Any  # the mixture's hyperparameters schema, filled from the model's

    def __init__(
        self,
        k: int,
        dim: int,
        prior: tuple[float, float, float] | None,
        start_concentration: float = 1.0,
        transition_concentration: float = 1.0,
    ) -> None:
        super().__init__(self.mixture(k, dim, prior), start_concentration, transition_concentration)  # type: ignore[attr-defined]

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> IndependentHMM:
        hyper = cfg.hyperparameters  # type: ignore[attr-defined]
        prior = None
        if cfg.prior == "conjugate":
            own = {
                field: getattr(hyper, field)
                for field in cls.hyperparameters.model_fields
                if hasattr(hyper, field)
            }
            mixture = cfg.model_copy(update={"hyperparameters": cls.hyperparameters(**own)})
            prior = cls.mixture.conjugate_prior(mixture, x)  # type: ignore[attr-defined]
        model = cls(cfg.k, int(x.shape[1]), prior, hyper.start_concentration, hyper.transition_concentration)
        model.example = x[:2].clone().to(torch.float64)
        return model

    def weights_concentration(self) -> float:
        assert self.emission.prior is not None
        return float(self.emission.prior[0])

    def declare_emissions(self, like: Tensor, components: pyro.plate) -> Tensor:
        emission = self.emission
        if emission.prior is None:
            prior: dist.TorchDistribution = Flat(emission.support, (self.k,), (self.dim,))
        else:
            _, a0, b0 = (torch.tensor(v, dtype=like.dtype, device=like.device) for v in emission.prior)
            prior = emission.component_family(a0, b0).expand((self.k, self.dim)).to_event(1)
        with components:
            return pyro.sample(emission.site, prior)

    def emission_distribution(self, declared: Tensor, z: Tensor) -> dist.TorchDistribution:
        return self.emission.likelihood(Vindex(declared)[..., z, :]).to_event(1)


@MODELS.register("poisson_hmm")
class PoissonHMM(IndependentHMM):
    """Independent Poisson counts per feature: ``rates`` (K, D)."""

    name = "poisson_hmm"
    options = PoissonHMMOptions
    mixture = PoissonMixture
    hyperparameters = PoissonHyperparameters


@MODELS.register("bernoulli_hmm")
class BernoulliHMM(IndependentHMM):
    """Independent binary features: ``probs`` (K, D)."""

    name = "bernoulli_hmm"
    options = BernoulliHMMOptions
    mixture = BernoulliMixture
    hyperparameters = BernoulliHyperparameters
