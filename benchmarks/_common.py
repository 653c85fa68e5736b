"""Timing on a shared machine, for every benchmark here.

Other processes on a small machine distort timings badly (torch's worker threads spin while they
wait for each other, so one busy core can slow a multi-threaded step tenfold). So a timed run first
waits until the machine is quiet, and records how many cores other processes kept busy meanwhile,
with its own CPU time and minor page faults.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "MALLOC_ENV",
    "Measured",
    "busy_seconds",
    "machine",
    "measure",
    "reexec_with_malloc_env",
    "timed_lanes",
    "wait_until_quiet",
    "write_results",
]

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


def reexec_with_malloc_env(module: str, argv: list[str]) -> None:
    """Re-execute ``python -m module *argv`` with ``MALLOC_ENV`` set, unless it already is: without
    it, temporaries of a pass over 1M points are mapped and unmapped on every use, and the page faults
    dominate the timings of implementations that allocate them per call."""
    if any(os.environ.get(key) != value for key, value in MALLOC_ENV.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], dict(os.environ, **MALLOC_ENV))


def write_results(csv_path: Any, rows: list[dict], lines: list[str]) -> None:
    """``rows`` to ``csv_path`` (columns: every key, in order of first appearance) and ``lines`` to
    the .txt file of the same name; both overwritten."""
    import csv
    from pathlib import Path

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

    import torch

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
