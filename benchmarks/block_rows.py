"""How fast is an EM iteration at each block size? The measurements behind ``em.block_rows_for``.

For each configuration (N, D, K, covariance, dtype) and each ``--blocks`` size, this times
``EM().fit(model, x, init, EMOptions(max_iter=n, tol=0, block_rows=b, threads=t))`` on synthetic
data (``make_synthetic``, separation 3) from a k-means++ start, at two run lengths A < B: ms per
iteration = (t_B - t_A) / (B - A), so set-up and the first E-step cancel. The block sizes are
interleaved (their order reverses every repeat), each timed run waits for the machine to go quiet,
and medians are reported with every repeat, next to the size ``block_rows_for`` picks. With several
lanes a pass evens the blocks out (``em.lane_block_rows``: a whole number per lane), so the rows
actually used are printed too.

    .venv/bin/python -m benchmarks.block_rows                                   # the defaults below
    .venv/bin/python -m benchmarks.block_rows --sizes 1000000,16,16 --covariance full --dtype float64
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np
import torch

from benchmarks._common import measure, wait_until_quiet
from ppl_gmm.backends.em import EM, EMOptions, block_rows_for, lane_block_rows
from ppl_gmm.config import InitConfig
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _size(text: str) -> tuple[int, int, int]:
    n, d, k = (int(float(v)) for v in text.split(","))
    return n, d, k


def _seconds(
    model: GaussianMixture, x: torch.Tensor, init: dict, iterations: int, rows: int, args: argparse.Namespace
) -> float:
    """Wall seconds of one EM fit of ``iterations`` steps in blocks of ``rows``, once the machine is quiet."""
    options = EMOptions(max_iter=iterations, tol=0, block_rows=rows, threads=args.threads)
    wait_until_quiet(args.quiet, args.max_wait)
    measured, _ = measure(lambda: EM().fit(model, x, init, options, lambda info: None))
    return measured.seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_size, nargs="+", default=[(100_000, 8, 8), (1_000_000, 16, 16)])
    parser.add_argument("--covariance", nargs="+", default=["full", "diag"], choices=["full", "diag"])
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=list(DTYPES))
    parser.add_argument("--blocks", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--threads", type=int, default=2, help="EM lanes (and torch threads)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--point-iterations", type=float, default=3e6, help="N × (B - A) per timed pair")
    parser.add_argument("--quiet", type=float, default=0.5)
    parser.add_argument("--max-wait", type=float, default=10.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"block_rows: ms per EM iteration by block size; {args.threads} lane(s), torch {torch.__version__}")
    for n, d, k in args.sizes:
        x_np, _, _ = make_synthetic(n, d, k, 3.0, np.random.default_rng(0))
        span = max(1, math.ceil(args.point_iterations / n))
        for covariance in args.covariance:
            for name in args.dtype:
                x = torch.from_numpy(x_np).to(DTYPES[name])
                model = GaussianMixture.from_config(GMMOptions(k=k, covariance=covariance), x)
                init = initialize(model, x, InitConfig(method="kmeans++"), seed=0)

                times: dict[int, list[float]] = {rows: [] for rows in args.blocks}
                for repeat in range(args.repeats):
                    for rows in args.blocks if repeat % 2 == 0 else args.blocks[::-1]:
                        long, short = (_seconds(model, x, init, i, rows, args) for i in (1 + span, 1))
                        times[rows].append((long - short) / span * 1e3)
                default = block_rows_for(model, x)
                print(f"\n{n:,} × {d}, K = {k}, {covariance}, {name}: default {default} rows")
                for rows in args.blocks:
                    used = lane_block_rows(n, rows, min(args.threads, math.ceil(n / rows)))
                    runs = " ".join(f"{v:.1f}" for v in times[rows])
                    median = statistics.median(times[rows])
                    print(f"  {rows:6d} rows (used {used:6d}): {median:8.2f} ms  [{runs}]")


if __name__ == "__main__":
    main()
