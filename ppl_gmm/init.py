"""Initial parameters: k-means++ seeding and Lloyd's k-means in torch, random points, earlier runs,
or tensors given in a safetensors file.

Runs once per experiment; every backend starts from the same parameters.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

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


def _m_step(
    model: LatentModel, x: Tensor, resp: Tensor, cfg: InitConfig, start: Params | None = None
) -> Params:
    """The maximum-likelihood θ for responsibilities resp (N, K) on x (N, D): the closed-form
    M-step, or for a model without one generalized EM's M-step (ECM's closed-form blocks, L-BFGS
    on the other sites) repeated from ``start`` (default: ``model.default_params()``) until Q stops
    rising."""
    if isinstance(model, ClosedFormEM | HiddenMarkovModel):  # a hidden Markov model: its emissions
        reg_covar = cfg.reg_covar if cfg.reg_covar is not None else model.backend_fields.get("reg_covar", 0.0)
        try:
            return model.m_step(x, resp, reg_covar, use_prior=False)
        except torch.linalg.LinAlgError:
            raise UserError(
                f"init.reg_covar: a cluster of init.method {cfg.method} has too few points for a "
                "covariance (it is singular without regularization). Raise init.reg_covar, e.g. 1e-6."
            ) from None
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
