"""Incremental EM (Neal & Hinton 1998): E-steps on one block of the data at a time.

The data are split into ``blocks`` fixed blocks, each keeping the sufficient statistics of its
last E-step; their sum is the total. A step is an E-step on one block (total += new - old) and
an M-step from the total, so θ moves ``blocks`` times per pass over the data. Both halves raise
the free energy, a lower bound on the log-likelihood (+ log prior) that each step reports:

    F(q, θ) = Σ_n Σ_k r_nk log p(x_n, z_n = k | θ) + Σ_n H(r_n) (+ log p(θ)),

with r the responsibilities of each block's last E-step. The first term is linear in the
statistics (the model's ``expected_log_joint``); the entropies are kept per block from their E-steps. A first
full pass at the initial θ fills every block. Stops as batch EM does, on the change of the exact
train log-likelihood (+ log prior) per point over one epoch; that evaluation, one extra pass per
epoch, is left out of the timings like the other backends' evaluations.

A model without a closed-form M-step (or ``m_step: gradient | ecm``) keeps the responsibilities
of each block instead of statistics (memory O(N × K)), and each M-step is generalized EM's
(``gem.py``): Q(θ) = Σ_n Σ_k r_nk log p(x_n, z_n = k | θ) (+ log p(θ)) raised, never lowered, over
all points, so the free energy still never decreases; a step costs a gradient climb over the
whole data, against batch GEM's one per pass.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from ..models.base import ClosedFormEM, LatentModel, Params, Stats
from .base import BACKENDS, Backend, FitResult, Report, StepInfo, refuse_sequences
from .em import EM, EMOptions, EMRun, add_stats, data_constant, needs_closed_form, reg_covar
from .gem import GEMOptions, GradientMStep, check_gradient_em, m_step_kind
from .partial_em import CHUNK_ROWS, check_not_empty, e_step_rows, m_step_checked

__all__ = ["IncrementalEM", "IncrementalEMOptions"]


class IncrementalEMOptions(GEMOptions):
    blocks: int = Field(10, ge=1)  # fixed blocks; one M-step after each block's E-step
    max_epochs: int = Field(100, ge=1)  # passes over the data at most
    tol: float = Field(1e-6, ge=0)  # on the change of the per-point objective over one epoch
    # gmm only: added to covariance diagonals in each M-step (null: 1e-6); refused by other models
    reg_covar: float | None = Field(None, ge=0)


@BACKENDS.register("incremental_em")
class IncrementalEM(Backend[IncrementalEMOptions]):
    name = "incremental_em"
    options = IncrementalEMOptions

    def check(self, model: LatentModel, options: IncrementalEMOptions) -> None:
        refuse_sequences(model, self.name, "incremental EM's blocks of rows would cut the sequences")
        kind = m_step_kind(model, options)
        if kind == "closed_form":
            needs_closed_form(model, self.name)
        EM().check(model, EMOptions(m_step=kind))  # the posterior mode must exist, as for MAP-EM

    def total_steps(self, options: IncrementalEMOptions, n: int | None = None) -> int:
        return options.max_epochs * options.blocks

    def objective_is_target(self, options: IncrementalEMOptions) -> bool:
        return True  # the free energy (+ log prior): a lower bound of the target at each step's θ

    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: IncrementalEMOptions, report: Report
    ) -> FitResult:
        if m_step_kind(model, options) != "closed_form":
            return self._fit_gradient(model, x, init, options, report)
        assert isinstance(model, ClosedFormEM)
        n = x.shape[0]
        parts = x.tensor_split(min(options.blocks, n))
        params: Params = {name: value.to(x) for name, value in init.items()}
        center = model.em_center(x[:CHUNK_ROWS])
        regularization = reg_covar(model, options.reg_covar)
        constant = data_constant(model, x)  # Σ_n of the terms no statistic holds (a base measure)
        buffer = model.design_buffer(x, min(CHUNK_ROWS, n))
        run = EMRun(model, self.name, n, options.tol)
        clock = run.clock

        def objective(log_density: float) -> float:
            """Per point, with the log prior at the current θ as batch EM's objective."""
            return run.objective(log_density, params, step, aside=True)

        step = 0
        prepared = run.prepare(params, center, step)
        stats = [model.new_stats(x) for _ in parts]
        passes = [
            e_step_rows(model, rows, prepared, center, s, buffer)
            for rows, s in zip(parts, stats, strict=True)
        ]
        entropies = [p.entropy for p in passes]
        log_likelihood = math.fsum(p.log_likelihood for p in passes)
        total = _sum(model, stats)
        seconds = clock.seconds()
        with clock.aside():  # F(q, θ) = log p(x | θ) right after a full E-step, up to rounding
            bound = _free_energy(model, total, params, center) + math.fsum(entropies) + constant
        report(StepInfo(step, seconds, objective(bound), log_likelihood / n))
        run.settled(objective(log_likelihood))
        fix = "Lower model.k, set data.standardize: true, or use em, which re-seeds empty components."
        check_not_empty(model, total, step, fix)
        params = m_step_checked(model, run, total, center, regularization, step, params)
        prepared = run.prepare(params, center, step)
        converged = False
        for _ in range(options.max_epochs):
            for b, rows in enumerate(parts):
                step += 1
                fresh = model.new_stats(x)
                entropies[b] = e_step_rows(model, rows, prepared, center, fresh, buffer).entropy
                for name, mine in total.items():
                    mine.add_(fresh[name] - stats[b][name])
                stats[b] = fresh
                check_not_empty(model, total, step, fix)
                params = m_step_checked(model, run, total, center, regularization, step, params)
                prepared = run.prepare(params, center, step)
                seconds = clock.seconds()
                at_end = b == len(parts) - 1
                with clock.aside():
                    bound = _free_energy(model, total, params, center) + math.fsum(entropies) + constant
                    if at_end:
                        log_likelihood = e_step_rows(model, x, prepared, center, None, buffer).log_likelihood
                report(StepInfo(step, seconds, objective(bound), log_likelihood / n if at_end else None))
            if run.settled(objective(log_likelihood)):
                converged = True
                break
            total = _sum(model, stats)  # once per epoch, so that float32 rounding does not pile up
        return run.result(params, step, converged, epochs=step // len(parts))

    def _fit_gradient(
        self, model: LatentModel, x: Tensor, init: Params, options: IncrementalEMOptions, report: Report
    ) -> FitResult:
        """Incremental generalized EM: responsibilities kept per block, gradient M-steps."""
        kind = m_step_kind(model, options)
        climb = GradientMStep(model, x, check_gradient_em(model, self.name, kind), options, kind == "ecm")
        n = x.shape[0]
        blocks = [
            (int(part[0]), int(part[-1]) + 1) for part in torch.arange(n).tensor_split(min(options.blocks, n))
        ]
        params: Params = {name: value.to(x) for name, value in init.items()}
        run = EMRun(model, self.name, n, options.tol)
        clock = run.clock

        def e_step(rows: Tensor) -> tuple[Tensor, float, float]:
            """Responsibilities, their summed entropy and the summed log-likelihood of rows at θ."""
            with torch.no_grad():
                try:
                    log_joint = model.log_joint(rows, params)
                except torch.linalg.LinAlgError:
                    raise run.singular(step, params) from None
                log_norm = torch.logsumexp(log_joint, dim=1, keepdim=True)
                log_resp = log_joint - log_norm
                resp = torch.exp(log_resp)
                entropy = -float((resp * log_resp).nan_to_num().sum(dtype=torch.float64))
            return resp, entropy, float(log_norm.sum(dtype=torch.float64))

        step = 0
        resp = x.new_empty(n, model.k)
        entropies, log_likelihood = [0.0] * len(blocks), 0.0
        for b, (start, stop) in enumerate(blocks):
            resp[start:stop], entropies[b], block_log_likelihood = e_step(x[start:stop])
            log_likelihood += block_log_likelihood
        # right after a full E-step the free energy is the log-likelihood
        first = run.objective(log_likelihood, params, step, aside=True)
        report(StepInfo(step, clock.seconds(), first, log_likelihood / n))
        run.settled(first)
        rejected = 0
        params, rose = climb(params, resp)
        rejected += not rose
        converged = False
        for _ in range(options.max_epochs):
            for b, (start, stop) in enumerate(blocks):
                step += 1
                resp[start:stop], entropies[b], _ = e_step(x[start:stop])
                params, rose = climb(params, resp)
                rejected += not rose
                seconds = clock.seconds()
                at_end = b == len(blocks) - 1
                with clock.aside(), torch.no_grad():
                    log_joint = model.log_joint(x, params)
                    bound = float((resp * log_joint).sum(dtype=torch.float64)) + math.fsum(entropies)
                    if at_end:
                        log_likelihood = float(torch.logsumexp(log_joint, dim=1).sum(dtype=torch.float64))
                objective = run.objective(bound, params, step, aside=True)
                report(StepInfo(step, seconds, objective, log_likelihood / n if at_end else None))
            if run.settled(run.objective(log_likelihood, params, step, aside=True)):
                converged = True
                break
        return run.result(
            params, step, converged, epochs=step // len(blocks), m_step=kind, m_steps_rejected=rejected
        )


def _free_energy(model: ClosedFormEM, total: Stats, params: Params, center: Tensor | None) -> float:
    """Σ_n Σ_k r_nk log p(x_n, z_n = k | θ), evaluated in float64 so that a float32 fit's bound
    shows its progress rather than rounding noise (cheap: statistics and θ only)."""
    exact = {name: value.double() for name, value in params.items()}
    stats = {name: value.double() for name, value in total.items()}
    center = None if center is None else center.double()
    return float(model.expected_log_joint(stats, model.prepare(exact, center)))


def _sum(model: ClosedFormEM, stats: list[Stats]) -> Stats:
    """The blocks' statistics added up, in new tensors."""
    total = {name: value.clone() for name, value in stats[0].items()}
    for block in stats[1:]:
        add_stats(total, block)
    return total
