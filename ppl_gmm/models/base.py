"""What every latent model offers, and what is derived from its Pyro declaration.

A model is one class: its name, its options schema (the config's ``model:`` block), the Pyro
declaration with its assignments enumerated, which axes of each parameter index components, and
how to draw a plausible random truth. Everything else has a generic default derived from the
declaration through Pyro's own machinery (enumeration, traces, ``biject_to``), which a model may
override for speed: the log-joint and log-likelihood, the log prior, the number of free
parameters, site values, validation of parameters, and synthetic data.

Optional capabilities, which backends check with ``isinstance``:

- ``ClosedFormEM``: exact EM through a per-point design, whose log-joint and sufficient
  statistics are GEMMs; statistics are plain dicts of tensors (``stats``), so the EM variants
  add, scale and combine them without knowing the model.
- ``ConjugateVB`` (``conjugate.py``): coordinate-ascent variational Bayes for a mixture with
  conjugate priors (the gmm's own CAVI lives in ``backends/vb.py``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import numpy as np
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to, constraints

from ..config import ModelOptions
from ..errors import UserError
from ..registry import Registry

__all__ = ["ClosedFormEM", "ExpFamilyEM", "Flat", "LatentModel", "MODELS", "Params", "Stats"]

Params = Mapping[str, Tensor]
"""A point estimate: named tensors, listed in each model's documentation."""

Stats = dict[str, Tensor]
"""Sufficient statistics of an E-step: tensors that sum over points, which the EM backends add,
scale and blend key by key without knowing the model."""

DATA_PLATE = "data"  # the plate of the points in every declaration; its sites are local


class LatentModel(ABC):
    """A latent model p(x, z | θ) p(θ) with K discrete states per point.

    Subclasses give ``name``, ``options``, ``component_axes``, ``pivot``, ``model``,
    ``param_shapes``, ``has_prior`` and ``sample_truth``, and are built by ``from_config``.
    """

    name: ClassVar[str]
    options: ClassVar[type[ModelOptions]] = ModelOptions
    # the axes of each parameter that index components: relabelling permutes them all
    # (a (K, K) transition matrix on both)
    component_axes: ClassVar[Mapping[str, tuple[int, ...]]]
    # the parameter whose rows (K, ...) identify components when matching two estimates
    pivot: ClassVar[str]
    # options (of backends and init) that only some models use, with this model's defaults for
    # them: e.g. the gmm's reg_covar; another model refuses them
    backend_fields: ClassVar[Mapping[str, float]] = {}
    # whether z-scored data are still data of the model (not for counts or binary values)
    standardizable: ClassVar[bool] = True
    max_plate_nesting: ClassVar[int] = 1
    # whether the data are sequences whose latent states depend on each other (a hidden Markov
    # model): rows are not independent, and backends that treat them so refuse the model
    sequential: ClassVar[bool] = False

    k: int
    dim: int
    example: Tensor | None = None  # one train point: where the declaration is traced for θ alone

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> LatentModel:
        """Build the model; data-based defaults (prior hyperparameters) come from train ``x``."""

    @classmethod
    def for_simulation(cls, cfg: ModelOptions, dim: int) -> LatentModel:
        """The model that draws synthetic data of dimension ``dim`` (no data exist yet)."""
        return cls.from_config(cfg.model_copy(update={"prior": "none"}), torch.zeros(1, dim))

    @property
    @abstractmethod
    def has_prior(self) -> bool:
        """Whether θ has a proper prior (MAP and Bayesian backends) or none (maximum likelihood)."""

    @abstractmethod
    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Any:
        """The Pyro model, its assignments marked for enumeration and its points observed at the
        site ``"x"`` in the plate ``"data"``; with ``batch_size`` the plate subsamples that many
        points and scales their likelihood up to all of them; without ``x`` it draws ``n`` points."""

    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor of a point estimate."""

    @abstractmethod
    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        """A plausible random θ for synthetic data, components about ``separation`` apart on
        the model's natural scale."""

    # global sites whose conditional maximum ``conditional_m_step`` gives in closed form: ECM's
    # closed-form blocks; generalized EM climbs only the other sites by gradient
    closed_form_sites: ClassVar[tuple[str, ...]] = ()

    def conditional_m_step(self, x: Tensor, resp: Tensor, params: Params) -> dict[str, Tensor]:
        """Values of the ``closed_form_sites`` that maximize Q(θ) = Σ_n Σ_k resp[n, k] log p(x_n,
        z_n = k | θ) + log p(θ) over those sites, the other sites held at θ (expectation
        conditional maximization, Meng & Rubin 1993), for x (N, D) and resp (N, K). Default: none."""
        return {}

    def bind(self, lengths: np.ndarray | None) -> LatentModel:
        """The model for data cut into sequences of ``lengths`` rows each (row order), or for rows
        that are one sequence (None). A model of independent points is the same for any cut."""
        return self

    def check_mode(self, method: str) -> None:
        """Raise ``UserError`` if the prior has no posterior mode for ``method`` (MAP) to find.
        Default: it has one."""
        return None

    # ---- data --------------------------------------------------------------------------------

    @classmethod
    def check_data(cls, x: np.ndarray, where: str) -> None:
        """Raise ``UserError`` naming ``where`` if values of x (N, D) lie outside the model's
        support (finiteness is checked for every model by the loader). Default: any value."""
        return None

    def simulate(self, params: Params, n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """n points (n, D) and their components (n,) drawn from the declaration at θ."""
        seed = int(rng.integers(2**62))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sites = self.to_sites({key: value.to(torch.float64) for key, value in params.items()})
            trace = poutine.trace(poutine.condition(self.model, data=sites)).get_trace(None, n)
        local = [node for node in trace.nodes.values() if _is_local(node)]
        latent = next(node["value"] for node in local if not node["is_observed"] and node["name"] != "x")
        return cast(Tensor, trace.nodes["x"]["value"]).detach(), cast(Tensor, latent).detach()

    # ---- derived from the declaration --------------------------------------------------------

    def to_sites(self, params: Params) -> dict[str, Tensor]:
        """The values of the Pyro model's global sites for a point estimate (copies: guides
        initialized from them may update them in place; differentiable). Default: the same names."""
        return {name: value.clone() for name, value in params.items()}

    def from_sites(self, sites: Mapping[str, Tensor]) -> Params:
        """The point estimate for values of the global sites."""
        return {name: sites[name] for name in self.param_shapes()}

    def log_joint(self, x: Tensor, params: Params) -> Tensor:
        """log p(x_n, z_n = k | θ) for x (N, D); returns (N, K). Default: the declaration's
        local sites, the assignment enumerated by Pyro."""
        trace = self._enumerated_trace(x, params)
        total = sum(node["log_prob"] for node in trace.nodes.values() if _is_local(node))
        assert isinstance(total, Tensor)
        return total.expand(self.k, x.shape[0]).T

    def log_likelihood(self, x: Tensor, params: Params) -> Tensor:
        """log p(x_n | θ) with the assignment summed out; returns (N,)."""
        return torch.logsumexp(self.log_joint(x, params), dim=-1)

    def most_probable_states(self, x: Tensor, params: Params) -> Tensor:
        """The most probable assignment of each row (N,): argmax_k of the log-joint (a model of
        sequences: the most probable state path)."""
        return torch.argmax(self.log_joint(x, params), dim=1)

    def state_entropy(self, x: Tensor, params: Params) -> float:
        """H(z | x, θ) summed over the rows: the entropy of the responsibilities (ICL's penalty)."""
        log_resp = torch.log_softmax(self.log_joint(x, params), dim=1)
        return float(-(log_resp.exp() * log_resp).nan_to_num().sum())

    def log_prior(self, params: Params) -> Tensor:
        """log p(θ), a scalar; zero for the improper flat prior of maximum likelihood. Default:
        the declaration's global sites."""
        example = next(iter(params.values()))
        point = self.example if self.example is not None else torch.zeros(1, self.dim)
        trace = self._enumerated_trace(point.to(example), params)
        total = example.new_zeros(())
        for node in trace.nodes.values():
            if _is_global(node):
                total = total + node["log_prob"].sum()
        return total

    def n_params(self) -> int:
        """Free parameters: the unconstrained dimensions of the declaration's global sites (as
        scikit-learn counts them for its mixtures)."""
        with InitMessenger(_at_unconstrained_zero):
            trace = poutine.trace(self.model).get_trace(None, 1)
        fns = [
            cast(dist.TorchDistribution, node["fn"])
            for node in trace.nodes.values()
            if _is_global(node) and not node["is_observed"]
        ]
        return sum(math.prod(biject_to(fn.support).inverse_shape(fn.shape())) for fn in fns)

    def enumerated_sites(self) -> list[str]:
        """The local latent sites that the declaration marks for Pyro's parallel enumeration (the
        assignments): what EM's E-step sums out. Empty for a declaration without one."""
        return [
            name
            for name, node in self._declared_trace().nodes.items()
            if _is_local(node)
            and not node["is_observed"]
            and (node["infer"] or {}).get("enumerate") == "parallel"
            and cast(dist.TorchDistribution, node["fn"]).has_enumerate_support
        ]

    def global_supports(self) -> dict[str, constraints.Constraint]:
        """The support of each latent global site of the declaration, by name: the space that
        ``biject_to`` maps unconstrained coordinates onto for gradient M-steps."""
        return {
            name: cast(constraints.Constraint, cast(dist.TorchDistribution, node["fn"]).support)
            for name, node in self._declared_trace().nodes.items()
            if _is_global(node) and not node["is_observed"]
        }

    def default_params(self) -> Params:
        """A feasible θ that needs no data: each global site at zero in its unconstrained
        coordinates (equal weights, unit scales, zero locations), where gradient M-steps start."""
        trace = self._declared_trace()
        sites = {
            name: cast(Tensor, node["value"]).detach().to(torch.float64)
            for name, node in trace.nodes.items()
            if _is_global(node) and not node["is_observed"]
        }
        return self.from_sites(sites)

    def _declared_trace(self) -> poutine.Trace:
        """The declaration traced on one observed point (a train point where the model keeps one),
        every latent site at a feasible value (no draws: flat priors cannot be sampled)."""
        point = self.example if self.example is not None else torch.zeros(1, self.dim)
        with InitMessenger(_at_unconstrained_zero):
            return poutine.trace(self.model).get_trace(point)

    def check_params(self, params: Params, where: str) -> Params:
        """Validate shapes against this model (a ``UserError`` naming ``where`` if they differ)
        and project onto its parameter space (``project``); returns float64 tensors."""
        expected = self.param_shapes()
        for name, shape in expected.items():
            if name not in params:
                raise UserError(
                    f"{where}: has no tensor {name!r}; model {self.name!r} needs {sorted(expected)}."
                )
            found = tuple(params[name].shape)
            if found != shape:
                what = "model.k" if found[:1] != shape[:1] else "the data's dimension"
                raise UserError(
                    f"{where}: {name} has shape {found}, but {what} needs {shape} "
                    f"(k={self.k}, dim={self.dim}). Start from a run with the same k and features."
                )
        return self.project({name: params[name].to(torch.float64) for name in expected})

    def project(self, params: Params) -> Params:
        """θ moved onto the model's parameter space (weights normalized)."""
        out = dict(params)
        if "weights" in out:
            out["weights"] = out["weights"] / out["weights"].sum()
        return out

    def init_from_points(self, x: Tensor, index: Tensor, spread: Params) -> Params:
        """θ for ``init.method: random_from_data``: equal weights, the pivot at the points
        x[index] (K,), everything else from ``spread`` (the M-step of all points)."""
        params = dict(spread)
        params["weights"] = torch.full((self.k,), 1.0 / self.k, dtype=x.dtype, device=x.device)
        params[self.pivot] = x[index].clone()
        return self.project(params)

    def component_features(self, params: Params) -> Tensor:
        """(K, F) rows that identify components, for matching two estimates."""
        pivot = params[self.pivot]
        return pivot.reshape(pivot.shape[0], -1)

    def _enumerated_trace(self, x: Tensor, params: Params) -> poutine.Trace:
        sites = self.to_sites(params)
        conditioned = poutine.condition(self.model, data=sites)
        first = -1 - self.max_plate_nesting
        trace = poutine.trace(poutine.enum(conditioned, first_available_dim=first)).get_trace(x)
        trace.compute_log_prob()
        return trace


def _at_unconstrained_zero(site: dict[str, Any]) -> Tensor:
    """A feasible value of any site without drawing it (flat improper priors included): zero in
    unconstrained coordinates, mapped onto the support; the first value of a discrete site."""
    fn = site["fn"]
    if fn.has_enumerate_support:
        return fn.enumerate_support(expand=False)[0].expand(fn.shape())
    try:
        transform = biject_to(fn.support)
    except NotImplementedError:  # e.g. counts
        return torch.zeros(fn.shape())
    return transform(torch.zeros(transform.inverse_shape(fn.shape()))).detach()


def _in_data_plate(node: Message) -> bool:
    return any(frame.name == DATA_PLATE for frame in node.get("cond_indep_stack", ()))


def _is_local(node: Message) -> bool:
    return node["type"] == "sample" and not site_is_subsample(node) and _in_data_plate(node)


def _is_global(node: Message) -> bool:
    return node["type"] == "sample" and not site_is_subsample(node) and not _in_data_plate(node)


class ClosedFormEM(ABC):
    """Exact EM through a design: each point x_n has a feature column t(x_n) (R,) such that
    log p(x_n, z_n = k | θ) = c_k(θ) · t(x_n) for coefficients c(θ) (K, R), and the M-step needs
    only Σ_n r_nk t(x_n). Points may be measured from a fixed ``center`` (``em_center``), so that
    second moments keep their digits; everything of one fit uses the same center.

    A block of B points becomes a design (R, B), points along columns, from which both the
    log-joint and the statistics are GEMMs with long rows.
    """

    k: int

    def check_em(self, method: str) -> None:
        """Raise ``UserError`` if the M-step's maximum does not exist for this model's prior
        (``method`` names what needs it). Default: it always exists."""
        return None

    def em_center(self, x: Tensor) -> Tensor | None:
        """The center that points are measured from, from some typical rows x (B, D)."""
        return None

    @abstractmethod
    def prepare(self, params: Params, center: Tensor | None = None) -> Any:
        """Per-iteration constants that make ``block_log_joint`` cheap (they hold c(θ))."""

    @abstractmethod
    def design_rows(self) -> int:
        """How many rows R a point's design has."""

    def design_buffer(self, like: Tensor, rows: int) -> Any:
        """What ``design`` writes the designs of blocks of up to ``rows`` points into, reused
        from block to block; in like's dtype and device."""
        return like.new_empty(self.design_rows() * rows)

    @abstractmethod
    def design(self, rows: Tensor, center: Tensor | None = None, out: Any = None) -> Tensor:
        """The design (R, B) of points rows (B, D), written into ``out`` (from
        ``design_buffer``) when given."""

    @abstractmethod
    def block_log_joint(self, design: Tensor, prepared: Any, out: Tensor | None = None) -> Tensor:
        """log p(x_n, z_n = k | θ) of a block's design, transposed: (K, B); into ``out`` if given."""

    @abstractmethod
    def new_stats(self, like: Tensor) -> Stats:
        """Zero sufficient statistics in like's dtype and device."""

    @abstractmethod
    def accumulate(self, stats: Stats, design: Tensor, resp: Tensor) -> None:
        """Add points with design (R, B) and responsibilities resp (K, B) to ``stats`` in place."""

    @abstractmethod
    def m_step_stats(
        self, stats: Stats, center: Tensor | None = None, reg_covar: float = 0.0, use_prior: bool = True
    ) -> Params:
        """θ maximizing Σ_n Σ_k r_nk log p(x_n, z_n = k | θ) (+ log p(θ)) from the statistics;
        ``reg_covar`` is the gmm's, ignored by other models."""

    @abstractmethod
    def component_mass(self, stats: Stats) -> Tensor:
        """Σ_n r_nk of the statistics: (K,), in points."""

    @abstractmethod
    def expected_log_joint(self, stats: Stats, prepared: Any) -> Tensor:
        """Σ_n Σ_k r_nk log p(x_n, z_n = k | θ) from the statistics of r and the constants of θ
        (the same center), a scalar, less the points' ``point_constant``: the first term of
        incremental EM's free energy."""

    def point_constant(self, rows: Tensor) -> Tensor | None:
        """What log p(x_n, z_n = k | θ) adds beyond ``block_log_joint`` for rows (B, D): (B,), the
        same for every k and θ (a base measure), or None. It does not move the responsibilities,
        so backends add it to log-likelihoods once per fit rather than once per iteration."""
        return None

    def reseed(self, params: Params, components: Sequence[int], x: Tensor) -> Params:
        """θ with each of ``components`` (which lost their points) restarted on x (N, D), by a
        deterministic rule that leaves it able to claim points at the next E-step. Default: at
        the point the live components explain worst, with half the largest live weight."""
        assert isinstance(self, LatentModel)
        out = {name: value.clone() for name, value in params.items()}
        weights = out["weights"]
        live = torch.ones(self.k, dtype=torch.bool, device=weights.device)
        live[list(components)] = False
        for k in components:
            kept = {name: _take(value, live, self.component_axes[name]) for name, value in out.items()}
            kept["weights"] = kept["weights"] / kept["weights"].sum()
            worst = torch.argmin(self.log_likelihood(x, kept)).expand(self.k)
            out[self.pivot][k] = self.init_from_points(x, worst, out)[self.pivot][k]
            largest = int(torch.argmax(torch.where(live, weights, -1.0)))
            weights[k] = weights[largest] = weights[largest] / 2
            live[k] = True
        out["weights"] = weights / weights.sum()
        return out

    def m_step(self, x: Tensor, resp: Tensor, reg_covar: float = 0.0, use_prior: bool = True) -> Params:
        """θ maximizing Σ_n Σ_k resp[n, k] log p(x_n, z_n = k | θ) (+ log p(θ)) for x (N, D)."""
        rows = 4096
        center = self.em_center(x[:rows])
        stats = self.new_stats(x)
        buffer = self.design_buffer(x, min(rows, x.shape[0]))
        for block, block_resp in zip(x.split(rows), resp.split(rows), strict=True):
            self.accumulate(stats, self.design(block, center, buffer), block_resp.T)
        return self.m_step_stats(stats, center, reg_covar, use_prior)


def _take(value: Tensor, keep: Tensor, axes: tuple[int, ...]) -> Tensor:
    for axis in axes:
        value = value.index_select(axis, torch.nonzero(keep).flatten())
    return value


class ExpFamilyEM(ClosedFormEM):
    """Closed-form EM for a mixture whose components are an exponential family:
    log p(x, z = k | θ) = η_k · T(x) + (log π_k - A(η_k)) + log h(x). The design of a block is
    T(x) transposed, (S, B) (a view when T(x) = x: nothing is copied), and the prepared
    constants are η (K, S) and the offsets log π_k - A(η_k) (K,), so a block's log-joint is one
    GEMM plus a bias; the statistics are nk = Σ_n r_nk (key ``nk``) and Σ_n r_nk T(x_n) (key
    ``sums``, (K, S)). log h(x), the same for every component and every θ, is the
    ``point_constant``, computed once per fit rather than in every iteration.
    """

    @abstractmethod
    def sufficient(self, rows: Tensor) -> Tensor:
        """T(x) (B, S) of points rows (B, D)."""

    def log_base(self, rows: Tensor) -> Tensor | None:
        """log h(x) (B,) of points rows (B, D); None for h = 1."""
        return None

    @abstractmethod
    def natural(self, params: Params) -> tuple[Tensor, Tensor]:
        """η (K, S) and log π_k - A(η_k) (K,)."""

    @abstractmethod
    def m_step_moments(self, nk: Tensor, sums: Tensor, use_prior: bool) -> Params:
        """θ from nk (K,) and Σ_n r_nk T(x_n) (K, S)."""

    def point_constant(self, rows: Tensor) -> Tensor | None:
        return self.log_base(rows)

    def design_rows(self) -> int:
        return self.sufficient(torch.zeros(1, getattr(self, "dim", 1))).shape[1]

    def design_buffer(self, like: Tensor, rows: int) -> None:
        return None  # the design is T(x)^T, made per block (a view of the rows for T(x) = x)

    def prepare(self, params: Params, center: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """η (K, S) and the offsets (K, 1)."""
        eta, offset = self.natural(params)
        return eta, offset[:, None]

    def design(self, rows: Tensor, center: Tensor | None = None, out: Any = None) -> Tensor:
        return self.sufficient(rows).T

    def block_log_joint(
        self, design: Tensor, prepared: tuple[Tensor, Tensor], out: Tensor | None = None
    ) -> Tensor:
        eta, offset = prepared
        return torch.addmm(offset, eta, design, out=out)

    def log_joint(self, x: Tensor, params: Params) -> Tensor:
        log_joint = self.block_log_joint(self.design(x), self.prepare(params)).T
        base = self.log_base(x)
        return log_joint if base is None else log_joint + base[:, None]

    def new_stats(self, like: Tensor) -> Stats:
        return {"nk": like.new_zeros(self.k), "sums": like.new_zeros(self.k, self.design_rows())}

    def accumulate(self, stats: Stats, design: Tensor, resp: Tensor) -> None:
        stats["nk"].add_(resp.sum(1))
        stats["sums"].addmm_(resp, design.T)

    def component_mass(self, stats: Stats) -> Tensor:
        return stats["nk"]

    def expected_log_joint(self, stats: Stats, prepared: tuple[Tensor, Tensor]) -> Tensor:
        eta, offset = prepared
        return (stats["sums"] * eta).sum() + stats["nk"] @ offset[:, 0]

    def m_step_stats(
        self, stats: Stats, center: Tensor | None = None, reg_covar: float = 0.0, use_prior: bool = True
    ) -> Params:
        return self.m_step_moments(stats["nk"], stats["sums"], use_prior)


class Flat(dist.ImproperUniform):
    """The improper flat prior of maximum likelihood; its zero log density takes the value's dtype
    (Pyro's ImproperUniform returns the default dtype, which breaks float64 ELBOs)."""

    def log_prob(self, value: Tensor) -> Tensor:
        batch_shape = value.shape[: value.dim() - self.event_dim]
        return value.new_zeros(()).expand(torch.broadcast_shapes(batch_shape, self.batch_shape))


MODELS: Registry[type[LatentModel]] = Registry("model")
