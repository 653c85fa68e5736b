"""The stochastic-variational loop shared by the Pyro backends (MAP and SVI).

One ``pyro.infer.SVI`` over the model's own declaration; the loop adds only what every backend
reports: the objective per point each step and, every ``eval_every`` steps, the exact train
log-likelihood of the current point estimate (its cost is kept out of the timings). With
``compile`` the step is recorded once from the declaration and compiled (``compiled.py``): the
same losses, without Pyro's Python per step; the compiling is timed apart, in ``compile_seconds``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple

import pyro
import pyro.optim
import torch
from pydantic import Field, model_validator
from pyro.infer import SVI, JitTraceEnum_ELBO, TraceEnum_ELBO
from pyro.optim import clipped_adam
from torch import Tensor

from ..models.base import LatentModel, Params
from .base import Clock, FitError, Options, Report, StepInfo, one_line
from .compiled import Compile, CompiledSVI, wants

__all__ = ["Plateau", "SVIOptions", "SVIRun", "make_elbo", "make_optimizer", "run_svi"]


class SVIOptions(Options):
    steps: int = Field(2000, ge=0)  # optimizer steps at most
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["adam", "clipped_adam"] = "adam"
    # stopping: the loss is checked every step (window null), or its mean over each window of
    # this many steps; a check is calm when the value moved by at most tol relative to the last
    # one (a window's mean also when it moved by less than the standard error of that change,
    # i.e. within the noise); the fit stops after `patience` calm checks in a row (tol 0: never)
    tol: float = Field(0.0, ge=0)
    patience: int = Field(10, ge=1)
    window: int | None = Field(None, ge=2)
    num_particles: int = Field(1, ge=1)
    # record the step once from the declaration and compile it: auto (with 1000 steps or more,
    # where compiling, 1-4 s with TorchInductor's cache warm and 10-30 s cold, pays off), true,
    # record (record only: no compiling), false (Pyro's eager step); see compiled.py
    compile: Compile = "auto"
    jit: bool = False  # Pyro's JitTraceEnum_ELBO instead (compile: false)
    eval_every: int = Field(50, ge=1)  # exact train log-likelihood every so many steps
    batch_size: int | None = Field(None, ge=1)  # mini-batch SVI: points per step (null: all)

    @model_validator(mode="after")
    def _jit_needs_full_batches(self) -> SVIOptions:
        if self.jit and self.batch_size is not None:
            raise ValueError(
                "jit compiles one fixed computation, but mini-batches subsample new points every "
                "step; set jit: false or batch_size: null"
            )
        if self.jit and self.compile not in ("auto", False):
            raise ValueError(
                "jit (Pyro's JIT) and compile (the step recorded and compiled) are two ways to "
                "compile the step; set one of them to false"
            )
        return self


class SVIRun(NamedTuple):
    """What ``run_svi`` reports: steps taken, whether the stopping rule was met, the fit's
    seconds (compiling excluded), and ``compile_seconds`` and ``compiled`` for the summary."""

    n_steps: int
    converged: bool
    fit_seconds: float
    extras: dict[str, object]


def make_elbo(model: LatentModel, options: SVIOptions, num_particles: int | None = None) -> TraceEnum_ELBO:
    cls = JitTraceEnum_ELBO if options.jit else TraceEnum_ELBO
    return cls(
        max_plate_nesting=model.max_plate_nesting,
        num_particles=num_particles or options.num_particles,
        ignore_jit_warnings=True,
    )


def make_optimizer(options: SVIOptions) -> pyro.optim.PyroOptim:
    # what pyro.optim.Adam and pyro.optim.ClippedAdam wrap (Adam is generated at import time,
    # where mypy cannot see it)
    optimizer = {"adam": torch.optim.Adam, "clipped_adam": clipped_adam.ClippedAdam}[options.optimizer]
    return pyro.optim.PyroOptim(optimizer, {"lr": options.lr})


class Plateau:
    """The stopping rule of ``SVIOptions`` (tol, patience, window), fed one loss per step."""

    def __init__(self, tol: float, patience: int, window: int | None) -> None:
        self.tol, self.patience, self.window = tol, patience, window
        self.losses: list[float] = []
        self.calm = 0

    def update(self, loss: float) -> bool:
        """Whether the fit has converged, ``loss`` included."""
        if self.tol <= 0:
            return False
        self.losses.append(loss)
        if self.window is None:
            if len(self.losses) >= 2:
                previous, current = self.losses[-2:]
                self.calm = self.calm + 1 if abs(current - previous) <= self.tol * abs(previous) else 0
            del self.losses[:-1]
        elif len(self.losses) == 2 * self.window:
            before = torch.tensor(self.losses[: self.window], dtype=torch.float64)
            after = torch.tensor(self.losses[self.window :], dtype=torch.float64)
            change = float((after.mean() - before.mean()).abs())
            noise = float((before.var() / self.window + after.var() / self.window).sqrt())
            calm = change <= max(self.tol * float(before.mean().abs()), noise)
            self.calm = self.calm + 1 if calm else 0
            del self.losses[: self.window]
        return self.calm >= self.patience


def run_svi(
    model: LatentModel,
    guide: Callable[..., object],
    x: Tensor,
    options: SVIOptions,
    point_estimate: Callable[[], Params],
    report: Report,
    name: str,
) -> SVIRun:
    """Run SVI from the guide's initial state."""
    n = x.shape[0]
    elbo = make_elbo(model, options)
    svi = SVI(model.model, guide, make_optimizer(options), elbo)

    step = 0

    def failed(what: str) -> FitError:
        return FitError(
            f"step {step}: {what}. Lower backends.{name}.lr, try optimizer: clipped_adam, or set "
            "data.standardize: true."
        )

    def checked(compute: Callable[[], float], what: str) -> float:
        """``compute()``, with a non-finite value or invalid parameters (Pyro's checks raise
        ValueError, a singular covariance LinAlgError) as a ``FitError`` at the current step."""
        try:
            value = compute()
        except (ValueError, torch.linalg.LinAlgError) as exc:
            raise failed(f"the parameters became invalid ({one_line(exc)})") from None
        if not math.isfinite(value):
            raise failed(f"the {what} became {value}")
        return value

    def initial_loss() -> float:
        return checked(lambda: svi.evaluate_loss(x, batch_size=options.batch_size), "loss")

    def exact_log_likelihood() -> float:
        def compute() -> float:
            params = {key: value.detach() for key, value in point_estimate().items()}
            return float(model.log_likelihood(x, params).mean())

        return checked(compute, "log-likelihood")

    with warnings.catch_warnings():
        # torch deprecates jit.trace, which JitTraceEnum_ELBO is built on; the option still works
        warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", DeprecationWarning)
        clock = Clock()
        with clock.aside():
            start = initial_loss()
            log_likelihood: float | None = exact_log_likelihood()
        report(StepInfo(0, 0.0, -start / n, log_likelihood))  # shown while the step compiles
        step_once = lambda: svi.step(x, batch_size=options.batch_size)  # noqa: E731
        extras: dict[str, object] = {"compile_seconds": None, "compiled": None}
        how = None if options.jit else wants(options.compile, options.steps)
        if how is not None:
            began = time.perf_counter()
            try:
                with clock.aside():  # the guide's parameters exist now: the initial loss ran it
                    compiled = CompiledSVI(
                        elbo,
                        model.model,
                        guide,
                        (x,),
                        {"batch_size": options.batch_size},
                        options.optimizer,
                        options.lr,
                        how,
                    )
            except Exception as exc:
                if how != "auto":
                    raise FitError(f"the step could not be recorded and compiled ({one_line(exc)})") from exc
                # auto: a declaration the recording cannot follow runs eagerly, and says why
                seconds = time.perf_counter() - began
                extras = {"compile_seconds": seconds, "compiled": None, "compile_error": one_line(exc)}
            else:
                step_once = compiled.step
                extras = {"compile_seconds": compiled.compile_seconds, "compiled": compiled.how}
        plateau = Plateau(options.tol, options.patience, options.window)
        if options.window is None:  # a step's loss is compared with the one before, the first's too
            plateau.update(start)
        converged = False
        for step in range(1, options.steps + 1):
            loss = checked(step_once, "loss")
            converged = plateau.update(loss)
            seconds = clock.seconds()
            evaluate = converged or step == options.steps or step % options.eval_every == 0
            log_likelihood = None
            if evaluate:
                with clock.aside():
                    log_likelihood = exact_log_likelihood()
            report(StepInfo(step, seconds, -loss / n, log_likelihood))
            if converged:
                break
        return SVIRun(step, converged, clock.seconds(), extras)
