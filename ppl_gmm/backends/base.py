"""What every backend offers: options, a check before fitting, and ``fit``."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor

from ..models.base import LatentModel, Params
from ..registry import Registry

__all__ = [
    "BACKENDS",
    "Backend",
    "Clock",
    "FitError",
    "FitResult",
    "Options",
    "Report",
    "StepInfo",
    "one_line",
    "refuse_sequences",
]


class Options(BaseModel):
    """A backend's options; unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    save_assignments: bool = False  # write assignments.csv: hard and soft assignments of train points


class StepInfo(NamedTuple):
    """One step's diagnostics: the backend's own objective and, where it was evaluated, the
    exact train log-likelihood, both per point."""

    step: int
    wall_seconds: float
    objective: float
    log_likelihood: float | None


Report = Callable[[StepInfo], None]


@dataclass(frozen=True)
class FitResult:
    params: Params
    n_steps: int
    converged: bool
    fit_seconds: float
    point_estimate: str  # mle | map | posterior_mean | posterior_median
    elbo: float | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)  # JSON-friendly summary fields
    # further tensors to keep, by file stem: {"draws": {...}} is saved as draws.safetensors
    tensors: Mapping[str, Mapping[str, Tensor]] = field(default_factory=dict)


class FitError(RuntimeError):
    """A backend failed while fitting; the message says at which step and what to change."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters, without the offending
    values and the dump of trace shapes that Pyro's checks append."""
    return " ".join(str(exc).split("Trace Shapes:")[0].split(", but found")[0].split())[:limit]


OptionsT = TypeVar("OptionsT", bound=Options)


class Backend(ABC, Generic[OptionsT]):
    """An inference algorithm, generic in its options type ``OptionsT`` (``options`` is that type at
    runtime, for validating a config's options)."""

    name: ClassVar[str]
    options: ClassVar[type[Options]]
    # a sampler's per-step log-likelihoods are of random draws, not of estimates it reached; it
    # optimizes nothing, so the comparison gives it no target
    samples: ClassVar[bool] = False
    # a variational backend's target is the ELBO; an optimizer's, the log posterior with a prior
    # and the log-likelihood without (``experiment.target_of``)
    variational: ClassVar[bool] = False
    # the objective reported at step s is that of the estimate before the step's update (the loss
    # that Pyro's ``SVI.step`` returns is the one it differentiated), so it describes step s - 1
    objective_lags: ClassVar[bool] = False

    def objective_is_target(self, options: OptionsT) -> bool:
        """Whether every step's ``objective`` is the exact value of the backend's target (or a
        lower bound of it) at that step's estimate, so that the comparison can time its progress
        along the way. False for a stochastic estimate (mini-batches, Monte Carlo): then only the
        final value counts, at the end of the fit. Default: False."""
        return False

    def check(self, model: LatentModel, options: OptionsT) -> None:
        """Raise ``UserError`` if this backend cannot fit ``model`` with ``options``."""
        return None

    def total_steps(self, options: OptionsT, n: int | None = None) -> int | None:
        """The most steps ``fit`` takes on ``n`` train points, for progress display."""
        return None

    @abstractmethod
    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: OptionsT, report: Report
    ) -> FitResult:
        """Fit from ``init`` on x (N, D); call ``report`` once per step."""


class Clock:
    """Wall time since start, less the time spent on evaluations that are not the algorithm's
    (``with clock.aside(): ...``): the one clock of every backend's ``fit_seconds``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.excluded = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    @contextmanager
    def aside(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began


BACKENDS: Registry[type[Backend[Any]]] = Registry("backend")


def refuse_sequences(model: LatentModel, backend: str, why: str) -> None:
    """A ``UserError`` if ``model``'s data are sequences (a hidden Markov model) that ``backend``
    cannot serve, ``why`` saying why: refused up front, never a wrong answer."""
    if model.sequential:
        from ..errors import UserError

        raise UserError(
            f"backends.{backend}: model {model.name!r} is a hidden Markov model, whose states depend on "
            f"each other along a sequence; {why}. Use em (Baum–Welch), vb, map, svi or mcmc."
        )
