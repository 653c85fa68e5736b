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
import time
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Measured", "busy_seconds", "machine", "measure", "wait_until_quiet"]

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
