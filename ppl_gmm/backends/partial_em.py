"""What the EM variants that update θ from part of the data share (``online_em`` on mini-batches,
``incremental_em`` on fixed blocks): the E-step on some rows, sufficient-statistics arithmetic,
the expected complete-data log-joint from statistics, and a clock that leaves evaluations out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..models.base import ClosedFormEM, LatentModel, Params, Stats
from .base import FitError
from .em import empty_components, not_positive_definite

__all__ = [
    "CHUNK_ROWS",
    "Clock",
    "PartialEStep",
    "check_not_empty",
    "combine",
    "e_step_rows",
    "log_prior",
    "prepare",
]

CHUNK_ROWS = 4096  # rows per E-step chunk, batch EM's default: fast GEMMs, memory O(chunk × K × D)


class PartialEStep(NamedTuple):
    """Sums over the rows of one E-step at θ: Σ_n log p(x_n | θ) and the entropy
    Σ_n H(p(z_n | x_n, θ)) of the responsibilities."""

    log_likelihood: float
    entropy: float


def prepare(model: ClosedFormEM, params: Params, center: Tensor | None, step: int, backend: str) -> Any:
    """``model.prepare``, with a singular covariance reported as a ``FitError`` at ``step``."""
    try:
        return model.prepare(params, center)
    except torch.linalg.LinAlgError:
        dtype = next(iter(params.values())).dtype
        raise not_positive_definite(step, backend, dtype) from None


def log_prior(model: LatentModel, params: Params, step: int, backend: str) -> float:
    """``model.log_prior``, with precisions outside the prior's support (a covariance that is
    positive definite only up to rounding) reported as a ``FitError`` at ``step``."""
    try:
        return float(model.log_prior(params))
    except (torch.linalg.LinAlgError, ValueError):
        raise not_positive_definite(step, backend, next(iter(params.values())).dtype) from None


def check_not_empty(model: ClosedFormEM, stats: Stats, step: int, fix: str) -> None:
    """A ``FitError`` at ``step`` when, without a prior, a component of ``stats`` has lost all its
    points (see ``empty_components``): its M-step estimates would be the guard's doing. These
    variants keep statistics of past E-steps, which a re-seeded θ would contradict, so they stop;
    ``fix`` says what to change. With a prior the M-step's mode is defined without points."""
    if getattr(model, "has_prior", False):
        return
    empty = empty_components(model.component_mass(stats))
    if empty:
        raise FitError(f"step {step}: component {empty[0]} lost all its points, so it has no estimate. {fix}")


def e_step_rows(
    model: ClosedFormEM,
    rows: Tensor,
    prepared: Any,
    center: Tensor | None,
    stats: Stats | None = None,
    buffer: Any = None,
) -> PartialEStep:
    """The E-step on rows (B, D) at the θ of ``prepared``, in chunks of ``CHUNK_ROWS``.

    Adds the rows' statistics to ``stats`` (points measured from ``center``) when given, and
    writes the designs into ``buffer`` (``design_buffer`` of ≥ min(B, CHUNK_ROWS) rows) when given.
    As batch EM's pass:
    one exponential, floored at the smallest normal number; with s_k = log p(x, k) - max_j log p(x, j)
    and r = softmax(s), the entropy is -Σ_k r_k log r_k = log Σ_k e^{s_k} - Σ_k r_k s_k.
    """
    floor = math.log(torch.finfo(rows.dtype).tiny) + 1.0
    if buffer is None:
        buffer = model.design_buffer(rows, min(CHUNK_ROWS, rows.shape[0]))
    log_likelihood = rows.new_zeros((), dtype=torch.float64)
    entropy = rows.new_zeros((), dtype=torch.float64)
    for chunk in rows.split(CHUNK_ROWS):
        design = model.design(chunk, center, buffer)
        shifted = model.block_log_joint(design, prepared)
        peak = shifted.amax(0)
        shifted.sub_(peak).clamp_(min=floor)
        resp = shifted.exp()
        norm = resp.sum(0)
        log_norm = norm.log()
        log_likelihood += (peak + log_norm).sum()
        resp.mul_(norm.reciprocal())  # faster than a broadcast division (see em._e_lane)
        entropy += log_norm.sum() - torch.dot(resp.view(-1), shifted.view(-1))
        if stats is not None:
            model.accumulate(stats, design, resp)
    return PartialEStep(float(log_likelihood), float(entropy))


def combine(a: Stats, b: Stats, weight_a: float, weight_b: float) -> Stats:
    """weight_a · a + weight_b · b, in new tensors."""
    return {name: weight_a * value + weight_b * b[name] for name, value in a.items()}


class Clock:
    """Wall time since start, less the time spent on evaluations that are not the algorithm's."""

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
