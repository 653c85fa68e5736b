"""Sharded runs over torch.distributed: the process group from the launcher's environment
(``torchrun``, or ``srun`` under Slurm), each rank's contiguous share of the rows, and the sums
that the ranks add up.

One process (no ``WORLD_SIZE``, or 1) is the default and costs nothing: no process group exists
and nothing here is called. With R > 1 ranks, every rank runs the same experiment on its own
rows; sums over rows (EM's sufficient statistics, log-likelihoods, k-means++'s D² totals) are
all-reduced, so every rank holds the same parameters; rank 0 alone writes.

Collectives travel as tensors only (strings as UTF-8 bytes): nothing is pickled. A rank that
dies or stops answering turns the next collective on the others into a ``RankLost`` error, after
at most the process group's timeout (``PPL_GMM_DIST_TIMEOUT`` seconds, default 300).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use: `python -m ppl_gmm --help` needs only the standard library
    import torch
    from torch import Tensor

__all__ = [
    "RankLost",
    "World",
    "agree",
    "all_max",
    "all_sum",
    "broadcast_text",
    "broadcast_tensor",
    "gather_rows",
    "launch",
    "row_counts",
    "shard_range",
    "sharded",
    "world",
    "world_from_env",
]

DEFAULT_PORT = 29500
TIMEOUT_SECONDS = 300.0  # long enough for rank 0's hashing of a large train split before the fit


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size``, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0


def world_from_env(env: Mapping[str, str] | None = None) -> World:
    """The launcher's ranks: torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; else, inside an
    ``srun`` step (``SLURM_STEP_NUM_TASKS`` set: a batch script's own process is one process, even
    with ``--ntasks``), Slurm's ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return World(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        size = int(env.get("SLURM_NTASKS", env["SLURM_STEP_NUM_TASKS"]))
        return World(int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", "0")))
    return World()


_WORLD = World()  # set by ``launch`` while a process group is up


def world() -> World:
    """The ranks of the running sharded run; ``World()`` (rank 0 of 1) otherwise."""
    return _WORLD


def sharded() -> bool:
    return _WORLD.size > 1


class RankLost(RuntimeError):
    """Another rank died or stopped answering: the sharded run cannot go on."""


def _rendezvous_env(env: Mapping[str, str]) -> dict[str, str]:
    """``MASTER_ADDR`` and ``MASTER_PORT`` where the launcher set none (srun): 127.0.0.1 (one
    node; several nodes need ``MASTER_ADDR`` exported) and a port derived from the job id, so
    that two jobs on one node do not collide."""
    job = env.get("SLURM_JOB_ID", "")
    port = DEFAULT_PORT + int(job) % 20000 if job.isdigit() else DEFAULT_PORT
    return {
        "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT", str(port)),
    }


@contextmanager
def process_group(here: World) -> Iterator[None]:
    """A process group over ``here``'s ranks for the duration: gloo for CPU tensors, NCCL for
    CUDA ones (each rank on GPU ``local_rank``), torn down at the end."""
    import torch
    import torch.distributed as dist

    global _WORLD
    os.environ.update(_rendezvous_env(os.environ))
    os.environ.update({"RANK": str(here.rank), "WORLD_SIZE": str(here.size)})
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(here.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    seconds = float(os.environ.get("PPL_GMM_DIST_TIMEOUT", TIMEOUT_SECONDS))
    dist.init_process_group(backend, rank=here.rank, world_size=here.size, timeout=timedelta(seconds=seconds))
    _WORLD = here
    try:
        yield
    finally:
        _WORLD = World()
        dist.destroy_process_group()


def launch(main: Callable[[Sequence[str] | None], int], argv: Sequence[str]) -> int:
    """``main(argv)`` in every rank of the launcher's world: directly for one process; else
    inside a process group, for ``run`` alone, with stdout silenced on ranks other than 0 (the
    experiment directory's path is the same on every rank, and rank 0 prints it)."""
    here = world_from_env()
    if here.size <= 1:
        return main(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command != "run":
        if here.rank == 0:
            print(
                f"error: expected `ppl-gmm run` under a launcher of {here.size} ranks, but found "
                f"{command!r}. Run other commands in one process.",
                file=sys.stderr,
            )
        return 2
    with process_group(here):
        if here.rank == 0:
            return main(argv)
        with open(os.devnull, "w") as quiet, _stdout(quiet):
            return main(argv)


@contextmanager
def _stdout(stream: object) -> Iterator[None]:
    before = sys.stdout
    sys.stdout = stream  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = before


# ---- shares and collectives ----------------------------------------------------------------------


def shard_range(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """Rows [start, stop) of ``n`` that ``rank`` of ``size`` (default: this one's) holds:
    contiguous shares whose sizes differ by at most one, in rank order."""
    rank = _WORLD.rank if rank is None else rank
    size = _WORLD.size if size is None else size
    return n * rank // size, n * (rank + 1) // size


@contextmanager
def _collective() -> Iterator[None]:
    """A failed collective (a peer closed its connection, or the timeout passed) as ``RankLost``.

    From then on SIGTERM is ignored: torchrun sends it to the surviving ranks as soon as one
    dies, and this rank is ending anyway, once it has recorded the failure (torchrun waits 30 s
    before SIGKILL)."""
    try:
        yield
    except (RuntimeError, ValueError) as exc:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        detail = " ".join(str(exc).split())[:200]
        raise RankLost(
            f"another rank of the sharded run ({_WORLD.size} ranks) died or stopped answering: {detail}"
        ) from None


def _wire(like: Tensor | None = None) -> torch.device:
    """The device collectives run on: the tensor's, else the GPU under NCCL, else the CPU."""
    import torch

    if like is not None:
        return like.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def all_sum(tensors: Sequence[Tensor] = (), values: Sequence[float] = ()) -> list[float]:
    """Sum ``tensors`` over the ranks in place (one all-reduce, in float64 whatever their dtype)
    and return the sums of the float ``values``. Every rank gets the same bits."""
    import torch
    import torch.distributed as dist

    device = _wire(tensors[0] if tensors else None)
    parts = [t.reshape(-1).to(torch.float64) for t in tensors]
    parts.append(torch.tensor(list(values), dtype=torch.float64, device=device))
    flat = torch.cat(parts)
    with _collective():
        dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return flat[offset:].tolist()


def all_max(value: Tensor) -> Tensor:
    """The elementwise maximum of ``value`` over the ranks (a new tensor)."""
    import torch.distributed as dist

    out = value.clone()
    with _collective():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def row_counts(n: int) -> list[int]:
    """Every rank's ``n`` (rows held), in rank order."""
    import torch

    return [int(v) for v in gather_rows(torch.tensor([n], dtype=torch.int64, device=_wire()))]


def gather_rows(rows: Tensor) -> Tensor:
    """The ranks' ``rows`` (n_r, ...) stacked in rank order: (Σ n_r, ...) on every rank."""
    import torch
    import torch.distributed as dist

    sizes = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    every = [torch.empty_like(sizes) for _ in range(_WORLD.size)]
    with _collective():
        dist.all_gather(every, sizes)
    counts = [int(c) for c in every]
    width = max(counts)
    padded = rows.new_zeros((width, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(_WORLD.size)]
    with _collective():
        dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def broadcast_tensor(value: Tensor, source: int = 0) -> Tensor:
    """``value`` as rank ``source`` holds it (same shape and dtype on every rank)."""
    import torch.distributed as dist

    out = value.contiguous().clone()
    with _collective():
        dist.broadcast(out, source)
    return out


def _encode(text: str) -> Tensor:
    import torch

    return torch.tensor(list(text.encode()), dtype=torch.uint8, device=_wire())


def broadcast_text(text: str, source: int = 0) -> str:
    """The string that rank ``source`` holds (the others pass anything)."""
    import torch

    size = broadcast_tensor(torch.tensor([len(text.encode())], dtype=torch.int64, device=_wire()), source)
    data = (
        _encode(text) if _WORLD.rank == source else torch.zeros(int(size), dtype=torch.uint8, device=_wire())
    )
    return bytes(broadcast_tensor(data, source).tolist()).decode()


def agree(error: Exception | None) -> str | None:
    """The message of the lowest rank's ``error``, on every rank, or None when no rank had one:
    ranks that check their own rows fail together, with one message, before any other collective."""
    import torch

    text = "" if error is None else str(error) or type(error).__name__
    encoded = _encode(text)
    lengths = gather_rows(torch.tensor([encoded.numel()], dtype=torch.int64, device=_wire()))
    joined = bytes(gather_rows(encoded).tolist())
    offset = 0
    for length in lengths.tolist():
        if length:
            return joined[offset : offset + length].decode()
        offset += length
    return None
