"""Baum–Welch: exact EM for a hidden Markov model (Bishop §13.2.1), the ``em`` backend's loop for a
sequential model. Each iteration is the model's forward–backward E-step over all sequences and
its M-step from the expected counts and the smoothed state probabilities; the log-likelihood
(+ log prior) never decreases, and the fit stops as ``em`` does on its change per observation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from ..models.base import Params
from .base import FitResult, Report, StepInfo

if TYPE_CHECKING:
    from .em import EMRun

__all__ = ["SequentialEM", "baum_welch"]


class SequentialEM(Protocol):
    """What Baum–Welch needs of a sequential model (``models.hmm.HiddenMarkovModel`` gives it)."""

    def e_step(self, x: Tensor, params: Params, posteriors: bool = True) -> Any: ...

    def m_step_hmm(self, x: Tensor, estep: Any, reg_covar: float = 0.0, use_prior: bool = True) -> Params: ...


def baum_welch(
    model: SequentialEM, x: Tensor, init: Params, max_iter: int, reg_covar: float, run: EMRun, report: Report
) -> FitResult:
    """Baum–Welch from ``init``; ``run`` keeps the clock, the objective and the stopping rule."""
    n = x.shape[0]
    params: Params = {name: value.to(x) for name, value in init.items()}
    converged, step = False, 0
    for step in range(max_iter + 1):
        try:
            estep = model.e_step(x, params)
        except torch.linalg.LinAlgError:
            raise run.singular(step, params) from None
        objective = run.objective(estep.log_likelihood, params, step)
        report(StepInfo(step, run.clock.seconds(), objective, estep.log_likelihood / n))
        if run.settled(objective):
            converged = True
            break
        if step == max_iter:
            break
        params = model.m_step_hmm(x, estep, reg_covar)
    return run.result(params, step, converged)
