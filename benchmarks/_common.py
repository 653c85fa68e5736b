"""What every benchmark here shares: timing and memory readings on a shared machine, worker
processes, data, and writing results.

Other processes on a small machine distort timings badly (torch's worker threads spin while they
wait for each other, so one busy core can slow a multi-threaded step tenfold). So a timed run first
waits until the machine is quiet, and records how many cores other processes kept busy meanwhile,
with its own CPU time and minor page faults.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "DTYPES",
    "MALLOC_ENV",
    "REPO",
    "RESULTS",
    "LineWorker",
    "Measured",
    "add_quiet_options",
    "append_csv",
    "busy_seconds",
    "fmt_n",
    "machine",
    "mixture_chunks",
    "maxrss_mb",
    "measure",
    "measure_quietly",
    "peak_rss_mb",
    "reexec_with_malloc_env",
    "reset_peak",
    "rss_mb",
    "run_worker",
    "serve_job",
    "settle",
    "synthetic",
    "timed_lanes",
    "wait_until_quiet",
    "write_results",
]

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"float64": torch.float64, "float32": torch.float32}

# glibc otherwise hands large temporaries back to the OS after each use, and a loop over 1M points
# pays hundreds of thousands of page faults per iteration
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31)}

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine() -> str:
    """The processor's model name and per-core L2 size, with the CPU count: timings and their
    ratios here differ between processors more than between runs."""
    model, l2 = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as handle:
            l2 = f", L2 {handle.read().strip()} per core"
    except (OSError, StopIteration):
        pass
    return f"{model}{l2}, {os.cpu_count()} CPUs"


def busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS  # guest time is already counted in user


def wait_until_quiet(threshold: float, max_wait: float, sample: float = 0.25) -> float:
    """Sleep until other processes keep fewer than ``threshold`` cores busy, at most ``max_wait``
    seconds; returns the seconds waited. The pause also lets the worker threads of the previous run
    stop spinning."""
    began = time.perf_counter()
    while True:
        before = busy_seconds()
        if before is None:
            return 0.0
        time.sleep(sample)
        busy = (busy_seconds() - before) / sample  # we are asleep: this is everyone else
        waited = time.perf_counter() - began
        if busy < threshold or waited >= max_wait:
            return waited


def settle(quiet: float, max_wait: float, sample: float = 0.25) -> None:
    """Before a timed run: collect garbage, then wait (at most ``max_wait`` s) until other processes
    keep fewer than ``quiet`` cores busy."""
    gc.collect()
    wait_until_quiet(quiet, max_wait, sample)


def add_quiet_options(parser: argparse.ArgumentParser, quiet: float, max_wait: float) -> None:
    """``--quiet`` and ``--max-wait``, the arguments of ``wait_until_quiet``."""
    parser.add_argument(
        "--quiet",
        type=float,
        default=quiet,
        help="before each timed run, wait until other processes keep fewer than this many cores busy "
        f"(default {quiet:g})",
    )
    parser.add_argument(
        "--max-wait", type=float, default=max_wait, help=f"... but at most this many s (default {max_wait:g})"
    )


class Measured(NamedTuple):
    seconds: float  # wall
    cpu_seconds: float  # this process's CPU time
    minflt: int  # this process's minor page faults
    other_cores: float  # cores other processes kept busy (NaN where unknown)


def measure(fn: Callable[[], Any]) -> tuple[Measured, Any]:
    """Run ``fn`` once; what it cost, and what it returned."""
    ru0, busy0, cpu0 = resource.getrusage(resource.RUSAGE_SELF), busy_seconds(), time.process_time()
    began = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - began
    ru1, busy1, cpu1 = resource.getrusage(resource.RUSAGE_SELF), busy_seconds(), time.process_time()
    other = math.nan
    if busy0 is not None and busy1 is not None:
        # clock ticks are 10 ms: meaningless for very short runs, so clamped to the machine's size
        other = min(max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / seconds, float(os.cpu_count() or 1))
    return Measured(seconds, cpu1 - cpu0, ru1.ru_minflt - ru0.ru_minflt, other), result


def measure_quietly(
    fn: Callable[[], Any], quiet: float, max_wait: float, sample: float = 0.25
) -> tuple[Measured, Any]:
    """``measure(fn)`` once the machine has settled."""
    settle(quiet, max_wait, sample)
    return measure(fn)


# ---- memory ---------------------------------------------------------------------------------


def rss_mb() -> float:
    """The process's resident memory now (MiB; NaN where /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


def maxrss_mb() -> float:
    """The process's peak resident memory so far, ``ru_maxrss`` (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_rss_mb() -> float:
    """Peak resident memory of this process image: VmHWM from /proc/self/status. Not ``ru_maxrss``:
    Linux carries that over fork and exec, so a worker started by a large process would report the
    parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return maxrss_mb()


def reset_peak() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``), so that
    ``ru_maxrss`` measures from now on; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ---- processes ------------------------------------------------------------------------------


def reexec_with_malloc_env(module: str, argv: list[str]) -> None:
    """Re-execute ``python -m module *argv`` with ``MALLOC_ENV`` set, unless it already is: without
    it, temporaries of a pass over 1M points are mapped and unmapped on every use, and the page faults
    dominate the timings of implementations that allocate them per call."""
    if any(os.environ.get(key) != value for key, value in MALLOC_ENV.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], dict(os.environ, **MALLOC_ENV))


def run_worker(module: str, kind: str, tmp: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``python -m module --worker kind --job FILE`` in a fresh process, which answers with
    ``serve_job``; what it returned. Its stderr is passed on; RuntimeError (the last line of its
    stderr) where it failed."""
    job_path, result = tmp / f"{kind}_job.json", tmp / f"{kind}_result.json"
    job_path.write_text(json.dumps({**job, "result": str(result)}))
    command = [sys.executable, "-m", module, "--worker", kind, "--job", str(job_path)]
    done = subprocess.run(command, cwd=REPO, stderr=subprocess.PIPE, text=True, check=False)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1])
    return json.loads(result.read_text())


def serve_job(job_path: str | Path, work: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The worker's side of ``run_worker``: ``work(job)``, written where the job says."""
    job = json.loads(Path(job_path).read_text())
    Path(job["result"]).write_text(json.dumps(work(job)))
    return 0


class LineWorker:
    """A child process that answers each JSON line on its stdin with one JSON line on its stdout."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path | str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd
        )

    def read(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} exited (code {self.proc.poll()})")
        return json.loads(line)

    def ask(self, message: Any) -> Any:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# ---- data and results -----------------------------------------------------------------------


def fmt_n(n: int) -> str:
    """10000 -> "10k", 1000000 -> "1M"."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def synthetic(
    n: int, d: int, k: int, separation: float, seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``make_synthetic``'s points x: (n, d), contiguous float64, and its mixture (weights, means,
    covariances), seeded as ``ppl_gmm.data.load_data`` seeds it."""
    from ppl_gmm.models.gmm import make_synthetic

    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    x, _, truth = make_synthetic(n, d, k, separation, rng)
    return np.ascontiguousarray(x), truth


def append_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` appended to the CSV at ``path`` (columns: the union of both, in order)."""
    import pandas as pd

    from ppl_gmm.runs import write_csv

    frame = pd.DataFrame(rows)
    if path.exists():
        frame = pd.concat([pd.read_csv(path, dtype=str), frame.astype(str)], ignore_index=True)
        frame = frame.replace("nan", "")
    write_csv(path, frame)


def write_results(csv_path: Any, rows: list[dict], lines: list[str]) -> None:
    """``rows`` to ``csv_path`` (columns: every key, in order of first appearance) and ``lines`` to
    the .txt file of the same name; both overwritten."""
    import csv

    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n")


def timed_lanes(blocks: Any, lanes: int, make_steps: Callable[[], list], reps: int = 3) -> tuple[float, list]:
    """Best-of-``reps`` wall seconds of a pass over ``blocks`` by ``lanes`` worker threads (lane i
    takes blocks i, i + lanes, ...; torch kernels single-threaded, as in ppl_gmm's EM), with lane 0's
    seconds per step. ``make_steps()`` gives each lane its steps (and so its own buffers): functions
    called as f(block, the previous step's output; the block for the first)."""
    from concurrent.futures import ThreadPoolExecutor

    def lane(mine: Any) -> list[float]:
        torch.set_num_threads(1)
        steps = make_steps()
        spent = [0.0] * len(steps)
        for block in mine:
            value, t0 = block, time.perf_counter()
            for i, step in enumerate(steps):
                value, t1 = step(block, value), time.perf_counter()
                spent[i], t0 = spent[i] + (t1 - t0), t1
        return spent

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    best: tuple[float, list] = (math.inf, [])
    try:
        for _ in range(reps):
            began = time.perf_counter()
            with ThreadPoolExecutor(lanes) as pool:
                spent = list(pool.map(lane, [blocks[i::lanes] for i in range(lanes)]))[0]
            best = min(best, (time.perf_counter() - began, spent))
    finally:
        torch.set_num_threads(before)
    return best


GEN_CHUNK = 65_536  # rows drawn at a time by mixture_chunks


def mixture_chunks(truth: dict[str, np.ndarray], n: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """n points of the mixture ``truth`` (weights, means, covariances) as (first row, block) in
    blocks of GEN_CHUNK rows, block c from its own generators: each n is a prefix of the larger
    ones, and no more than a block is ever held. The block's array is reused: copy it out."""
    means = truth["means"]
    k, d = means.shape
    chol_t = np.ascontiguousarray(np.linalg.cholesky(truth["covariances"]).transpose(0, 2, 1))
    cdf = np.cumsum(truth["weights"])
    block = np.empty((min(GEN_CHUNK, n), d))
    for c, start in enumerate(range(0, n, GEN_CHUNK)):
        rows = min(GEN_CHUNK, n - start)
        labels_rng = np.random.default_rng(np.random.SeedSequence([seed, 3, c, 0]))
        noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 3, c, 1]))
        labels = np.minimum(np.searchsorted(cdf, labels_rng.random(rows), side="right"), k - 1)
        z = noise_rng.standard_normal((rows, d))
        for j in range(k):
            idx = np.flatnonzero(labels == j)
            block[idx] = z[idx] @ chol_t[j] + means[j]
        yield start, block[:rows]
