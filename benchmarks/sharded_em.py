"""Sharded EM against one process on a memory-mapped .npy: ``torchrun --nproc-per-node 2 -m
ppl_gmm run`` with one thread per rank against ``ppl-gmm run`` with two threads, from the same
start (``init.method: given``). Targets: time per iteration at most 1.15x one process's, and each
rank's peak memory at most half of one process's.

    .venv/bin/python -m benchmarks.sharded_em                  # N=10M, D=16, K=16 (~5 min)
    .venv/bin/python -m benchmarks.sharded_em --n 1000000      # quick check (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ._common import (
    RESULTS,
    add_quiet_options,
    fmt_n,
    machine,
    mixture_chunks,
    settle,
    synthetic,
    write_results,
)

MODULE = "benchmarks.sharded_em"
TIME_TARGET, MEMORY_TARGET = 1.15, 0.5
INIT_ROWS = 20_000
SAMPLE_SECONDS = 0.05  # how often a process samples its own RssAnon


# ---- one process of a run (a rank, or the single process) ---------------------------------------


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def as_rank(report: str, argv: list[str]) -> int:
    """``ppl-gmm *argv`` in this process, then its memory written to ``report``.<rank>.json: the
    kernel's peak resident set (VmHWM: private pages and the file's mapped pages alike) and the
    peak of the private pages alone (RssAnon, sampled every SAMPLE_SECONDS: the kernel keeps no
    peak of it)."""
    from ppl_gmm.cli import main

    peak_anon, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status_mb("RssAnon"))
            stop.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = main(argv)
    finally:
        stop.set()
        sampler.join()
    rank = int(os.environ.get("RANK", "0"))
    memory = {"rank": rank, "vm_hwm_mb": _status_mb("VmHWM"), "rss_anon_peak_mb": peak_anon[0], "code": code}
    Path(f"{report}.{rank}.json").write_text(json.dumps(memory))
    return code


# ---- data, start, config ------------------------------------------------------------------------


def write_data(path: Path, n: int, d: int, k: int, seed: int) -> dict[str, np.ndarray]:
    """n points of make_synthetic's mixture (drawn with n=1) into a .npy at ``path``, chunk by
    chunk (chunk c from its own generators), so that this process never holds them all."""
    truth = synthetic(1, d, k, 3.0, seed)[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(n, d))
    for start, block in mixture_chunks(truth, n, seed):
        out[start : start + block.shape[0]] = block
    out.flush()
    del out
    return truth


def write_init(data: Path, init: Path, k: int, seed: int) -> None:
    """k-means++ parameters from the first INIT_ROWS rows, as a safetensors file."""
    import torch
    from safetensors.torch import save_file

    from ppl_gmm.config import InitConfig
    from ppl_gmm.init import initialize
    from ppl_gmm.models.gmm import GaussianMixture, GMMOptions

    x = torch.from_numpy(np.array(np.load(data, mmap_mode="r")[:INIT_ROWS]))
    model = GaussianMixture.from_config(GMMOptions(k=k), x)
    params = initialize(model, x, InitConfig(method="kmeans++"), seed)
    save_file({name: value.contiguous() for name, value in params.items()}, str(init))


def config(data: Path, init: Path, k: int, iters: int, threads: int) -> dict[str, Any]:
    return {
        "experiment": "bench-sharded",
        "seed": 0,
        "threads": threads,
        # no test split: the train rows are the file's rows in order, a slice per rank
        "data": {"source": "npy", "path": str(data), "test_fraction": 0.0},
        "model": {"name": "gmm", "k": k, "covariance": "full", "prior": "none"},
        "init": {"method": "given", "path": str(init)},
        "backends": {"em": {"max_iter": iters, "tol": 0.0}},
    }


# ---- one timed run ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def timed_run(tmp: Path, name: str, cfg: dict[str, Any], ranks: int) -> dict[str, Any]:
    """One ``ppl-gmm run`` of ``cfg`` (under torchrun where ranks > 1): its wall time, EM's
    seconds per iteration from metrics.csv, the final log-likelihood, each process's memory."""
    path, runs, report = tmp / f"{name}.yaml", tmp / f"runs-{name}", tmp / f"memory-{name}"
    path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(runs, ignore_errors=True)
    for old in tmp.glob(f"memory-{name}.*.json"):
        old.unlink()
    python = [sys.executable]
    if ranks > 1:
        python += [
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--master-port",
            str(_free_port()),
        ]
    command = [*python, "-m", MODULE, "--as-rank", str(report), "run", str(path)]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "MASTER_"))}
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = str(cfg["threads"])  # what torchrun sets; the config's threads rule anyway
    began = time.perf_counter()
    done = subprocess.run(
        [*command, "--runs-dir", str(runs), "--quiet"], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    [run_dir] = list(runs.iterdir())
    metrics = np.genfromtxt(run_dir / "em" / "metrics.csv", delimiter=",", names=True)
    per_iter = np.diff(metrics["wall_seconds"][metrics["step"] >= 1])  # iteration i: step i-1 -> i
    summary = json.loads((run_dir / "em" / "summary.json").read_text())
    memory = [json.loads(p.read_text()) for p in sorted(tmp.glob(f"memory-{name}.*.json"))]
    return {
        "wall_s": wall,
        "fit_s": summary["fit_seconds"],
        "iter_ms": 1000 * float(np.median(per_iter)),
        "iter_ms_min": 1000 * float(per_iter.min()),
        "iter_ms_max": 1000 * float(per_iter.max()),
        "train_ll": summary["train_log_likelihood"],
        "vm_hwm_mb": max(m["vm_hwm_mb"] for m in memory),
        "rss_anon_peak_mb": max(m["rss_anon_peak_mb"] for m in memory),
        "per_process": " ".join(f"{m['vm_hwm_mb']:.0f}/{m['rss_anon_peak_mb']:.0f}" for m in memory),
    }


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000_000, help="rows of the .npy file")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--iters", type=int, default=6, help="EM iterations per run (tol 0)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the sharded run, one thread each")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both runs, the order alternating")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-dir", type=Path, help="where the .npy goes (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "sharded_em.csv")
    add_quiet_options(parser, quiet=0.5, max_wait=60.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--as-rank"]:
        return as_rank(argv[1], argv[2:])
    args = parse_args(argv)
    n, d, k = args.n, args.dim, args.k
    runs = {"one": (1, args.ranks), "sharded": (args.ranks, 1)}  # name: (processes, threads each)
    lines = [
        f"sharded_em: N={fmt_n(n)}, D={d}, K={k}, full, float64, a memory-mapped .npy, em only, "
        f"{args.iters} iterations; one process x {args.ranks} threads against {args.ranks} ranks x 1 "
        f"thread (torchrun, gloo); {machine()}",
        f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
    ]
    print(*lines, sep="\n", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sharded_", dir=args.data_dir))
    rows: list[dict[str, Any]] = []
    try:
        data, init = tmp / "x.npy", tmp / "init.safetensors"
        began = time.perf_counter()
        write_data(data, n, d, k, args.seed)
        write_init(data, init, k, args.seed)
        print(
            f"data ({data.stat().st_size / 2**30:.2f} GiB) and start in {time.perf_counter() - began:.0f} s"
        )
        for repeat in range(args.repeats):
            for name in list(runs) if repeat % 2 == 0 else list(reversed(runs)):
                processes, threads = runs[name]
                settle(args.quiet, args.max_wait)
                load = os.getloadavg()[0]
                got = timed_run(tmp, name, config(data, init, k, args.iters, threads), processes)
                rows.append(
                    {"repeat": repeat, "run": name, "processes": processes, "threads": threads, **got}
                )
                rows[-1].update(load_before=load, load_after=os.getloadavg()[0])
                print(
                    f"  round {repeat}, {name}: {got['iter_ms']:.0f} ms per iteration "
                    f"({got['iter_ms_min']:.0f}-{got['iter_ms_max']:.0f}), run {got['wall_s']:.1f} s, "
                    f"peak RSS / RssAnon per process (MiB) {got['per_process']} "
                    f"(load average {load:.2f} -> {rows[-1]['load_after']:.2f})",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines += _summary(rows, runs)
    lines.append(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(*lines[2:], sep="\n")
    write_results(args.out, rows, lines)
    print(f"wrote {args.out}")
    return 0


def _summary(rows: list[dict[str, Any]], runs: dict[str, tuple[int, int]]) -> list[str]:
    of = {
        name: {
            key: statistics.median(r[key] for r in rows if r["run"] == name)
            for key, value in rows[0].items()
            if isinstance(value, float)
        }
        for name in runs
    }
    lines = [f"\n{'run':<20} {'ms/iter':>8} {'fit s':>7} {'run s':>7} {'peak RSS':>9} {'peak RssAnon':>13}"]
    for name, (processes, threads) in runs.items():
        m = of[name]
        lines.append(
            f"{f'{processes} proc x {threads} thr':<20} {m['iter_ms']:8.0f} {m['fit_s']:7.1f} "
            f"{m['wall_s']:7.1f} "
            f"{m['vm_hwm_mb']:5.0f} MiB {m['rss_anon_peak_mb']:9.0f} MiB"
        )
    one, sharded = of["one"], of["sharded"]
    time_ratio = sharded["iter_ms"] / one["iter_ms"]
    hwm_ratio = sharded["vm_hwm_mb"] / one["vm_hwm_mb"]
    anon_ratio = sharded["rss_anon_peak_mb"] / one["rss_anon_peak_mb"]
    lines += [
        f"\nper iteration, sharded / one process: {time_ratio:.2f} (target <= {TIME_TARGET}: "
        f"{'PASS' if time_ratio <= TIME_TARGET else 'MISS'})",
        f"peak RSS, largest rank / one process: {hwm_ratio:.2f} (target <= {MEMORY_TARGET}: "
        f"{'PASS' if hwm_ratio <= MEMORY_TARGET else 'MISS'})",
        f"peak RssAnon (private), largest rank / one process: {anon_ratio:.2f} (target <= {MEMORY_TARGET}: "
        f"{'PASS' if anon_ratio <= MEMORY_TARGET else 'MISS'})",
        f"final train log-likelihood per point: one process {one['train_ll']:.12f}, "
        f"sharded {sharded['train_ll']:.12f}",
    ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
