"""Interleaved A/B of the Gaussian mixture's EM between two commits: ms per iteration. Method:
benchmarks/README.md, section "em_ab".

    python -m benchmarks.em_ab OLD NEW [--repeats 7] [--large-repeats 3]

Prints one line per case: old and new medians, new/old, and each side's range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ._common import LineWorker, machine

# N, D, K, covariance, dtype, short and long run lengths
CASES = [
    (100_000, 8, 8, "full", "float64", 3, 23),
    (100_000, 8, 8, "full", "float32", 3, 23),
    (100_000, 8, 8, "diag", "float64", 3, 23),
    (100_000, 8, 8, "diag", "float32", 3, 23),
    (1_000_000, 16, 16, "full", "float64", 1, 3),
    (1_000_000, 16, 16, "full", "float32", 1, 3),
    (1_000_000, 16, 16, "diag", "float64", 1, 3),
]

# runs in a worker, against the commit on its PYTHONPATH; only APIs both sides share
WORKER = r"""
import json, sys, numpy as np, torch
from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.models.gmm import GaussianMixture
case = None
for line in sys.stdin:
    n, d, k, cov, dtype, short, long = json.loads(line)
    if case is None or case[0] != (n, d, k, cov, dtype):
        rng = np.random.default_rng(0)
        centers = rng.normal(scale=4.0, size=(k, d))
        x64 = torch.from_numpy(centers[rng.integers(k, size=n)] + rng.normal(size=(n, d)))
        model = GaussianMixture(k, d, cov, None)
        init = model.m_step(x64, torch.softmax(3.0 * torch.from_numpy(rng.normal(size=(n, k))), 1), 1e-6)
        x = x64.to(getattr(torch, dtype))
        case = ((n, d, k, cov, dtype), model, x, {name: value.to(x) for name, value in init.items()})
        EM().fit(model, x, case[3], EMOptions(max_iter=1, tol=0.0, reg_covar=1e-6), lambda info: None)
    _, model, x, init = case
    seconds = []
    for m in (short, long):
        options = EMOptions(max_iter=m, tol=0.0, reg_covar=1e-6)
        seconds.append(EM().fit(model, x, init, options, lambda info: None).fit_seconds)
    print(json.dumps((seconds[1] - seconds[0]) / (long - short)), flush=True)
"""


def _worktree(ref: str, root: Path) -> Path:
    path = root / ref.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), ref], check=True)
    return path


def _worker(tree: Path, cwd: str) -> LineWorker:
    """A worker running WORKER against the code in ``tree``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="4294967296")
    return LineWorker("EM worker", [sys.executable, "-c", WORKER], dict(env, PYTHONPATH=str(tree)), cwd)


def _time_case(workers: dict[str, LineWorker], case: list, repeats: int) -> dict[str, list[float]]:
    """ms per iteration of each worker's ``repeats`` runs of the case, the order alternating."""
    times: dict[str, list[float]] = {ref: [] for ref in workers}
    for r in range(repeats):
        for ref in list(workers)[:: 1 if r % 2 == 0 else -1]:
            times[ref].append(1e3 * workers[ref].ask(case))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--repeats", type=int, default=7, help="repeats below 1M points")
    parser.add_argument("--large-repeats", type=int, default=3, help="repeats at 1M points")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        trees = {ref: _worktree(ref, Path(scratch)) for ref in (args.old, args.new)}
        workers = {ref: _worker(tree, scratch) for ref, tree in trees.items()}
        print(f"EM ms per iteration, {args.old} -> {args.new}, interleaved; {machine()}", flush=True)
        try:
            for case in CASES:
                times = _time_case(
                    workers, case, args.large_repeats if case[0] >= 1_000_000 else args.repeats
                )
                old, new = (statistics.median(times[ref]) for ref in (args.old, args.new))
                n, d, k, cov, dtype = case[:5]
                spread = {ref: f"{min(t):.2f}-{max(t):.2f}" for ref, t in times.items()}
                print(
                    f"{n:>9,} {d:>2} {k:>2} {cov:<5} {dtype:<8} old {old:8.2f}  new {new:8.2f}  "
                    f"new/old {new / old:5.3f}  (old {spread[args.old]}, new {spread[args.new]})",
                    flush=True,
                )
        finally:
            for worker in workers.values():
                worker.close()
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()
