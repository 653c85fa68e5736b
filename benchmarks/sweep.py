"""A sweep of small runs on two local workers against the same points one after another: the
wall time of ``sweep(..., jobs=2)`` (a pool of worker processes forked from a fork server) over
that of ``sweep(..., jobs=1)`` (the points in the calling process), target at most 0.6; the same
pool with ``OMP_NUM_THREADS=1`` in its environment; and a shell loop of one ``ppl-gmm run``
process per point.

    .venv/bin/python -m benchmarks.sweep                                # 20 points of 100k x 8 (~6 min)
    .venv/bin/python -m benchmarks.sweep --n 20000 --skip-loop          # quick check (~1 min)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ._common import RESULTS, add_quiet_options, machine, run_worker, serve_job, settle, write_results

MODULE = "benchmarks.sweep"
TARGET = 0.6


def point_config(args: argparse.Namespace) -> dict[str, Any]:
    """One point: a fixed number of EM iterations (every point the same work, so that the pool's
    time is not a matter of which points converge slowly) on synthetic data it draws itself."""
    return {
        "experiment": "bench-sweep",
        "seed": 0,
        "threads": 1,  # both ways: jobs=2 gives each worker cores // jobs = 1 thread
        "data": {"source": "synthetic", "n": args.n, "dim": args.dim, "k": args.k, "separation": 3.0},
        "model": {"name": "gmm", "k": args.k, "covariance": "full"},
        "init": {"method": "kmeans++"},
        "backends": {"em": {"max_iter": args.iters, "tol": 0.0}},
    }


def worker_sweep(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process, its imports done (as a command's are before it sweeps): one ``sweep``
    call, timed."""
    import ppl_gmm.experiment  # noqa: F401  (the sweep imports it when it checks the points)
    from ppl_gmm.sweep import parse_grid, parse_seeds, sweep

    raw = yaml.safe_load(Path(job["config"]).read_text())
    grid, seeds = parse_grid(job["grid"]), parse_seeds(job["seeds"])
    done: list[tuple[float, int]] = []  # when each point was recorded finished, and which

    def message(text: str) -> None:
        match = re.match(r"\[\d+/\d+\] point p(\d+)", text)
        if match:
            done.append((time.perf_counter() - began, int(match[1])))

    began = time.perf_counter()
    result = sweep(raw, grid, seeds, Path(job["runs_dir"]), jobs=job["jobs"], message=message)
    seconds = time.perf_counter() - began
    manifest = result.manifest.set_index("point")
    first_at, first = min(done)
    return {
        "seconds": seconds,
        "finished": int((manifest["state"] == "finished").sum()),
        "point_seconds": float(manifest["seconds"].sum()),
        # set-up before the first point started (checks, the fork server), and after the last
        # point ended (the aggregate and its figure)
        "before_points": first_at - float(manifest.at[first, "seconds"]),
        "after_points": seconds - max(done)[0],
    }


def shell_loop(config: Path, grid: list[str], seeds: str, runs_dir: Path) -> dict[str, Any]:
    """One ``python -m ppl_gmm run`` process per point, one after another."""
    from ppl_gmm.sweep import parse_grid, parse_seeds, points_of

    points = points_of(parse_grid(grid), parse_seeds(seeds))
    began, finished = time.perf_counter(), 0
    for point in points:
        overrides = [f"{key}={value}" for key, value in point.values.items()] + [f"seed={point.seed}"]
        command = [sys.executable, "-m", "ppl_gmm", "run", str(config), *overrides]
        done = subprocess.run(
            [*command, "--runs-dir", str(runs_dir), "--quiet"], capture_output=True, text=True, check=False
        )
        finished += done.returncode == 0
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-2000:])
    nan = float("nan")
    seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "finished": finished,
        "point_seconds": nan,
        "before_points": nan,
        "after_points": nan,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="points per run (train + test)")
    parser.add_argument("--iters", type=int, default=100, help="EM iterations per run (tol 0)")
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--k", type=int, default=8, help="true components, and the base config's model.k")
    parser.add_argument(
        "--grid", action="append", default=None, help="as ppl-gmm sweep (default model.k=6,8)"
    )
    parser.add_argument("--seeds", default="0..9", help="as ppl-gmm sweep")
    parser.add_argument("--jobs", type=int, default=2, help="local workers of the parallel sweep")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all ways, the order alternating")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the shell loop (the slowest)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep.csv")
    add_quiet_options(parser, quiet=0.5, max_wait=30.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.grid = args.grid or ["model.k=6,8"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_job(args.job, worker_sweep)
    from ppl_gmm.sweep import parse_grid, parse_seeds, points_of

    n_points = len(points_of(parse_grid(args.grid), parse_seeds(args.seeds)))
    ways = {
        "a": "sweep, jobs=1 (in-process)",
        "b": f"sweep, jobs={args.jobs}",
        "d": f"sweep, jobs={args.jobs}, OMP_NUM_THREADS=1",
        "c": "shell loop of ppl-gmm run",
    }
    if args.skip_loop:
        del ways["c"]
    lines = [
        f"sweep: {n_points} points ({' '.join(f'--grid {g}' for g in args.grid)} --seeds {args.seeds}), "
        f"each {args.iters} gmm EM iterations on synthetic n={args.n}, dim={args.dim}, k={args.k}, full, "
        f"float64, threads: 1; {machine()}",
        f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
    ]
    print(*lines, sep="\n", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as name:
        tmp = Path(name)
        config = tmp / "point.yaml"
        config.write_text(yaml.safe_dump(point_config(args)))
        for repeat in range(args.repeats):
            order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
            for way in order:
                runs_dir = tmp / f"runs-{way}-{repeat}"
                settle(args.quiet, args.max_wait)
                load_before = os.getloadavg()[0]
                if way == "c":
                    got = shell_loop(config, args.grid, args.seeds, runs_dir)
                else:
                    job = {
                        "config": str(config),
                        "grid": args.grid,
                        "seeds": args.seeds,
                        "runs_dir": str(runs_dir),
                    }
                    jobs = 1 if way == "a" else args.jobs
                    with _environment(OMP_NUM_THREADS="1" if way == "d" else None):
                        got = run_worker(MODULE, "sweep", tmp, {**job, "jobs": jobs})
                row = {"repeat": repeat, "way": way, "what": ways[way], **got}
                row.update(load_before=load_before, load_after=os.getloadavg()[0])
                rows.append(row)
                print(
                    f"  round {repeat}, {way}) {ways[way]}: {got['seconds']:.1f} s, "
                    f"{got['finished']}/{n_points} finished (load average {row['load_before']:.2f} -> "
                    f"{row['load_after']:.2f})",
                    flush=True,
                )
    median = {way: _median([r["seconds"] for r in rows if r["way"] == way]) for way in ways}
    lines.append(
        f"\n{'way':<34} {'wall s':>7} {'s/point':>7} {'sum of points s':>15} {'before':>6} {'after':>6}"
    )
    for way, what in ways.items():
        of = {
            key: _median([r[key] for r in rows if r["way"] == way])
            for key in ("point_seconds", "before_points", "after_points")
        }
        lines.append(
            f"{way}) {what:<31} {median[way]:7.1f} {median[way] / n_points:7.2f} {of['point_seconds']:15.1f} "
            f"{of['before_points']:6.1f} {of['after_points']:6.1f}"
        )
    ratio = median["b"] / median["a"]
    verdict = "PASS" if ratio <= TARGET else "MISS"
    lines.append(f"\nb/a = {ratio:.2f} (target <= {TARGET}: {verdict})")
    lines.append(f"d/a = {median['d'] / median['a']:.2f} (the pool with OMP_NUM_THREADS=1)")
    if "c" in median:
        lines.append(f"b/c = {median['b'] / median['c']:.2f}, a/c = {median['a'] / median['c']:.2f}")
    lines.append(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(*lines[2:], sep="\n")
    write_results(args.out, rows, lines)
    print(f"wrote {args.out}")
    return 0


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """``os.environ`` with ``values`` set (None: left as it is) for a while: what a worker inherits."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update({key: value for key, value in values.items() if value is not None})
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


if __name__ == "__main__":
    raise SystemExit(main())
