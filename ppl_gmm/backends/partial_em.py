"""What the EM variants that update θ from part of the data share (``online_em`` on mini-batches,
``incremental_em`` on fixed blocks): the E-step on some rows with its entropy, the check for
emptied components, and sufficient-statistics arithmetic. Their loops' bookkeeping is
``em.EMRun``, batch EM's too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models.base import ClosedFormEM, Params, Stats
from .base import FitError
from .em import EMRun, PartialEStep, data_constant, e_step_blocks, empty_components

__all__ = [
    "CHUNK_ROWS",
    "PartialEStep",
    "check_not_empty",
    "combine",
    "e_step_rows",
    "m_step_checked",
]

CHUNK_ROWS = 4096  # rows per E-step chunk, batch EM's default: fast GEMMs, memory O(chunk × K × D)


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
    """``e_step_blocks`` on rows (B, D) in chunks of ``CHUNK_ROWS``, with the entropy and the
    log-likelihood's ``point_constant``; ``buffer``: a ``design_buffer`` of at least
    min(B, CHUNK_ROWS) rows."""
    result = e_step_blocks(model, rows.split(CHUNK_ROWS), prepared, center, stats, buffer, entropy=True)
    return result._replace(log_likelihood=result.log_likelihood + data_constant(model, rows))


def combine(a: Stats, b: Stats, weight_a: float, weight_b: float) -> Stats:
    """weight_a · a + weight_b · b, in new tensors."""
    return {name: weight_a * value + weight_b * b[name] for name, value in a.items()}


def m_step_checked(
    model: ClosedFormEM,
    run: EMRun,
    stats: Stats,
    center: Tensor | None,
    reg: float,
    step: int,
    params: Params,
) -> Params:
    """``m_step_stats``, a covariance singular to working precision reported as a ``FitError`` at
    ``step`` (with the parameters before it)."""
    try:
        return model.m_step_stats(stats, center, reg)
    except torch.linalg.LinAlgError:
        raise run.singular(step, params) from None
