"""Baum–Welch per iteration against hmmlearn's GaussianHMM, side by side in one process: the same
sequences (simulated from a random Gaussian HMM), the same start, float64, full covariances,
each timed at 1 and at all threads (its best kept), an iteration being the E-step over all
sequences and the M-step. Also the peak memory each adds.

    .venv/bin/python -m benchmarks.baum_welch [--sequences 1000 --length 1000 --k 8 --dim 4]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ._common import machine, reexec_with_malloc_env

OUT = Path(__file__).parent / "results" / "baum_welch.txt"


def best_seconds(step: object, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        began = time.perf_counter()
        step()  # type: ignore[operator]
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequences", type=int, default=1000)
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    reexec_with_malloc_env("benchmarks.baum_welch", sys.argv[1:])
    from hmmlearn import hmm
    from threadpoolctl import threadpool_limits

    from ppl_gmm.models.hmm import GaussianHMM

    s, t, k, d = args.sequences, args.length, args.k, args.dim
    rng = np.random.default_rng(0)
    lengths = np.full(s, t)
    model = GaussianHMM(k, d, "full", None).bind(lengths)
    truth = model.sample_truth(rng, 3.0)
    x, _ = model.simulate(truth, s * t, rng)
    start = {  # the truth, its means moved and its transitions flattened: EM has work to do
        "start": torch.full((k,), 1.0 / k, dtype=torch.float64),
        "transitions": 0.5 * truth["transitions"] + 0.5 / k,
        "means": truth["means"] + torch.from_numpy(rng.normal(0, 0.5, (k, d))),
        "covariances": truth["covariances"],
    }
    cores = os.cpu_count() or 1
    lines = [f"baum_welch: {s} sequences x {t} steps, K={k}, D={d}, full, float64; {machine()}"]
    ours: dict[int, float] = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)

        def iteration() -> None:
            estep = model.e_step(x, start)
            model.m_step_hmm(x, estep, 0.0)

        iteration()  # warm-up
        ours[threads] = best_seconds(iteration, args.reps)
        lines.append(f"ppl_gmm em (Baum-Welch), {threads} thread(s): {ours[threads]:.3f} s per iteration")
    theirs: dict[int, float] = {}
    xs = x.numpy()
    for threads in sorted({1, cores}):
        reference = hmm.GaussianHMM(
            k, "full", min_covar=0.0, covars_prior=0.0, covars_weight=0.0, means_weight=0.0,
            startprob_prior=1.0, transmat_prior=1.0, init_params="", n_iter=1, tol=-np.inf,
        )  # fmt: skip
        reference.n_features = d

        def fit_once(reference: hmm.GaussianHMM = reference) -> None:
            reference.startprob_ = start["start"].numpy().copy()
            reference.transmat_ = start["transitions"].numpy().copy()
            reference.means_ = start["means"].numpy().copy()
            reference.covars_ = start["covariances"].numpy().copy()
            reference.fit(xs, lengths)

        with threadpool_limits(threads):
            fit_once()
            theirs[threads] = best_seconds(fit_once, args.reps)
        lines.append(
            f"hmmlearn 0.3.3 GaussianHMM, {threads} BLAS thread(s): {theirs[threads]:.3f} s per iteration"
        )
    ratio = min(theirs.values()) / min(ours.values())
    lines.append(f"speed-up, best against best: {ratio:.1f}x")
    OUT.write_text("\n".join(lines) + "\n")
    print(*lines, sep="\n")


if __name__ == "__main__":
    main()
