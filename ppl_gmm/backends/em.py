"""Exact EM for mixtures: log-space E-step from the model's log-joint, closed-form M-step; for a
model without one (or with ``m_step: gradient``), generalized EM (``gem.py``).

With a conjugate prior the M-step is the posterior mode (MAP-EM) and the objective is the
log posterior per point. Stops as scikit-learn does: the objective changed by less than ``tol``.

Without a prior, a component whose responsibilities sum to (nearly) nothing has no M-step
estimate (0 / 0); EM re-seeds it (``GaussianMixture.reseed``: at the point the other components
explain worst) and reports each re-seed's step in the result's ``reseed_steps``. The objective
never decreases, except at those steps: a re-seed trades some of the objective for a component
that can be fitted. A component that empties again after ``MAX_RESEEDS`` re-seeds fails the fit
with a ``FitError``. With a prior, an empty component keeps the prior's estimate (MAP-EM's mode).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple, cast

import torch
from pydantic import Field
from torch import Tensor

from .. import distributed
from ..errors import UserError
from ..models.base import ClosedFormEM, LatentModel, Params, Stats
from .base import BACKENDS, Backend, Clock, FitError, FitResult, Report, StepInfo
from .baum_welch import SequentialEM, baum_welch
from .gem import GEMOptions, check_gradient_em, fit_gradient, m_step_kind

__all__ = [
    "EM",
    "EMOptions",
    "EMRun",
    "MAX_RESEEDS",
    "PartialEStep",
    "add_stats",
    "data_constant",
    "e_step",
    "e_step_blocks",
    "empty_components",
    "fixes",
    "needs_closed_form",
    "reg_covar",
    "not_positive_definite",
]


class EMOptions(GEMOptions):
    max_iter: int = Field(500, ge=0)  # M-steps at most
    tol: float = Field(1e-6, ge=0)  # on the change of the mean per-point objective
    # gmm only: added to covariance diagonals in each M-step (null: 1e-6); refused by other models
    reg_covar: float | None = Field(None, ge=0)
    # rows per block, memory O(block_rows × K × D); default: see block_rows_for
    block_rows: int | None = Field(None, ge=1, le=2**31)
    # worker threads over row blocks (CPU); default: torch's thread count, which the config's
    # top-level `threads` sets
    threads: int | None = Field(None, ge=1)


BLOCK_BYTES = 6 * 2**20  # a block's design and log-joint (see block_rows_for)
BLOCK_WORK = 12 * 2**20  # multiply-adds of a block's log-joint GEMM (see block_rows_for)
MAX_RESEEDS = 3  # per component; one that keeps emptying means the data support fewer components


def block_rows_for(model: ClosedFormEM, x: Tensor) -> int:
    """Rows per block: the largest power of two in [1024, 65536] whose design and log-joint take
    at most ``BLOCK_BYTES`` and whose log-joint GEMM (design rows × K per point) at most
    ``BLOCK_WORK`` multiply-adds.

    A block pays ~20 calls into torch whatever its size (~0.07 ms on one lane, several times that
    with two lanes queueing for the interpreter), so blocks should be large; but the design is
    read three times, so it should stay near the cache. The work bound keeps float32 from taking
    twice float64's rows where the GEMMs are wide. Measured (``python -m benchmarks.block_rows
    --blocks 2048 4096 8192 16384 32768``: torch 2.13, MKL, two lanes, a 2-vCPU AMD EPYC with
    512 KB of L2 per core, before a block's calls into torch were cut from ~45 to ~20; ms per
    iteration at those sizes, the pick in brackets): N = 1M, D = K = 16 full float64 284 / [268] /
    339 / 394 / 408, float32 179 / [141] / 155 / 189 / 217; diag float64 133 / 106 / [96] / 101 /
    120, float32 105 / 62 / 53 / [53] / 49; N = 100k, D = K = 8 full float64 15.6 / 10.9 / [9.3] /
    9.2 / 12.3, float32 14.4 / 9.5 / 7.0 / [5.6] / 5.8; diag float64 11.8 / 7.6 / 6.4 / [5.6] /
    5.8, float32 11.1 / 6.7 / 4.2 / 3.6 / [3.4]. On the Intel machine of the README's earlier
    runs, where 4096-16384 were measured, each pick in that range was within 5% of the best."""
    per_row = (model.design_rows() + model.k) * x.element_size()
    work = model.design_rows() * model.k
    rows = 1024
    while rows < 65536 and 2 * rows * per_row <= BLOCK_BYTES and 2 * rows * work <= BLOCK_WORK:
        rows *= 2
    return rows


def reg_covar(model: LatentModel, value: float | None) -> float:
    """The reg_covar an M-step of ``model`` uses for the option's ``value`` (unset: the model's
    default; models without covariances take none)."""
    return value if value is not None else model.backend_fields.get("reg_covar", 0.0)


def needs_closed_form(model: LatentModel, backend: str) -> ClosedFormEM:
    """``model`` as a ``ClosedFormEM``, or the ``UserError`` of a backend that needs one."""
    if not isinstance(model, ClosedFormEM):
        raise UserError(
            f"backends.{backend}: expected a model with a closed-form EM, but model {model.name!r} has "
            "none. Use the map, svi or mcmc backend, which need only the Pyro declaration."
        )
    return model


def add_stats(stats: Stats, other: Stats) -> None:
    """Add the statistics ``other`` to ``stats`` in place."""
    for name, value in stats.items():
        value.add_(other[name])


def data_constant(model: ClosedFormEM, x: Tensor, rows: int = 65536) -> float:
    """Σ_n of the model's ``point_constant`` over x (N, D), in float64, a block of rows at a
    time: what log-likelihoods add to the E-step's sums (0 for most models)."""
    total = 0.0
    for block in x.split(rows):
        constant = model.point_constant(block)
        if constant is None:
            return 0.0
        total += float(constant.sum(dtype=torch.float64))
    return total


def e_step(model: LatentModel, x: Tensor, params: Params) -> tuple[Tensor, Tensor]:
    """log p(x_n | θ) (N,) and log responsibilities log p(z_n = k | x_n, θ) (N, K)."""
    log_joint = model.log_joint(x, params)
    log_norm = torch.logsumexp(log_joint, dim=1)
    return log_norm, log_joint - log_norm[:, None]


def empty_components(mass: Tensor) -> list[int]:
    """The components whose responsibility mass (K,), in points, is below 1000 times the M-step's
    guard against division by zero (10 eps: 2e-12 points in float64, 1.2e-3 in float32); below it
    their estimates are mostly the guard's doing, or rounding noise."""
    return torch.nonzero(mass < 1e4 * torch.finfo(mass.dtype).eps).flatten().tolist()


class EMRun:
    """What the loops of em, online_em and incremental_em share, as scikit-learn's mixture base
    owns its loop's bookkeeping: one clock, the objective per point (the log-likelihood plus the
    log prior over N) checked to be finite, the stopping rule on its change, the wording of
    failures, and the result."""

    def __init__(self, model: LatentModel, backend: str, n: int, tol: float = 0.0) -> None:
        self.model, self.backend, self.n, self.tol = model, backend, n, tol
        self.clock = Clock()
        self.previous: float | None = None

    def prepare(self, params: Params, center: Tensor | None, step: int) -> Any:
        """``model.prepare``, with a singular covariance reported as a ``FitError`` at ``step``."""
        assert isinstance(self.model, ClosedFormEM)
        try:
            return self.model.prepare(params, center)
        except torch.linalg.LinAlgError:
            raise self.singular(step, params) from None

    def singular(self, step: int, params: Params) -> FitError:
        return not_positive_definite(step, self.backend, next(iter(params.values())).dtype)

    def objective(
        self, log_likelihood: float, params: Params, step: int, points: int | None = None, aside: bool = False
    ) -> float:
        """``log_likelihood`` summed over ``points`` (default: all N), per point, plus log p(θ) / N
        (computed aside from the clock with ``aside``); a ``FitError`` at ``step`` unless finite."""
        prior = 0.0
        if self.model.has_prior:
            with self.clock.aside() if aside else nullcontext():
                try:
                    prior = float(self.model.log_prior(params))
                except (torch.linalg.LinAlgError, ValueError):  # a precision outside the prior's support
                    raise self.singular(step, params) from None
        value = log_likelihood / (points or self.n) + prior / self.n
        if not math.isfinite(value):
            raise FitError(f"step {step}: the objective is {value}. {fixes(self.model, self.backend)}")
        return value

    def settled(self, objective: float) -> bool:
        """Whether ``objective`` moved by less than ``tol`` since the last one (which it becomes)."""
        done = self.previous is not None and abs(objective - self.previous) < self.tol
        self.previous = objective
        return done

    def result(self, params: Params, n_steps: int, converged: bool, **extras: Any) -> FitResult:
        return FitResult(
            params=params,
            n_steps=n_steps,
            converged=converged,
            fit_seconds=self.clock.seconds(),
            point_estimate="map" if self.model.has_prior else "mle",
            extras=extras,
        )


@BACKENDS.register("em")
class EM(Backend[EMOptions]):
    name = "em"
    options = EMOptions

    def check(self, model: LatentModel, options: EMOptions) -> None:
        if distributed.sharded() and (model.sequential or m_step_kind(model, options) != "closed_form"):
            raise UserError(
                f"backends.{self.name}: a sharded run ({distributed.world().size} ranks) needs the "
                f"closed-form EM of a mixture, but model {model.name!r} is fitted by "
                f"{'Baum–Welch' if model.sequential else 'generalized EM'} here. Run it in one process."
            )
        if model.sequential:
            if options.m_step not in (None, "closed_form"):
                raise UserError(
                    f"backends.{self.name}.m_step: model {model.name!r} is fitted by Baum–Welch, its "
                    f"closed-form EM; found m_step: {options.m_step}. Leave m_step unset."
                )
            model.check_mode("MAP-EM")
            return
        kind = m_step_kind(model, options)
        if kind != "closed_form":
            check_gradient_em(model, self.name, kind)  # reg_covar (gmm) is the closed form's alone: unused
            model.check_mode("MAP-EM")
            return
        if not isinstance(model, ClosedFormEM):
            raise UserError(
                f"backends.{self.name}.m_step: closed_form needs a model with a closed-form M-step, but "
                f"model {model.name!r} has none. Set m_step: gradient (generalized EM), or leave it unset."
            )
        model.check_em("MAP-EM")

    def total_steps(self, options: EMOptions, n: int | None = None) -> int:
        return options.max_iter

    def objective_is_target(self, options: EMOptions) -> bool:
        return True  # the exact log-likelihood (+ log prior) per point of each step's θ

    def fit(
        self, model: LatentModel, x: Tensor, init: Params, options: EMOptions, report: Report
    ) -> FitResult:
        if model.sequential:
            run = EMRun(model, self.name, x.shape[0], options.tol)
            return baum_welch(
                cast(SequentialEM, model),
                x,
                init,
                options.max_iter,
                reg_covar(model, options.reg_covar),
                run,
                report,
            )
        if m_step_kind(model, options) != "closed_form":
            run = EMRun(model, self.name, x.shape[0], options.tol)
            return fit_gradient(model, x, init, options, options.max_iter, run, report)
        assert isinstance(model, ClosedFormEM)
        # a sharded run: x is this rank's rows; the sums over rows are all-reduced, so every rank
        # takes the same M-steps, measured from rank 0's center
        sharded = distributed.sharded()
        n = x.shape[0]
        params: Params = {name: value.to(x) for name, value in init.items()}
        threads = options.threads or torch.get_num_threads()
        block_rows = options.block_rows or block_rows_for(model, x)
        center = model.em_center(x[:block_rows])
        constant = data_constant(model, x)  # the part of log p(x | θ) that θ does not move
        if sharded:
            center = None if center is None else distributed.broadcast_tensor(center)
            rows, constant = distributed.all_sum(values=[n, constant])
            n = int(rows)
        run = EMRun(model, self.name, n, options.tol)
        converged = False
        reseeds = [0] * model.k  # per component
        reseed_steps: list[int] = []  # the step of each re-seed: its parameters are the first to have it
        step = 0
        # with lanes, everything between passes (θ's constants, the M-step) runs single-threaded
        # too: torch's idle kernel threads would otherwise spin for a while after each of its
        # small parallel kernels, and take the lanes' cores
        lanes = _lanes(x, block_rows, threads)
        try:
            with _kernel_threads(1) if lanes > 1 else nullcontext():
                for step in range(options.max_iter + 1):
                    try:
                        total, stats = _e_pass(model, x, params, center, block_rows, threads)
                    except torch.linalg.LinAlgError:
                        raise run.singular(step, params) from None
                    if sharded:
                        (total,) = distributed.all_sum(list(stats.values()), [total])
                    objective = run.objective(total + constant, params, step)
                    report(StepInfo(step, run.clock.seconds(), objective, (total + constant) / n))
                    if run.settled(objective):
                        converged = True
                        break
                    if step == options.max_iter:
                        break
                    try:
                        params = model.m_step_stats(stats, center, reg_covar(model, options.reg_covar))
                    except torch.linalg.LinAlgError:
                        raise run.singular(step + 1, params) from None
                    # with a prior the M-step is the posterior mode, which the prior alone defines for a
                    # component without points: a surplus component may empty out, as in VB
                    empty = [] if model.has_prior else empty_components(model.component_mass(stats))
                    if empty and sharded:
                        raise FitError(
                            f"step {step}: component {empty[0]} lost all its points; re-seeding it is "
                            "not sharded. Lower model.k, or run in one process."
                        )
                    if empty:
                        for component in empty:
                            reseeds[component] += 1
                            if reseeds[component] > MAX_RESEEDS:
                                raise FitError(
                                    f"step {step}: component {component} lost all its points again after "
                                    f"{MAX_RESEEDS} re-seeds: the data do not support model.k={model.k} "
                                    f"components. Lower model.k. {fixes(model, self.name)}"
                                )
                        try:
                            params = model.reseed(params, empty, x)
                        except torch.linalg.LinAlgError:
                            raise run.singular(step, params) from None
                        reseed_steps += [step + 1] * len(empty)
                        run.previous = None  # a re-seed may lower the objective; that step cannot be the last
        finally:
            _close_pools()  # no worker threads outlive the fit
        return run.result(params, step, converged, reseeds=len(reseed_steps), reseed_steps=reseed_steps)


def _e_pass(
    model: ClosedFormEM, x: Tensor, params: Params, center: Tensor | None, block_rows: int, threads: int = 1
) -> tuple[float, Stats]:
    """One pass over row blocks: the summed log-likelihood at θ and the M-step's statistics.

    With ``threads`` > 1 (CPU), lane i of ``threads`` worker threads takes blocks i, i + threads,
    ..., with single-threaded kernels and its own buffers and statistics; the lanes' results are
    added in lane order, so a pass is deterministic for a given thread count. On this problem's
    GEMM shapes (K outputs) lanes scale better than the kernels' own threads."""
    prepared = model.prepare(params, center)
    n = x.shape[0]
    lanes = _lanes(x, block_rows, threads)
    block_rows = lane_block_rows(n, block_rows, lanes)
    blocks = x.split(block_rows)
    if lanes <= 1:
        return _e_lane(model, blocks, prepared, center, None)
    stop = threading.Event()
    with _kernel_threads(1):
        futures = [
            _pool(lanes).submit(_e_lane, model, blocks[lane::lanes], prepared, center, stop)
            for lane in range(lanes)
        ]
        try:
            parts = [future.result() for future in futures]
        except BaseException:
            stop.set()  # e.g. Ctrl-C: the lanes stop at their next block
            raise
    total, stats = parts[0]
    for more, theirs in parts[1:]:
        total += more
        add_stats(stats, theirs)
    return total, stats


def _e_lane(
    model: ClosedFormEM,
    blocks: Sequence[Tensor],
    prepared: Any,
    center: Tensor | None,
    stop: threading.Event | None,
) -> tuple[float, Stats]:
    """The E-step and statistics of some row blocks (see ``_e_pass``)."""
    stats = model.new_stats(blocks[0])
    return e_step_blocks(model, blocks, prepared, center, stats, stop=stop).log_likelihood, stats


class PartialEStep(NamedTuple):
    """Sums over the rows of one E-step at θ: Σ_n log p(x_n | θ) and, when asked for, the
    entropy Σ_n H(p(z_n | x_n, θ)) of the responsibilities."""

    log_likelihood: float
    entropy: float


def e_step_blocks(
    model: ClosedFormEM,
    blocks: Sequence[Tensor],
    prepared: Any,
    center: Tensor | None,
    stats: Stats | None = None,
    buffer: Any = None,
    stop: threading.Event | None = None,
    entropy: bool = False,
) -> PartialEStep:
    """The E-step of row blocks (B, D) at the θ of ``prepared``, the widest block first: the one
    E-step of every EM backend.

    Adds the blocks' statistics to ``stats`` when given; writes the designs into ``buffer``
    (``design_buffer`` for the widest block) when given; stops early when ``stop`` is set. The
    log-sum-exp and the responsibilities share one exponential, floored at the smallest normal
    number: subnormal results are ~40× slower on CPUs and weigh nothing. Responsibilities are
    normalized by multiplying with the reciprocal of their sum: a broadcast division ran 2-8×
    slower (float32 worst). With s_k = log p(x, k) - max_j log p(x, j) and r = softmax(s), the
    entropy is -Σ_k r_k log r_k = log Σ_k e^{s_k} - Σ_k r_k s_k."""
    like = blocks[0]
    if buffer is None:
        buffer = model.design_buffer(like, like.shape[0])
    joint_buffer = like.new_empty(model.k * like.shape[0])
    joints: dict[int, Tensor] = {}  # the (K, B) view of joint_buffer for each block size B
    floor = math.log(torch.finfo(like.dtype).tiny) + 1.0
    total = like.new_zeros((), dtype=torch.float64)
    spread = like.new_zeros((), dtype=torch.float64)
    for rows in blocks:
        if stop is not None and stop.is_set():
            break
        design = model.design(rows, center, buffer)
        log_joint = joints.get(rows.shape[0])
        if log_joint is None:
            log_joint = joints[rows.shape[0]] = joint_buffer[: model.k * rows.shape[0]].view(model.k, -1)
        model.block_log_joint(design, prepared, log_joint)
        peak = log_joint.amax(0)
        shifted = log_joint.sub_(peak).clamp_(min=floor)
        resp = shifted.exp() if entropy else shifted.exp_()
        norm = resp.sum(0)
        log_norm = norm.log()
        total += (peak + log_norm).sum()
        resp.mul_(norm.reciprocal())
        if entropy:
            spread += log_norm.sum() - torch.dot(resp.view(-1), shifted.view(-1))
        if stats is not None:
            model.accumulate(stats, design, resp)
    return PartialEStep(float(total), float(spread))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _lanes(x: Tensor, block_rows: int, threads: int) -> int:
    """How many worker threads a pass over x takes (CPU only; at most one per block)."""
    return min(threads, math.ceil(x.shape[0] / block_rows)) if x.device.type == "cpu" else 1


def lane_block_rows(n: int, block_rows: int, lanes: int) -> int:
    """The rows per block a pass over n rows uses: with several lanes, blocks of equal size, a
    whole number per lane, so that no lane waits for another."""
    if lanes <= 1:
        return block_rows
    return math.ceil(n / (lanes * math.ceil(n / (lanes * block_rows))))


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="ppl-gmm-em")
    return _POOLS[workers]


def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].shutdown(wait=True)


@contextmanager
def _kernel_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for a while. A worker thread takes the setting
    in force at its first torch call and keeps it."""
    before = torch.get_num_threads()
    if before != count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if before != count:
            torch.set_num_threads(before)


def fixes(model: LatentModel, backend: str) -> str:
    """What to change when a fit of ``model`` goes non-finite."""
    if "reg_covar" in model.backend_fields:
        return f"Increase backends.{backend}.reg_covar or set data.standardize: true."
    return "Lower model.k, or start elsewhere (init.method, seed)."


def not_positive_definite(step: int, backend: str, dtype: torch.dtype) -> FitError:
    """The failure of an EM-family backend whose M-step left a covariance that is not positive
    definite, with the fixes that apply in ``dtype``."""
    wider = ", lower model.k, or use dtype: float64" if dtype != torch.float64 else ", or lower model.k"
    return FitError(
        f"step {step}: a covariance matrix is not positive definite. Increase "
        f"backends.{backend}.reg_covar, set data.standardize: true{wider}."
    )
