"""What the E-step's normalization costs beyond its exponentials: per entry of a (K, B) block of
log-joints, the bare exp against the whole normalization (peak, shift, floor, exp, sum, log,
scale), eager and through torch.compile. Context: benchmarks/README.md, "em_vs_pomegranate".

    .venv/bin/python -m benchmarks.normalize_cost
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ._common import machine, reexec_with_malloc_env

K, BLOCKS = 16, (4096, 8192, 16384)
OUT = Path(__file__).parent / "results" / "normalize_cost.txt"


def normalize(log_joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As em.e_step_blocks: responsibilities and the block's log-likelihood."""
    peak = log_joint.amax(0)
    floor = math.log(torch.finfo(log_joint.dtype).tiny) + 1.0
    resp = (log_joint - peak).clamp(min=floor).exp()
    norm = resp.sum(0)
    return resp * norm.reciprocal(), (peak + norm.log()).sum()


def ns_per_entry(fn: Callable[[], object], entries: int, seconds: float = 0.5) -> float:
    fn()
    best = math.inf
    for _ in range(5):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            fn()
            reps += 1
        best = min(best, (time.perf_counter() - start) / reps)
    return 1e9 * best / entries


def main() -> None:
    reexec_with_malloc_env("benchmarks.normalize_cost", [])  # temporaries reused, not re-mapped
    torch.set_num_threads(1)
    compiled = torch.compile(normalize, dynamic=False)
    lines = [f"normalize_cost: K={K}, one thread; ns per entry, best of 5; {machine()}"]
    lines.append(f"{'dtype':8} {'B':>6} {'exp':>6} {'eager':>6} {'compiled':>8}  eager/exp")
    for dtype in (torch.float64, torch.float32):
        for block in BLOCKS:
            log_joint = torch.randn(K, block, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 20
            entries = K * block
            exp = ns_per_entry(lambda: log_joint.exp(), entries)  # noqa: B023
            eager = ns_per_entry(lambda: normalize(log_joint), entries)  # noqa: B023
            fused = ns_per_entry(lambda: compiled(log_joint), entries)  # noqa: B023
            name = str(dtype).removeprefix("torch.")
            lines.append(f"{name:8} {block:6} {exp:6.2f} {eager:6.2f} {fused:8.2f}  {eager / exp:5.2f}x")
    OUT.write_text("\n".join(lines) + "\n")
    print(*lines, sep="\n")


if __name__ == "__main__":
    main()
