"""What the EM variants that update θ from part of the data share (``online_em`` on mini-batches,
``incremental_em`` on fixed blocks): the E-step on some rows, sufficient-statistics arithmetic,
the expected complete-data log-joint from statistics, and a clock that leaves evaluations out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import UserError
from ..models.base import LatentModel, Params
from ..models.gmm import DesignBuffer, GaussianMixture, Prepared, SufficientStats
from .base import FitError
from .em import empty_components, not_positive_definite

__all__ = [
    "CHUNK_ROWS",
    "Clock",
    "PartialEStep",
    "check_gaussian",
    "check_not_empty",
    "combine",
    "e_step_rows",
    "expected_log_joint",
    "log_prior",
    "prepare",
]

CHUNK_ROWS = 4096  # rows per E-step chunk, batch EM's default: fast GEMMs, memory O(chunk × K × D)


class PartialEStep(NamedTuple):
    """Sums over the rows of one E-step at θ: Σ_n log p(x_n | θ) and the entropy
    Σ_n H(p(z_n | x_n, θ)) of the responsibilities."""

    log_likelihood: float
    entropy: float


def check_gaussian(model: LatentModel, backend: str) -> None:
    """These variants combine the Gaussian mixture's own statistics; other models have none yet."""
    if not isinstance(model, GaussianMixture):
        raise UserError(
            f"backends.{backend}: expected the gmm model, but found {model.name!r}. Use the em backend."
        )


def prepare(model: LatentModel, params: Params, shift: Tensor, step: int, backend: str) -> Prepared:
    """``model.prepare``, with a singular covariance reported as a ``FitError`` at ``step``."""
    try:
        return model.prepare(params, shift)
    except torch.linalg.LinAlgError:
        raise not_positive_definite(step, backend, shift.dtype) from None


def log_prior(model: LatentModel, params: Params, step: int, backend: str) -> float:
    """``model.log_prior``, with precisions outside the prior's support (a covariance that is
    positive definite only up to rounding) reported as a ``FitError`` at ``step``."""
    try:
        return float(model.log_prior(params))
    except (torch.linalg.LinAlgError, ValueError):
        raise not_positive_definite(step, backend, params["means"].dtype) from None


def check_not_empty(model: LatentModel, stats: SufficientStats, step: int, fix: str) -> None:
    """A ``FitError`` at ``step`` when, without a prior, a component of ``stats`` has lost all its
    points (see ``empty_components``): its M-step estimates would be the guard's doing. These
    variants keep statistics of past E-steps, which a re-seeded θ would contradict, so they stop;
    ``fix`` says what to change. With a prior the M-step's mode is defined without points."""
    if model.has_prior:
        return
    empty = empty_components(model.component_mass(stats))
    if empty:
        raise FitError(f"step {step}: component {empty[0]} lost all its points, so it has no estimate. {fix}")


def e_step_rows(
    model: LatentModel,
    rows: Tensor,
    prepared: Prepared,
    stats: SufficientStats | None = None,
    buffer: DesignBuffer | None = None,
) -> PartialEStep:
    """The E-step on rows (B, D) at the θ of ``prepared``, in chunks of ``CHUNK_ROWS``.

    Adds the rows' statistics to ``stats`` (measured from ``prepared.shift``) when given, and
    writes the designs into ``buffer`` (flat, ≥ R · min(B, CHUNK_ROWS)) when given. As batch EM's pass:
    one exponential, floored at the smallest normal number; with s_k = log p(x, k) - max_j log p(x, j)
    and r = softmax(s), the entropy is -Σ_k r_k log r_k = log Σ_k e^{s_k} - Σ_k r_k s_k.
    """
    shift = prepared.shift
    floor = math.log(torch.finfo(rows.dtype).tiny) + 1.0
    if buffer is None:
        buffer = model.design_buffer(rows, min(CHUNK_ROWS, rows.shape[0]))
    log_likelihood = rows.new_zeros((), dtype=torch.float64)
    entropy = rows.new_zeros((), dtype=torch.float64)
    for chunk in rows.split(CHUNK_ROWS):
        design = model.design(chunk, shift, buffer)
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


def expected_log_joint(stats: SufficientStats, prepared: Prepared) -> Tensor:
    """Σ_n Σ_k r_nk log p(x_n, z_n = k | θ) from the statistics of the responsibilities r alone.

    ``block_log_joint`` is affine in a point's features: log p(x, k | θ) = log_norm_k
    - ½ (matrix_k · φ(x) - 2 linear_k · x + const_k), with x and the means measured from the
    shift that ``stats`` and ``prepared`` share; so its r-weighted sum needs only Σ_n r_nk φ(x_n)
    (``second``), Σ_n r_nk x_n (``sums``) and Σ_n r_nk (``nk``). Returns a scalar.
    """
    if stats.second.dim() == 1:  # tied: Σ_n φ(x_n) unweighted; one precision, and Σ_k r_nk = 1
        quadratic = prepared.matrix[0] @ stats.second
    else:
        quadratic = (prepared.matrix * stats.second).sum()
    per_count = (prepared.log_norm - 0.5 * prepared.const).squeeze(1)
    return stats.nk @ per_count + (prepared.linear * stats.sums).sum() - 0.5 * quadratic


def combine(a: SufficientStats, b: SufficientStats, weight_a: float, weight_b: float) -> SufficientStats:
    """weight_a · a + weight_b · b, for statistics about the same shift."""
    return SufficientStats(
        a.shift,
        weight_a * a.nk + weight_b * b.nk,
        weight_a * a.sums + weight_b * b.sums,
        weight_a * a.second + weight_b * b.second,
    )


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
