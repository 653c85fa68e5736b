"""How fast is an EM iteration at each block size? The measurements behind ``em.block_rows_for``.
Method: benchmarks/README.md, section "block_rows".

    .venv/bin/python -m benchmarks.block_rows                                   # the defaults below
    .venv/bin/python -m benchmarks.block_rows --sizes 1000000,16,16 --covariance full --dtype float64

Prints, per configuration, the median ms per iteration of each block size and its repeats.
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np
import torch

from ppl_gmm.backends.em import EM, EMOptions, block_rows_for, lane_block_rows
from ppl_gmm.config import InitConfig
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic

from ._common import DTYPES, add_quiet_options, measure, wait_until_quiet


def _size(text: str) -> tuple[int, int, int]:
    n, d, k = (int(float(v)) for v in text.split(","))
    return n, d, k


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--sizes", type=_size, nargs="+", default=[(100_000, 8, 8), (1_000_000, 16, 16)])
    add("--covariance", nargs="+", default=["full", "diag"], choices=["full", "diag"])
    add("--dtype", nargs="+", default=["float64", "float32"], choices=list(DTYPES))
    add("--blocks", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    add("--threads", type=int, default=2, help="EM lanes (and torch threads)")
    add("--repeats", type=int, default=4)
    add("--point-iterations", type=float, default=3e6, help="N × (B - A) per timed pair")
    add_quiet_options(parser, quiet=0.5, max_wait=10.0)
    return parser.parse_args(argv)


def _seconds(
    model: GaussianMixture, x: torch.Tensor, init: dict, iterations: int, rows: int, args: argparse.Namespace
) -> float:
    """Wall seconds of one EM fit of ``iterations`` steps in blocks of ``rows``, once the machine is quiet."""
    options = EMOptions(max_iter=iterations, tol=0, block_rows=rows, threads=args.threads)
    wait_until_quiet(args.quiet, args.max_wait)
    measured, _ = measure(lambda: EM().fit(model, x, init, options, lambda info: None))
    return measured.seconds


def time_blocks(model: GaussianMixture, x: torch.Tensor, init: dict, args: argparse.Namespace) -> dict:
    """ms per iteration of each block size, per repeat: 1 + span against 1 iteration, where span
    iterations cover ``--point-iterations``; the blocks' order reverses every repeat."""
    span = max(1, math.ceil(args.point_iterations / x.shape[0]))
    times: dict[int, list[float]] = {rows: [] for rows in args.blocks}
    for repeat in range(args.repeats):
        for rows in args.blocks if repeat % 2 == 0 else args.blocks[::-1]:
            long, short = (_seconds(model, x, init, i, rows, args) for i in (1 + span, 1))
            times[rows].append((long - short) / span * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"block_rows: ms per EM iteration by block size; {args.threads} lane(s), torch {torch.__version__}")
    for n, d, k in args.sizes:
        x_np, _, _ = make_synthetic(n, d, k, 3.0, np.random.default_rng(0))
        for covariance in args.covariance:
            for name in args.dtype:
                x = torch.from_numpy(x_np).to(DTYPES[name])
                model = GaussianMixture.from_config(GMMOptions(k=k, covariance=covariance), x)
                init = initialize(model, x, InitConfig(method="kmeans++"), seed=0)
                times = time_blocks(model, x, init, args)
                print(
                    f"\n{n:,} × {d}, K = {k}, {covariance}, {name}: default {block_rows_for(model, x)} rows"
                )
                for rows in args.blocks:
                    used = lane_block_rows(n, rows, min(args.threads, math.ceil(n / rows)))
                    runs = " ".join(f"{v:.1f}" for v in times[rows])
                    median = statistics.median(times[rows])
                    print(f"  {rows:6d} rows (used {used:6d}): {median:8.2f} ms  [{runs}]")


if __name__ == "__main__":
    main()
