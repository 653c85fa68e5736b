"""Online EM (Cappé & Moulines 2009): stochastic approximation of the sufficient statistics.

Each mini-batch of B of the N points gets an exact E-step at the current θ; running statistics
move towards the batch's, scaled to the whole data set, by a decreasing step size:

    s ← (1 - γ_t) s + γ_t (N / B) stats(batch_t),   γ_t = (t + t0)^-κ,   κ ∈ (0.5, 1],

and θ = m_step(s) after every batch (MAP with a conjugate prior: the N / B scaling keeps the
prior's weight that of the full data). γ_1 = 1: the first statistics are the initial parameters'
on the first batch. There is no stopping rule: the fit runs its ``epochs`` and reports converged.

A model without a closed-form M-step has no statistics to average. For it (or with ``m_step:
gradient``) each mini-batch's exact E-step is followed by ``m_step_iters`` Adam steps on the
batch's Q(θ) = (N / B) Σ_n Σ_k r_nk log p(x_n, z_n = k | θ) (+ log p(θ)), in unconstrained
coordinates, with the learning rate ``m_step_lr`` · γ_t: stochastic gradient EM, in the spirit of
Titterington's (1984) recursive EM (the batch's ∇Q at θ is an unbiased estimate of the
log-likelihood's gradient, Fisher's identity), with one Adam state across batches.

A sharded run (``distributed``) splits each mini-batch over the R ranks: for batch t = 1, 2, ...
rank r takes rows ⌊n_r (t - 1) B / N⌋ to ⌊n_r t B / N⌋ of its n_r (about B / R; in one process,
rows (t - 1) B to t B), E-steps them, and the ranks all-reduce the batch's statistics,
log-likelihood and rows before the update: every rank makes the same M-steps, ⌈N / B⌉ per epoch,
on batches of B rows or up to R - 1 fewer. The gradient M-step is data-parallel SGD: each rank
differentiates (N / B) Σ_{its rows} Σ_k r_nk log p(x_n, z_n = k | θ) (rank 0 adds log p(θ)), one
all-reduce per Adam step sums the gradients, and every rank takes the same Adam step. Shuffled,
each rank permutes its own rows each epoch, seeded by rank 0's draw plus its rank: a batch draws
from every shard in proportion to its rows, never across shards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .. import distributed
from ..errors import UserError
from ..models.base import ClosedFormEM, LatentModel, Params
from .base import BACKENDS, Backend, FitResult, Options, Report, StepInfo, refuse_sequences
from .em import EM, EMOptions, EMRun, needs_closed_form, reg_covar
from .gem import check_gradient_em
from .partial_em import (
    CHUNK_ROWS,
    check_not_empty,
    combine,
    e_step_rows,
    m_step_checked,
)

__all__ = ["OnlineEM", "OnlineEMOptions", "step_size"]


class OnlineEMOptions(Options):
    batch_size: int = Field(4096, ge=1)  # points per mini-batch; one M-step after each
    epochs: int = Field(1, ge=1)  # passes over the data; one already gets most of the way
    # κ: Σ γ_t = ∞ and Σ γ_t² < ∞ need (0.5, 1]; 0.7 came closest to batch EM in one pass at 2M and
    # 10M points, D = K = 16 (0.6 forgets too fast; 0.9 keeps the early, poor statistics too long)
    step_power: float = Field(0.7, gt=0.5, le=1.0)
    step_offset: float = Field(2.0, ge=0)  # t0: damps the first steps after the warm start
    # gmm only: added to covariance diagonals in each M-step (null: 1e-6); refused by other models
    reg_covar: float | None = Field(None, ge=0)
    shuffle: bool = True  # a fresh random order each epoch (False: rows in file order)
    eval_every: int = Field(50, ge=1)  # exact train log-likelihood every so many mini-batches
    # closed_form: running statistics (Cappé & Moulines); gradient: stochastic gradient EM (the only
    # one for a model without a closed form); null: closed_form where the model has one
    m_step: Literal["closed_form", "gradient"] | None = None
    m_step_iters: int = Field(1, ge=1, le=10_000)  # gradient: Adam steps per mini-batch
    m_step_lr: float = Field(0.2, gt=0)  # gradient: Adam's learning rate at γ_t = 1


def step_size(t: int, power: float, offset: float) -> float:
    """γ_t for mini-batch t = 1, 2, ...: 1 for the first (a warm start), then (t + t0)^-κ."""
    return 1.0 if t == 1 else (t + offset) ** -power


@BACKENDS.register("online_em")
class OnlineEM(Backend[OnlineEMOptions]):
    name = "online_em"
    options = OnlineEMOptions

    def check(self, model: LatentModel, options: OnlineEMOptions) -> None:
        refuse_sequences(model, self.name, "online EM's mini-batches of rows would cut the sequences")
        kind = _m_step_kind(model, options)
        if distributed.sharded():
            _check_sharded(self.name, options)
        # the posterior mode must exist, as for MAP-EM
        if kind == "closed_form":
            needs_closed_form(model, self.name)
            EM().check(model, EMOptions(m_step=kind))
        else:
            check_gradient_em(model, self.name)
            model.check_mode("MAP-EM")  # em's check of generalized EM, which refuses sharded runs

    def total_steps(self, options: OnlineEMOptions, n: int | None = None) -> int | None:
        """Mini-batches over all epochs; unknown without the number of train points ``n``."""
        return None if n is None else options.epochs * math.ceil(n / min(options.batch_size, n))

    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: OnlineEMOptions, report: Report
    ) -> FitResult:
        if _m_step_kind(model, options) == "gradient":
            return self._fit_gradient(model, x, init, options, report)
        assert isinstance(model, ClosedFormEM)
        sharded = distributed.sharded()
        n = x.shape[0]  # a sharded run: this rank's rows, and n_all the train split's
        n_all = int(distributed.all_sum(values=[n])[0]) if sharded else n
        size = min(options.batch_size, n_all)
        last = options.epochs * math.ceil(n_all / size)
        params: Params = {name: value.to(x) for name, value in init.items()}
        center = model.em_center(x[:size])
        if sharded and center is not None:
            center = distributed.broadcast_tensor(center)  # statistics measured from one center
        regularization = reg_covar(model, options.reg_covar)
        buffer = model.design_buffer(x, min(CHUNK_ROWS, n))
        stats = None
        run = EMRun(model, self.name, n_all)
        step = 0
        for step, rows in _batches(x, n_all, options):
            prepared = run.prepare(params, center, step)
            batch = model.new_stats(x)
            seen = e_step_rows(model, rows, prepared, center, batch, buffer)
            log_likelihood, points = seen.log_likelihood, rows.shape[0]
            if sharded:
                log_likelihood, total = distributed.all_sum(list(batch.values()), [log_likelihood, points])
                points = int(total)
            gamma = step_size(step, options.step_power, options.step_offset)
            stats = combine(batch if stats is None else stats, batch, 1.0 - gamma, gamma * n_all / points)
            check_not_empty(
                model,
                stats,
                step,
                f"Increase backends.{self.name}.batch_size, lower model.k, or use the em backend, "
                "which re-seeds empty components.",
            )
            objective = run.objective(log_likelihood, params, step, points, aside=True)
            params = m_step_checked(model, run, stats, center, regularization, step, params)
            seconds = run.clock.seconds()
            train_log_likelihood = None
            if step % options.eval_every == 0 or step == last:
                with run.clock.aside():
                    done = run.prepare(params, center, step)
                    total = e_step_rows(model, x, done, center, None, buffer).log_likelihood
                    if sharded:
                        (total,) = distributed.all_sum(values=[total])
                    train_log_likelihood = total / n_all
            report(StepInfo(step, seconds, objective, train_log_likelihood))
        return run.result(params, step, converged=True)

    def _fit_gradient(
        self, model: LatentModel, x: Tensor, init: Params, options: OnlineEMOptions, report: Report
    ) -> FitResult:
        """Stochastic gradient EM: an exact E-step per mini-batch, then Adam steps on its Q (in a
        sharded run, on this rank's rows, with Q's gradient all-reduced before every step)."""
        transforms = check_gradient_em(model, self.name)
        sharded = distributed.sharded()
        n = x.shape[0]  # a sharded run: this rank's rows, and n_all the train split's
        n_all = int(distributed.all_sum(values=[n])[0]) if sharded else n
        last = options.epochs * math.ceil(n_all / min(options.batch_size, n_all))
        sites = model.to_sites({name: value.to(x) for name, value in init.items()})
        names = list(sites)
        free = [transforms[name].inv(sites[name]).detach().clone().requires_grad_(True) for name in names]
        optimizer = torch.optim.Adam(free, lr=options.m_step_lr)
        run = EMRun(model, self.name, n_all)
        with_prior = model.has_prior and distributed.world().rank == 0  # log p(θ) once, not per rank

        def theta() -> Params:
            return model.from_sites({name: transforms[name](u) for name, u in zip(names, free, strict=True)})

        def current() -> Params:
            """θ now, apart from the optimizer's variables."""
            with torch.no_grad():
                return {name: value.detach().clone() for name, value in theta().items()}

        def log_joint(rows: Tensor, params: Params) -> Tensor:
            try:
                return model.log_joint(rows, params)
            except torch.linalg.LinAlgError:
                raise run.singular(step, params) from None

        params = current()
        step = 0
        for step, rows in _batches(x, n_all, options):
            with torch.no_grad():
                joint = log_joint(rows, params)
                log_norm = torch.logsumexp(joint, dim=1, keepdim=True)
                resp = torch.exp(joint - log_norm)
            log_likelihood, points = float(log_norm.sum(dtype=torch.float64)), rows.shape[0]
            if sharded:
                log_likelihood, total = distributed.all_sum(values=[log_likelihood, points])
                points = int(total)
            objective = run.objective(log_likelihood, params, step, points, aside=True)
            gamma = step_size(step, options.step_power, options.step_offset)
            for group in optimizer.param_groups:
                group["lr"] = options.m_step_lr * gamma
            for _ in range(options.m_step_iters):
                optimizer.zero_grad()
                moving = theta()
                # a rank's share may be empty: the log-joint of no rows has NaN gradients
                q = (n_all / points) * (resp * log_joint(rows, moving)).sum() if rows.shape[0] else None
                if with_prior:
                    prior = model.log_prior(moving)
                    q = prior if q is None else q + prior
                if q is not None:
                    (-q / n_all).backward()
                if sharded:
                    _all_sum_gradients(free)
                optimizer.step()
            params = current()
            seconds = run.clock.seconds()
            train_log_likelihood = None
            if step % options.eval_every == 0 or step == last:
                with run.clock.aside(), torch.no_grad():
                    total = float(model.log_likelihood(x, params).sum(dtype=torch.float64))
                    if sharded:
                        (total,) = distributed.all_sum(values=[total])
                    train_log_likelihood = total / n_all
            report(StepInfo(step, seconds, objective, train_log_likelihood))
        return run.result(params, step, converged=True, m_step="gradient")


def _all_sum_gradients(free: list[Tensor]) -> None:
    """Each variable's gradient summed over the ranks, in one all-reduce (zero where a rank had
    none: its share of the batch was empty)."""
    for u in free:
        if u.grad is None:
            u.grad = torch.zeros_like(u)
    distributed.all_sum([u.grad for u in free if u.grad is not None])


def _m_step_kind(model: LatentModel, options: OnlineEMOptions) -> Literal["closed_form", "gradient"]:
    if options.m_step is not None:
        return options.m_step
    return "closed_form" if isinstance(model, ClosedFormEM) else "gradient"


def _check_sharded(name: str, options: OnlineEMOptions) -> None:
    size = distributed.world().size
    if options.batch_size < size:
        raise UserError(
            f"backends.{name}.batch_size: expected at least one point per rank ({size}), but found "
            f"{options.batch_size}. Raise it, or use fewer ranks."
        )


def _batches(x: Tensor, n_all: int, options: OnlineEMOptions) -> Iterator[tuple[int, Tensor]]:
    """(t, rows) for mini-batches t = 1, 2, ... over ``epochs`` passes of ⌈N / B⌉ batches, N =
    ``n_all``: this rank's share of each (all rows in one process), in a fresh random order each
    epoch (drawn from torch's global generator, so that pyro.set_rng_seed fixes it; rank 0's seed
    plus the rank in a sharded run) or in file order."""
    n = x.shape[0]
    size = min(options.batch_size, n_all)
    seed = torch.randint(2**62, ())
    if distributed.sharded():
        seed = distributed.broadcast_tensor(seed) + distributed.world().rank
    generator = torch.Generator().manual_seed(int(seed))
    step = 0
    for _ in range(options.epochs):
        order = torch.randperm(n, generator=generator).to(x.device) if options.shuffle else None
        for start in range(0, n_all, size):
            step += 1
            # this rank's share of the batch's B rows; all B in one process (n = N)
            lo, hi = n * start // n_all, n * min(start + size, n_all) // n_all
            yield step, x[lo:hi] if order is None else x.index_select(0, order[lo:hi])
