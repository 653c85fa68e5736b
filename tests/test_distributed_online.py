"""Sharded online EM: two real torchrun ranks over gloo, each E-stepping its share of every
mini-batch, against an independent NumPy replay of the Cappé–Moulines recursion on the same
batches, against a one-process autograd and Adam replay of stochastic gradient EM on the same
batches, and against batch EM's log-likelihood."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SEED
from safetensors.torch import load_file
from scipy.linalg import cho_factor, cho_solve
from scipy.special import logsumexp
from test_distributed import _env, _free_port
from torch.distributions.transforms import StickBreakingTransform

from ppl_gmm import distributed
from ppl_gmm.backends.online_em import OnlineEM, OnlineEMOptions
from ppl_gmm.errors import UserError
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic

N, B, RANKS = 4000, 500, 2


def _torchrun(config: Path, runs: Path) -> Path:
    """``ppl-gmm run config`` on 2 torchrun ranks; the experiment directory rank 0 wrote."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS)]
    command += ["--master-port", str(_free_port()), "-m", "ppl_gmm", "run", str(config)]
    done = subprocess.run(
        [*command, "--runs-dir", str(runs), "--quiet"], capture_output=True, text=True, env=_env(), timeout=90
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [experiment] = list(runs.iterdir())
    return experiment


def _config(folder: Path, x: np.ndarray, backends: dict[str, dict[str, object]]) -> Path:
    """x as a .npy file, all of it train rows in file order (no test split, not standardized)."""
    np.save(folder / "x.npy", x)
    cfg = {
        "experiment": "sharded-online",
        "seed": 5,
        "dtype": "float64",
        "threads": 1,
        "data": {"source": "npy", "path": str(folder / "x.npy"), "test_fraction": 0.0, "standardize": False},
        "model": {"name": "gmm", "k": 3, "covariance": "full"},
        "init": {"method": "kmeans", "kmeans_iter": 3},
        "backends": backends,
    }
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _log_joint(x: np.ndarray, weights: np.ndarray, means: np.ndarray, covs: np.ndarray) -> np.ndarray:
    """log w_k + log N(x_n | μ_k, Σ_k): (N, K), by Cholesky factors."""
    out = np.empty((x.shape[0], weights.size))
    for k in range(weights.size):
        factor = cho_factor(covs[k], lower=True)
        diff = x - means[k]
        mahalanobis = np.einsum("nd,nd->n", diff, cho_solve(factor, diff.T).T)
        log_det = 2.0 * np.log(np.diag(factor[0])).sum()
        out[:, k] = np.log(weights[k]) - 0.5 * (mahalanobis + log_det + x.shape[1] * np.log(2 * np.pi))
    return out


def _metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_ranks_replay_the_recursion_on_the_union_of_their_shares(tmp_path: Path) -> None:
    """Unshuffled, rank r's share of batch t is rows (t - 1) B / R to t B / R of its contiguous
    shard, so batch t is the union of those two row ranges. A NumPy replay of
    s_t = (1 - γ_t) s_{t-1} + γ_t (N / B) stats_t(θ_{t-1}), θ_t = M(s_t) on exactly those rows,
    from the run's initial parameters, gives the run's parameters to 1e-10, its per-batch
    objectives and its periodic full-data log-likelihoods to 1e-12 (relative)."""
    x, _, _ = make_synthetic(N, 3, 3, 4.0, np.random.default_rng(SEED))
    options = {"batch_size": B, "shuffle": False, "epochs": 2, "eval_every": 3, "step_power": 0.7}
    experiment = _torchrun(_config(tmp_path, x, {"online_em": options}), tmp_path / "runs")

    init = {k: v.numpy() for k, v in load_file(str(experiment / "init.safetensors")).items()}
    weights, means, covs = init["weights"], init["means"], init["covariances"]
    shard, share, per_epoch = N // RANKS, B // RANKS, N // B
    stats = None
    objectives, evaluated = [], {}
    for t in range(1, 2 * per_epoch + 1):
        lo = (t - 1) % per_epoch * share
        rows = np.concatenate([x[r * shard + lo : r * shard + lo + share] for r in range(RANKS)])
        joint = _log_joint(rows, weights, means, covs)
        norm = logsumexp(joint, axis=1, keepdims=True)
        objectives.append(norm.sum() / B)
        resp = np.exp(joint - norm)
        batch = (N / B) * np.concatenate(
            [resp.sum(0), (resp.T @ rows).ravel(), np.einsum("nk,nd,ne->kde", resp, rows, rows).ravel()]
        )
        gamma = 1.0 if t == 1 else (t + 2.0) ** -0.7
        stats = batch if stats is None else (1 - gamma) * stats + gamma * batch
        k, d = weights.size, rows.shape[1]
        nk, sums, outer = stats[:k], stats[k : k + k * d].reshape(k, d), stats[k + k * d :].reshape(k, d, d)
        weights, means = nk / nk.sum(), sums / nk[:, None]
        covs = outer / nk[:, None, None] - np.einsum("kd,ke->kde", means, means) + 1e-6 * np.eye(d)
        if t % 3 == 0 or t == 2 * per_epoch:
            evaluated[t] = logsumexp(_log_joint(x, weights, means, covs), axis=1).mean()

    fitted = load_file(str(experiment / "online_em" / "params.safetensors"))
    for name, value in {"weights": weights, "means": means, "covariances": covs}.items():
        torch.testing.assert_close(fitted[name], torch.from_numpy(value), rtol=0, atol=1e-10, msg=name)
    rows = _metrics(experiment / "online_em" / "metrics.csv")
    assert [int(row["step"]) for row in rows] == list(range(1, 2 * per_epoch + 1))
    np.testing.assert_allclose([float(row["objective"]) for row in rows], objectives, rtol=1e-12)
    reported = {int(row["step"]): float(row["log_likelihood"]) for row in rows if row["log_likelihood"]}
    assert sorted(reported) == sorted(evaluated)
    np.testing.assert_allclose([reported[t] for t in evaluated], list(evaluated.values()), rtol=1e-12)
    summary = json.loads((experiment / "online_em" / "summary.json").read_text())
    assert summary["n_steps"] == 2 * per_epoch and summary["train_log_likelihood"] == pytest.approx(
        evaluated[2 * per_epoch], rel=1e-12
    )


def test_two_shuffled_ranks_reach_batch_em_s_log_likelihood(tmp_path: Path) -> None:
    """Three shuffled epochs on 2 ranks end within 1e-3 per point of batch EM's log-likelihood,
    fitted in the same sharded run from the same start, and not above it."""
    x, _, _ = make_synthetic(N, 3, 3, 3.0, np.random.default_rng(SEED + 1))
    backends = {
        "em": {"max_iter": 300, "tol": 1e-10},
        "online_em": {"batch_size": B, "epochs": 3, "eval_every": 4},
    }
    experiment = _torchrun(_config(tmp_path, x, backends), tmp_path / "runs")
    em, online = (json.loads((experiment / name / "summary.json").read_text()) for name in backends)
    assert em["status"] == online["status"] == "completed" and online["n_steps"] == 3 * N // B
    target, reached = em["train_log_likelihood"], online["train_log_likelihood"]
    assert target - 1e-3 < reached <= target + 1e-8, (target, reached)


def _free(model: GaussianMixture, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unconstrained coordinates of the declaration's sites: the weights by stick-breaking, the
    locations as they are, each precision P = L Lᵀ by L's lower triangle, row by row, with its
    diagonal's logarithm."""
    sites = model.to_sites(params)
    rows, cols = torch.tril_indices(model.dim, model.dim)
    tril = torch.linalg.cholesky(sites["precision"])[..., rows, cols]
    return {
        "weights": StickBreakingTransform().inv(sites["weights"]),
        "locs": sites["locs"],
        "precision": torch.where(rows == cols, tril.log(), tril),
    }


def _constrained(model: GaussianMixture, free: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ from ``_free``'s coordinates."""
    rows, cols = torch.tril_indices(model.dim, model.dim)
    vec = free["precision"]
    factor = vec.new_zeros(model.k, model.dim, model.dim)
    factor[:, rows, cols] = torch.where(rows == cols, vec.exp(), vec)
    sites = {"weights": StickBreakingTransform()(free["weights"]), "locs": free["locs"]}
    return model.from_sites({**sites, "precision": factor @ factor.mT})


def test_two_ranks_replay_stochastic_gradient_em_on_the_union_of_their_shares(tmp_path: Path) -> None:
    """m_step: gradient on 2 ranks is data-parallel SGD: unshuffled, batch t is the union of the
    ranks' row ranges (t - 1) B / R to t B / R, and one process replaying, from the run's initial
    parameters, the exact E-step and m_step_iters Adam steps (torch.optim.Adam, learning rate
    m_step_lr · γ_t) on -Q / N, Q = (N / B) Σ_n Σ_k r_nk log p(x_n, z_n = k | θ), over those
    rows in the same unconstrained coordinates gives the run's parameters to 1e-10, and (NumPy)
    its per-batch objectives and periodic full-data log-likelihoods to 1e-10 (relative)."""
    x, _, _ = make_synthetic(N, 3, 3, 3.0, np.random.default_rng(SEED + 2))
    lr, power, offset, iters, epochs = 0.1, 0.6, 1.0, 3, 2
    options = {
        "m_step": "gradient",
        "batch_size": B,
        "shuffle": False,
        "epochs": epochs,
        "eval_every": 3,
        "step_power": power,
        "step_offset": offset,
        "m_step_iters": iters,
        "m_step_lr": lr,
    }
    experiment = _torchrun(_config(tmp_path, x, {"online_em": options}), tmp_path / "runs")

    data = torch.from_numpy(x)
    model = GaussianMixture.from_config(GMMOptions(k=3, covariance="full"), data)
    init = load_file(str(experiment / "init.safetensors"))
    free = {name: value.clone().requires_grad_(True) for name, value in _free(model, init).items()}
    optimizer = torch.optim.Adam(list(free.values()), lr=lr)
    params = init
    shard, share, per_epoch = N // RANKS, B // RANKS, N // B
    objectives, evaluated = [], {}
    for t in range(1, epochs * per_epoch + 1):
        lo = (t - 1) % per_epoch * share
        rows = torch.cat([data[r * shard + lo : r * shard + lo + share] for r in range(RANKS)])
        numpy_params = [params[name].numpy() for name in ("weights", "means", "covariances")]
        objectives.append(logsumexp(_log_joint(rows.numpy(), *numpy_params), axis=1).mean())
        with torch.no_grad():
            resp = torch.softmax(model.log_joint(rows, params), dim=1)
        gamma = 1.0 if t == 1 else (t + offset) ** -power
        optimizer.param_groups[0]["lr"] = lr * gamma
        for _ in range(iters):
            optimizer.zero_grad()
            q = (N / B) * (resp * model.log_joint(rows, _constrained(model, free))).sum()
            (-q / N).backward()
            optimizer.step()
        with torch.no_grad():
            params = {name: value.detach().clone() for name, value in _constrained(model, free).items()}
        if t % 3 == 0 or t == epochs * per_epoch:
            numpy_params = [params[name].numpy() for name in ("weights", "means", "covariances")]
            evaluated[t] = logsumexp(_log_joint(x, *numpy_params), axis=1).mean()

    fitted = load_file(str(experiment / "online_em" / "params.safetensors"))
    for name, value in params.items():
        torch.testing.assert_close(fitted[name], value, rtol=0, atol=1e-10, msg=name)
    assert (fitted["means"] - init["means"]).abs().max() > 0.01  # the steps moved θ
    rows = _metrics(experiment / "online_em" / "metrics.csv")
    assert [int(row["step"]) for row in rows] == list(range(1, epochs * per_epoch + 1))
    np.testing.assert_allclose([float(row["objective"]) for row in rows], objectives, rtol=1e-10)
    reported = {int(row["step"]): float(row["log_likelihood"]) for row in rows if row["log_likelihood"]}
    assert sorted(reported) == sorted(evaluated)
    np.testing.assert_allclose([reported[t] for t in evaluated], list(evaluated.values()), rtol=1e-10)
    summary = json.loads((experiment / "online_em" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["m_step"] == "gradient"
    assert summary["n_steps"] == epochs * per_epoch


@pytest.mark.parametrize("m_step", ["closed_form", "gradient"])
def test_sharded_online_em_needs_a_point_per_rank(monkeypatch: pytest.MonkeyPatch, m_step: str) -> None:
    """Both M-steps run sharded with a batch of at least one point per rank, and are refused
    with fewer."""
    x = torch.from_numpy(make_synthetic(200, 2, 2, 3.0, np.random.default_rng(SEED))[0])
    model = GaussianMixture.from_config(GMMOptions(k=2), x)
    OnlineEM().check(model, OnlineEMOptions(m_step=m_step, batch_size=1))  # one process: fine
    monkeypatch.setattr(distributed, "_WORLD", distributed.World(0, 2, 0))
    OnlineEM().check(model, OnlineEMOptions(m_step=m_step, batch_size=2))
    match = r"^backends\.online_em\.batch_size: expected at least one point per rank \(2\)"
    with pytest.raises(UserError, match=match):
        OnlineEM().check(model, OnlineEMOptions(m_step=m_step, batch_size=1))
