"""Exact EM for mixtures: log-space E-step from the model's log-joint, closed-form M-step.

With a conjugate prior the M-step is the posterior mode (MAP-EM) and the objective is the
log posterior per point. Stops as scikit-learn does: the objective changed by less than ``tol``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from ..errors import UserError
from ..models.base import LatentModel, Params
from .base import BACKENDS, Backend, FitError, FitResult, Options, Report, StepInfo

__all__ = ["EM", "EMOptions", "e_step", "stick_breaking_has_no_mode"]


class EMOptions(Options):
    max_iter: int = Field(500, ge=0)  # M-steps at most
    tol: float = Field(1e-6, ge=0)  # on the change of the mean per-point objective
    reg_covar: float = Field(1e-6, ge=0)  # added to covariance diagonals in each M-step
    block_rows: int = Field(4096, ge=1)  # rows per block: memory is O(block_rows × K × D)


def stick_breaking_has_no_mode(method: str) -> UserError:
    """The error of a posterior-mode backend asked to fit the stick-breaking weight prior."""
    return UserError(
        f"model.hyperparameters.weight_prior: {method} needs the posterior mode, but found "
        "'dirichlet_process', whose mode lies on the boundary of the sticks' space (or does not "
        "exist). Use the vb or svi backend, or set model.hyperparameters.weight_prior: dirichlet."
    )


def e_step(model: LatentModel, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
    """log p(x_n | θ) (N,) and log responsibilities log p(z_n = k | x_n, θ) (N, K)."""
    log_joint = model.log_joint(x, params)
    log_norm = torch.logsumexp(log_joint, dim=1)
    return log_norm, log_joint - log_norm[:, None]


@BACKENDS.register("em")
class EM(Backend):
    name = "em"
    options = EMOptions

    def check(self, model: LatentModel, options: EMOptions) -> None:
        prior = getattr(model, "prior", None)
        if prior is not None and prior.stick_breaking:
            raise stick_breaking_has_no_mode("MAP-EM")
        if prior is not None and prior.weight_concentration < 1:
            raise UserError(
                "model.hyperparameters.weight_concentration: MAP-EM needs a Dirichlet "
                f"concentration of at least 1 for the weights' mode to exist, but found "
                f"{prior.weight_concentration}. Try 1.0."
            )

    def total_steps(self, options: EMOptions) -> int:
        return options.max_iter

    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: EMOptions, report: Report
    ) -> FitResult:
        n = x.shape[0]
        params = {name: value.to(x) for name, value in init.items()}
        shift = x[: options.block_rows].mean(0)  # second moments about a typical point keep their digits
        start = time.perf_counter()
        previous: float | None = None
        converged = False
        step = 0
        for step in range(options.max_iter + 1):
            try:
                total, stats = _e_pass(model, x, params, shift, options.block_rows)
            except torch.linalg.LinAlgError:
                raise FitError(
                    f"step {step}: a covariance matrix is not positive definite. Increase "
                    "backends.em.reg_covar, set data.standardize: true, or lower model.k."
                ) from None
            log_likelihood = total / n
            objective = log_likelihood
            if model.has_prior:
                objective += float(model.log_prior(params)) / n
            report(StepInfo(step, time.perf_counter() - start, objective, log_likelihood))
            if not math.isfinite(objective):
                raise FitError(
                    f"step {step}: the objective is {objective}. Increase backends.em.reg_covar "
                    "or set data.standardize: true."
                )
            if previous is not None and abs(objective - previous) < options.tol:
                converged = True
                break
            if step == options.max_iter:
                break
            params = model.m_step_stats(stats, options.reg_covar)
            previous = objective
        return FitResult(
            params=params,
            n_steps=step,
            converged=converged,
            fit_seconds=time.perf_counter() - start,
            point_estimate="map" if model.has_prior else "mle",
        )


def _e_pass(
    model: LatentModel, x: Tensor, params: Params, shift: Tensor, block_rows: int
) -> tuple[float, Any]:
    """One pass over row blocks: the summed log-likelihood at θ and the M-step's statistics.

    The log-sum-exp and the responsibilities share one exponential, floored at the smallest
    normal number: subnormal results are ~40× slower on CPUs and weigh nothing."""
    prepared = model.prepare(params, shift)
    stats = model.new_stats(shift)
    buffer = x.new_empty(model.feature_count(), min(block_rows, x.shape[0]))
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0
    total = x.new_zeros((), dtype=torch.float64)
    for rows in x.split(block_rows):
        xt = (rows - shift).T.contiguous()
        features = model.features(xt, buffer)
        log_joint = model.block_log_joint(xt, features, prepared)
        peak = log_joint.amax(0)
        resp = log_joint.sub_(peak).clamp_(min=floor).exp_()
        norm = resp.sum(0)
        total += (peak + norm.log()).sum()
        model.accumulate(stats, xt, features, resp.div_(norm))
    return float(total), stats
