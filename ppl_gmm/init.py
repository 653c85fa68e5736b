"""Initial parameters: k-means++ seeding and Lloyd's k-means in torch, random points, earlier runs,
or tensors given in a safetensors file.

Runs once per experiment; every backend starts from the same parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from . import distributed
from .config import InitConfig
from .errors import UserError
from .models.base import ClosedFormEM, LatentModel, Params
from .models.hmm import HiddenMarkovModel
from .runs import Files, best_backend_dir

INIT_M_STEP_ITERS = 100  # L-BFGS iterations of one gradient M-step of the seeding
INIT_M_STEP_ROUNDS = 10  # M-steps at most (ECM alternates its blocks between them)

__all__ = ["check_given", "initialize", "kmeans_plusplus", "lloyd", "load_given_params", "load_run_params"]


def _squared_distances(x: Tensor, centers: Tensor) -> Tensor:
    """||x_n - c_k||² for x (N, D), centers (K, D); returns (N, K), clamped at zero."""
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * x @ centers.T + (centers * centers).sum(1)
    return d2.clamp_min_(0.0)


def kmeans_plusplus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with 2 + ln k local trials per
    center as scikit-learn does). x: (N, D); returns the indices (k,) of the chosen points."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = _squared_distances(x, x[chosen]).squeeze(1)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:
            raise UserError(
                f"model.k: the data have fewer than {k} distinct points, so k-means++ cannot "
                "seed k distinct centers. Lower model.k."
            )
        draws = torch.rand(trials, generator=generator, dtype=x.dtype) * total
        candidates = torch.searchsorted(torch.cumsum(closest, 0), draws.to(x.device), right=True)
        candidates = candidates.clamp_max_(n - 1)
        candidate_closest = torch.minimum(closest, _squared_distances(x, x[candidates]).T)
        best = int(torch.argmin(candidate_closest.sum(1)))
        chosen.append(int(candidates[best]))
        closest = candidate_closest[best]
    return torch.tensor(chosen, dtype=torch.long)


def lloyd(x: Tensor, centers: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """Lloyd iterations until no label changes (or ``max_iter``). An empty cluster takes the
    point farthest from its center. Returns centers (K, D) and labels (N,)."""
    labels = torch.argmin(_squared_distances(x, centers), dim=1)
    for _ in range(max_iter):
        counts = torch.bincount(labels, minlength=centers.shape[0]).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        centers = sums / counts.clamp_min(1.0)[:, None]
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            far = torch.argmax(_squared_distances(x, centers).gather(1, labels[:, None]))
            centers[empty] = x[far]
            labels[far] = empty
        new_labels = torch.argmin(_squared_distances(x, centers), dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centers, labels


def _reg_covar(model: LatentModel, cfg: InitConfig) -> float:
    """init.reg_covar, or (unset) the model's default."""
    return cfg.reg_covar if cfg.reg_covar is not None else float(model.backend_fields.get("reg_covar", 0.0))


def _singular_cluster(cfg: InitConfig) -> UserError:
    return UserError(
        f"init.reg_covar: a cluster of init.method {cfg.method} has too few points for a "
        "covariance (it is singular without regularization). Raise init.reg_covar, e.g. 1e-6."
    )


def _m_step(
    model: LatentModel, x: Tensor, resp: Tensor, cfg: InitConfig, start: Params | None = None
) -> Params:
    """The maximum-likelihood θ for responsibilities resp (N, K) on x (N, D): the closed-form
    M-step, or for a model without one generalized EM's M-step (ECM's closed-form blocks, L-BFGS
    on the other sites) repeated from ``start`` (default: ``model.default_params()``) until Q stops
    rising."""
    if isinstance(model, ClosedFormEM | HiddenMarkovModel):  # a hidden Markov model: its emissions
        reg_covar = _reg_covar(model, cfg)
        try:
            return model.m_step(x, resp, reg_covar, use_prior=False)
        except torch.linalg.LinAlgError:
            raise _singular_cluster(cfg) from None
    from .backends.gem import GEMOptions, GradientMStep, MStepKind, check_gradient_em

    kind: MStepKind = "ecm" if model.closed_form_sites else "gradient"
    try:
        transforms = check_gradient_em(model, "em", kind)
    except UserError as exc:
        raise UserError(
            f"init.method: {cfg.method} fits model {model.name!r} to assignments by EM's M-step, which it "
            f"cannot have ({exc}). Use init.method: given or from_run."
        ) from None
    options = GEMOptions(m_step_iters=INIT_M_STEP_ITERS)
    climb = GradientMStep(model, x, transforms, options, closed_form=kind == "ecm")
    params = (
        start if start is not None else {name: value.to(x) for name, value in model.default_params().items()}
    )
    for _ in range(INIT_M_STEP_ROUNDS):
        params, rose = climb(params, resp)
        if not rose:
            break
    return params


def load_run_params(model: LatentModel, run: str) -> Params:
    """The parameters of an earlier backend directory, or of an experiment's best backend."""
    path = Path(run)
    if not path.exists():
        raise UserError(f"init.run: {path} does not exist.")
    if path.is_dir() and not (path / Files.PARAMS).is_file():
        found = best_backend_dir(path)
        if found is None:
            raise UserError(
                f"init.run: {path} holds no params.safetensors and no completed backend run. "
                "Name a backend directory such as runs/<experiment>/em."
            )
        path = found
    return _read_params(model, path / Files.PARAMS if path.is_dir() else path, "init.run")


def load_given_params(model: LatentModel, path: str) -> Params:
    """The parameters in the safetensors file ``path`` (``init.method: given``)."""
    file = Path(path)
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise UserError(f"init.path: {file} {what}; name a safetensors file with the model's tensors.")
    return _read_params(model, file, "init.path")


def _read_params(model: LatentModel, file: Path, field: str) -> Params:
    """The model's tensors in ``file``, checked: every tensor present, finite and of the model's
    shape; errors name ``field``, the file and the tensor."""
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{field}: cannot read {file} ({exc}).") from None
    return check_given(model, tensors, f"{field} ({file})")


def check_given(model: LatentModel, tensors: Params, where: str) -> Params:
    """Given parameters checked: every tensor of the model present, of its shape and finite
    (errors name ``where`` and the tensor); projected onto the model's parameter space."""
    params = model.check_params(tensors, where)
    for name, value in params.items():
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"{where}: tensor {name!r} has NaN or infinite values.")
    return params


def _stored_params(model: LatentModel, cfg: InitConfig) -> Params:
    """The parameters of ``init.method: from_run`` or ``given``."""
    if cfg.method == "from_run":
        if cfg.run is None:
            raise UserError("init.run: init.method is from_run, so init.run must name a run directory.")
        return load_run_params(model, cfg.run)
    if cfg.path is None:
        raise UserError(
            "init.path: init.method is given, so init.path must name a safetensors file "
            "with the model's tensors (e.g. an earlier run's params.safetensors)."
        )
    return load_given_params(model, cfg.path)


def initialize(model: LatentModel, x: Tensor, cfg: InitConfig, seed: int, restart: int = 0) -> Params:
    """Initial parameters for restart ``restart``: float64 tensors on x's device."""
    if cfg.method in ("from_run", "given"):
        return {name: value.to(x.device) for name, value in _stored_params(model, cfg).items()}
    state = np.random.SeedSequence([seed, 2, restart]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
    if distributed.sharded():
        return _initialize_shard(model, x, cfg, seed, restart, generator)
    if x.shape[0] > cfg.max_rows:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 3, restart]))
        keep = np.sort(rng.choice(x.shape[0], cfg.max_rows, replace=False))
        x = x[torch.from_numpy(keep).to(x.device)]
    x64 = x.to(torch.float64)
    if cfg.method == "random_from_data":
        index = torch.randperm(x64.shape[0], generator=generator)[: model.k].to(x.device)
        uniform = torch.full((x64.shape[0], model.k), 1.0 / model.k, dtype=x64.dtype, device=x.device)
        return model.init_from_points(x64, index, _m_step(model, x64, uniform, cfg))
    index = kmeans_plusplus(x64, model.k, generator).to(x.device)
    centers = x64[index].clone()
    if cfg.method == "kmeans":
        centers, labels = lloyd(x64, centers, cfg.kmeans_iter)
    else:
        labels = torch.argmin(_squared_distances(x64, centers), dim=1)
    resp = torch.nn.functional.one_hot(labels, model.k).to(x64.dtype)
    start = None
    if not isinstance(model, ClosedFormEM | HiddenMarkovModel):
        # the gradient M-step starts with each component at its seed
        defaults = {name: value.to(x64) for name, value in model.default_params().items()}
        start = model.init_from_points(x64, index, defaults)
    return _m_step(model, x64, resp, cfg, start)


# ---- sharded runs: x is this rank's rows; sums over rows are all-reduced (``distributed``) ----


def _offset(n_rows: int) -> tuple[int, int]:
    """All ranks' rows in all, and where this rank's n_rows start among them."""
    counts = distributed.row_counts(n_rows)
    return sum(counts), sum(counts[: distributed.world().rank])


def _rows_anywhere(x: Tensor, index: Sequence[int], start: int) -> Tensor:
    """Rows (I, D) by index into all ranks' rows, this rank's x (n_r, D) starting at ``start``:
    each row comes from its rank (the others add zeros), on every rank."""
    out = x.new_zeros((len(index), x.shape[1]))
    for i, row in enumerate(index):
        if start <= row < start + x.shape[0]:
            out[i] = x[row - start]
    distributed.all_sum([out])
    return out


def _initialize_shard(
    model: LatentModel, x: Tensor, cfg: InitConfig, seed: int, restart: int, generator: torch.Generator
) -> Params:
    """``initialize`` on this rank's rows x (n_r, D) of a sharded run: the same draws from the
    same generator, the same subsample of at most ``max_rows``, sums over rows all-reduced; so
    the result is one process's up to rounding."""
    assert isinstance(model, ClosedFormEM), "sharded runs need a closed-form EM (em.check refuses others)"
    n, start = _offset(x.shape[0])
    if n > cfg.max_rows:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 3, restart]))
        keep = np.sort(rng.choice(n, cfg.max_rows, replace=False))
        mine = keep[(keep >= start) & (keep < start + x.shape[0])] - start
        x = x[torch.from_numpy(mine).to(x.device)]
        n, start = _offset(x.shape[0])
    x64 = x.to(torch.float64)
    if cfg.method == "random_from_data":
        index = torch.randperm(n, generator=generator)[: model.k].tolist()
        uniform = torch.full((x64.shape[0], model.k), 1.0 / model.k, dtype=x64.dtype, device=x.device)
        points = _rows_anywhere(x64, index, start)
        chosen = torch.arange(model.k, device=x.device)
        return model.init_from_points(points, chosen, _m_step_shard(model, x64, uniform, cfg))
    centers = _kmeans_plusplus_shard(x64, model.k, generator, n, start)
    if cfg.method == "kmeans":
        centers, labels = _lloyd_shard(x64, centers, cfg.kmeans_iter)
    else:
        labels = torch.argmin(_squared_distances(x64, centers), dim=1)
    resp = torch.nn.functional.one_hot(labels, model.k).to(x64.dtype)
    return _m_step_shard(model, x64, resp, cfg)


def _kmeans_plusplus_shard(x: Tensor, k: int, generator: torch.Generator, n: int, start: int) -> Tensor:
    """``kmeans_plusplus`` over the rows of all ranks, this rank's x (n_r, D) starting at
    ``start`` of n: D² sampling picks the rank by the ranks' totals of D², then the row within
    it, with the shared generator; each trial's total over all rows decides. Returns the centers
    (k, D)."""
    rank = distributed.world().rank
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [_rows_anywhere(x, [first], start)[0]]
    closest = _squared_distances(x, centers[0][None]).squeeze(1)
    for _ in range(1, k):
        totals = distributed.gather_rows(closest.sum().reshape(1))
        total = totals.sum()
        if total <= 0:
            raise UserError(
                f"model.k: the data have fewer than {k} distinct points, so k-means++ cannot "
                "seed k distinct centers. Lower model.k."
            )
        draws = (torch.rand(trials, generator=generator, dtype=x.dtype) * total.cpu()).to(x.device)
        bounds = torch.cumsum(totals, 0)
        owners = torch.searchsorted(bounds, draws, right=True).clamp_max_(len(totals) - 1)
        candidates = x.new_zeros((trials, x.shape[1]))
        here = owners == rank
        if bool(here.any()):
            within = draws[here] - (bounds[rank] - totals[rank])
            local = torch.searchsorted(torch.cumsum(closest, 0), within, right=True).clamp_max_(
                x.shape[0] - 1
            )
            candidates[here] = x[local]
        distributed.all_sum([candidates])
        candidate_closest = torch.minimum(closest, _squared_distances(x, candidates).T)
        sums = candidate_closest.sum(1)
        distributed.all_sum([sums])
        best = int(torch.argmin(sums))
        centers.append(candidates[best])
        closest = candidate_closest[best]
    return torch.stack(centers)


def _lloyd_shard(x: Tensor, centers: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """``lloyd`` over the rows of all ranks (this rank's x (n_r, D)): counts and sums, and
    whether any label changed, all-reduced; an empty cluster takes the point farthest from its
    center on any rank (the lowest rank's on ties, as one process takes the first)."""
    labels = torch.argmin(_squared_distances(x, centers), dim=1)
    for _ in range(max_iter):
        counts = torch.bincount(labels, minlength=centers.shape[0]).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        distributed.all_sum([counts, sums])
        centers = sums / counts.clamp_min(1.0)[:, None]
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            gaps = _squared_distances(x, centers).gather(1, labels[:, None]).squeeze(1)
            far = int(torch.argmax(gaps)) if x.shape[0] else 0
            top = gaps[far].reshape(1) if x.shape[0] else x.new_full((1,), -math.inf)
            owner = int(torch.argmax(distributed.gather_rows(top)))
            centers[empty] = distributed.broadcast_tensor(x[far] if x.shape[0] else centers[empty], owner)
            if owner == distributed.world().rank:
                labels[far] = empty
        new_labels = torch.argmin(_squared_distances(x, centers), dim=1)
        (changed,) = distributed.all_sum(values=[float(not torch.equal(new_labels, labels))])
        if changed == 0:
            break
        labels = new_labels
    return centers, labels


M_STEP_ROWS = 4096  # rows per block of the seeding's statistics


def _m_step_shard(model: LatentModel, x: Tensor, resp: Tensor, cfg: InitConfig) -> Params:
    """``_m_step`` from statistics summed over all ranks' rows (this rank's x (n_r, D), resp
    (n_r, K)), about rank 0's center."""
    assert isinstance(model, ClosedFormEM)
    center = model.em_center(x[:M_STEP_ROWS])
    if center is not None:
        center = distributed.broadcast_tensor(center)
    stats = model.new_stats(x)
    for block, block_resp in zip(x.split(M_STEP_ROWS), resp.split(M_STEP_ROWS), strict=True):
        model.accumulate(stats, model.design(block, center), block_resp.T)
    distributed.all_sum(list(stats.values()))
    reg_covar = _reg_covar(model, cfg)
    try:
        return model.m_step_stats(stats, center, reg_covar, use_prior=False)
    except torch.linalg.LinAlgError:
        raise _singular_cluster(cfg) from None
