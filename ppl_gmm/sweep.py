"""Sweeps: one experiment per point of the Cartesian product of grid values and seeds, run by a
local process pool or as a Slurm job array (through submitit), all in one sweep directory:

    <runs>/<experiment>-sweep-<stamp>/
        config.yaml     the base config (its overrides applied), which every point starts from
        sweep.json      the grid, the seeds, the launcher and its resources
        manifest.csv    one row per point: its grid values, seed, state, experiment directory
        <experiment>-p000-<stamp>/ ...   each point's experiment directory
        aggregate.csv   per grid point and backend, each metric over seeds (``compare``)

A point's state is ``pending``, ``running``, ``finished`` (its experiment directory holds every
backend's summary; ``failed_backends`` names those whose fit failed) or ``failed`` (the run
raised or its process or job died). ``--resume`` runs again only the points that did not finish:
what a finished point wrote is kept, and a point whose experiment directory is complete counts as
finished even if the sweep itself was killed before it could record it.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import multiprocessing.forkserver
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from pydantic import ValidationError
from threadpoolctl import threadpool_limits

from .config import Config, LauncherConfig, dump_config, format_validation_error, parse_config
from .errors import UserError
from .runs import Files, create_experiment_dir, read_summary, write_csv, write_json, write_text

__all__ = [
    "MANIFEST",
    "SLURM_LOGS",
    "SWEEP",
    "Point",
    "Sweep",
    "is_sweep",
    "load_sweep",
    "parse_grid",
    "parse_seeds",
    "run_point",
    "run_points",
    "sweep",
]

SWEEP = "sweep.json"
MANIFEST = "manifest.csv"
SLURM_LOGS = "slurm"  # the Slurm launcher's folder of job logs in a sweep directory
STATES = ("pending", "running", "finished", "failed")
POLL_SECONDS = 1.0  # how often the Slurm launcher asks after its jobs
# Slurm's states of a job that ended without finishing its work
DEAD = ("CANCELLED", "TIMEOUT", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


# ---- the points -------------------------------------------------------------------------------


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["model.k=2,3", "init.method=kmeans,kmeans++"]`` → {key: [value texts]}, in order; each
    value is read as YAML when the point's config is built, as a KEY=VALUE override is."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        values = [value.strip() for value in text.split(",")]
        if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or not text or not all(values):
            raise UserError(f"--grid: expected KEY=V1,V2,... (e.g. model.k=2,3,4), but found {item!r}.")
        if key in grid:
            raise UserError(f"--grid: {key} is given twice; list all its values in one --grid.")
        if key == "seed":
            raise UserError("--grid: seed is swept by --seeds A..B, not by --grid.")
        if len(set(values)) != len(values):
            raise UserError(f"--grid: {key} repeats a value in {text!r}.")
        grid[key] = values
    return grid


def parse_seeds(text: str) -> list[int]:
    """``"0..4"`` → [0, 1, 2, 3, 4]; a single number is a range of one."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?", text)
    if not match or int(match[2] or match[1]) < int(match[1]):
        raise UserError(f"--seeds: expected a range A..B with A <= B (e.g. 0..4), but found {text!r}.")
    return list(range(int(match[1]), int(match[2] or match[1]) + 1))


@dataclass(frozen=True)
class Point:
    index: int
    values: dict[str, str]  # grid key → value text
    seed: int

    @property
    def name(self) -> str:
        return f"p{self.index:03d}"

    def overrides(self, experiment: str) -> list[str]:
        """The KEY=VALUE overrides that make the base config this point's."""
        grid = [f"{key}={value}" for key, value in self.values.items()]
        return [*grid, f"seed={self.seed}", f"experiment={experiment}-{self.name}"]


def points_of(grid: dict[str, list[str]], seeds: Sequence[int]) -> list[Point]:
    """Every grid combination (the first key slowest) times every seed (fastest)."""
    combos = list(product(*grid.values())) if grid else [()]
    return [
        Point(i, dict(zip(grid, combo, strict=True)), seed)
        for i, (combo, seed) in enumerate((c, s) for c in combos for s in seeds)
    ]


# ---- the sweep directory ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """A sweep directory as written: its base config (raw, as YAML), grid, seeds, launcher."""

    path: Path
    config: dict[str, Any]
    grid: dict[str, list[str]]
    seeds: list[int]
    launcher: str
    jobs: int
    resources: LauncherConfig

    @property
    def experiment(self) -> str:
        return str(self.config.get("experiment", "experiment"))

    @property
    def points(self) -> list[Point]:
        return points_of(self.grid, self.seeds)

    def point_config(self, point: Point) -> Config:
        return parse_config(self.config, point.overrides(self.experiment))


def is_sweep(path: Path) -> bool:
    return (path / SWEEP).is_file() and (path / MANIFEST).is_file()


def load_sweep(path: Path) -> Sweep:
    if not is_sweep(path):
        raise UserError(f"{path}: not a sweep directory (no {SWEEP} and {MANIFEST} in it).")
    try:
        meta = yaml.safe_load((path / SWEEP).read_text(encoding="utf-8"))
        config = yaml.safe_load((path / Files.CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read the sweep ({exc}).") from None
    return Sweep(
        path,
        config,
        {key: [str(v) for v in values] for key, values in meta["grid"].items()},
        [int(seed) for seed in meta["seeds"]],
        str(meta["launcher"]),
        int(meta["jobs"]),
        LauncherConfig.model_validate(meta.get("resources") or {}),
    )


_TEXT = ("experiment", "failed_backends", "error", "job_id")  # the manifest's text columns


def read_manifest(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(
        path / MANIFEST,
        dtype={column: str for column in _TEXT},
        keep_default_na=False,
        na_values={"seconds": [""]},
    )
    for column in _TEXT:
        if column not in frame:
            frame[column] = ""
    return frame


def _new_manifest(sweep: Sweep) -> pd.DataFrame:
    rows = [
        {
            "point": point.index,
            **point.values,
            "seed": point.seed,
            "state": "pending",
            "experiment": "",
            "failed_backends": "",
            "seconds": float("nan"),
            "error": "",
            "job_id": "",
        }
        for point in sweep.points
    ]
    return pd.DataFrame(rows)


def complete_experiment(sweep: Sweep, point: Point) -> Path | None:
    """The point's experiment directory that holds every backend's summary, if any (the newest)."""
    backends = list(sweep.point_config(point).backends)
    prefix = f"{sweep.experiment}-{point.name}-"
    for candidate in sorted(sweep.path.glob(f"{prefix}*"), reverse=True):
        if candidate.is_dir() and all(read_summary(candidate / name) for name in backends):
            return candidate
    return None


# ---- one point --------------------------------------------------------------------------------


def run_point(sweep_dir: str, index: int, threads: int | None = None) -> dict[str, Any]:
    """Run one point of the sweep in ``sweep_dir`` into its own experiment directory there; what
    a local worker and a Slurm job both run. Returns the manifest's fields for the point; an error
    is returned as ``failed``, never raised (a raised error would lose the point's message)."""
    from .experiment import Silent, execute, prepare

    began = time.perf_counter()
    try:
        sweep = load_sweep(Path(sweep_dir))
        point = sweep.points[index]
        cfg = sweep.point_config(point)
        if threads is not None and cfg.threads is None:
            cfg = cfg.model_copy(update={"threads": threads})
        outcome = execute(prepare(cfg), sweep.path, Silent())
    except Exception as exc:  # the point failed; the sweep goes on and records why
        detail = str(exc) if isinstance(exc, UserError) else traceback.format_exception_only(exc)[-1]
        return {"state": "failed", "error": " ".join(detail.split()), "seconds": time.perf_counter() - began}
    return {
        "state": "finished",
        "experiment": outcome.path.name,
        "failed_backends": " ".join(outcome.failed),
        "seconds": time.perf_counter() - began,
        "error": "",
    }


# ---- the launchers ----------------------------------------------------------------------------

Record = Callable[[int, dict[str, Any]], None]


_slot: Any = None  # each local worker's index, from the pool's shared counter
_limits: Any = None  # each local worker's thread-pool limits, kept for its lifetime


def _claim_slot(counter: Any, cores: list[int], jobs: int) -> None:
    """A local worker's start: take the next slot and pin this process to its share of the cores."""
    global _slot
    with counter.get_lock():
        _slot = counter.value
        counter.value += 1
    share = cores[_slot % jobs :: jobs] if len(cores) >= jobs else cores
    if hasattr(os, "sched_setaffinity") and share:
        os.sched_setaffinity(0, share)
    # NumPy's and SciPy's BLAS and OpenMP pools were sized for the whole machine when the fork
    # server imported them: without a limit each worker's would oversubscribe its share (each
    # point ~1.4× slower with 2 workers on 2 cores)
    global _limits
    _limits = threadpool_limits(max(1, len(share)))


def _local(sweep: Sweep, todo: list[int], record: Record) -> None:
    """A pool of ``jobs`` processes, each pinned to its share of the cores and given that many
    torch threads; one job runs the points in this process, one after another. The workers fork
    from a fork server that imported the package once (not from this process, whose torch thread
    pools may already run: a fork would copy their locks)."""
    jobs = min(sweep.jobs, len(todo))
    if jobs == 1:
        for index in todo:
            record(index, {"state": "running"})
            record(index, run_point(str(sweep.path), index))
        return
    cores = (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )
    threads = max(1, len(cores) // jobs)
    context = _fork_server()
    counter = context.Value("i", 0)
    with futures.ProcessPoolExecutor(jobs, context, _claim_slot, (counter, cores, jobs)) as pool:
        pending = {pool.submit(run_point, str(sweep.path), index, threads): index for index in todo}
        for index in todo:
            record(index, {"state": "running"})
        try:
            for done in futures.as_completed(pending):
                index = pending[done]
                try:
                    record(index, done.result())
                except futures.process.BrokenProcessPool as exc:
                    record(index, {"state": "failed", "error": f"its worker process died ({exc})"})
        except BaseException:  # interrupted: stop the running points too, not wait for them
            workers = getattr(pool, "_processes", None) or {}  # the executor's own; no public handle
            for worker in list(workers.values()):
                worker.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _slurm(sweep: Sweep, todo: list[int], record: Record) -> None:
    """One Slurm job array through submitit, logs per job under ``slurm/``; polled until every job
    ends. A job that dies without a result (cancelled, out of time, killed) is recorded failed."""
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--launcher slurm needs submitit: pip install 'ppl-gmm[slurm]' (or pip install submitit)."
        ) from None
    resources = sweep.resources
    executor = submitit.SlurmExecutor(folder=sweep.path / SLURM_LOGS / "%j", max_num_timeout=0)
    parameters: dict[str, Any] = {
        "time": resources.time_min,
        "cpus_per_task": resources.cpus,
        "ntasks_per_node": 1,
        "array_parallelism": sweep.jobs,
        "job_name": f"{sweep.experiment}-sweep",
    }
    if resources.partition is not None:
        parameters["partition"] = resources.partition
    if resources.mem_gb is not None:
        parameters["mem"] = f"{int(resources.mem_gb * 1024)}M"
    if resources.gpus:
        parameters["gpus_per_node"] = resources.gpus
    executor.update_parameters(**parameters)
    size = resources.points_per_job
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    try:
        jobs = executor.map_array(
            run_points, [str(sweep.path)] * len(chunks), chunks, [resources.cpus] * len(chunks)
        )
    except Exception as exc:  # sbatch refused the array: nothing ran
        raise UserError(
            f"--launcher slurm: the job array was not accepted ({' '.join(str(exc).split())})."
        ) from None
    waiting = dict(enumerate(jobs))
    for chunk, job in zip(chunks, jobs, strict=True):
        for index in chunk:
            record(index, {"state": "running", "job_id": job.job_id})
    try:
        while waiting:
            for number, job in list(waiting.items()):
                if not job.done():
                    continue
                del waiting[number]
                state = str(job.state)
                try:
                    if state.startswith(DEAD) and not job.paths.result_pickle.exists():
                        # no result will come: do not wait out submitit's grace for a late file
                        raise RuntimeError("Slurm ended it without a result")
                    results = job.result()
                except Exception as exc:  # the job ended without a result: cancelled, timed out, killed
                    detail = " ".join(str(exc).split())[:300]
                    error = f"job {job.job_id} {state}: {detail}"
                    results = [_after_death(sweep, index, error) for index in chunks[number]]
                for index, fields in zip(chunks[number], results, strict=True):
                    record(index, fields)
            if waiting:
                time.sleep(POLL_SECONDS)
    except BaseException:
        for job in waiting.values():
            job.cancel(check=False)
        raise


def run_points(sweep_dir: str, indices: Sequence[int], threads: int | None = None) -> list[dict[str, Any]]:
    """``run_point`` for each of ``indices``, one after another: one Slurm job's share."""
    return [run_point(sweep_dir, index, threads) for index in indices]


def _after_death(sweep: Sweep, index: int, error: str) -> dict[str, Any]:
    """A point of a job that died: finished if its experiment was complete by then, else failed."""
    done = complete_experiment(sweep, sweep.points[index])
    if done is not None:
        return {"state": "finished", "experiment": done.name}
    return {"state": "failed", "error": error}


def _fork_server() -> Any:
    """The fork-server context, its server importing the package up front (started early by
    ``_run``, it imports while the sweep checks its points)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ppl_gmm.experiment", "ppl_gmm.sweep"])
    return context


LAUNCHERS: dict[str, Callable[[Sweep, list[int], Record], None]] = {"local": _local, "slurm": _slurm}


# ---- the command ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    path: Path
    manifest: pd.DataFrame
    aggregate: pd.DataFrame


def sweep(
    raw: dict[str, Any],
    grid: dict[str, list[str]],
    seeds: Sequence[int],
    runs_dir: Path,
    launcher: str = "local",
    jobs: int = 1,
    resources: dict[str, Any] | None = None,
    message: Callable[[str], None] = lambda text: None,
    name: str = "sweep",
) -> SweepResult:
    """Check every point's config (and prepare one per grid combination: its data, model, start),
    write the sweep directory, run the points, aggregate. ``raw``: the base config as read, its
    KEY=VALUE overrides applied; ``resources`` override its ``launcher:`` block; the directory is
    ``<runs_dir>/<experiment>-<name>-<stamp>``."""
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher: expected one of {', '.join(LAUNCHERS)}, but found {launcher!r}.")
    if jobs < 1:
        raise UserError(f"--jobs: expected at least 1, but found {jobs}.")
    base = parse_config(raw)
    given = {key: value for key, value in (resources or {}).items() if value is not None}
    try:
        settings = LauncherConfig.model_validate({**base.launcher.model_dump(), **given})
    except ValidationError as err:  # a flag's value: name the flag with the field
        where, _, what = format_validation_error(err, LauncherConfig, "launcher").partition(":")
        flag = "--" + where.removeprefix("launcher.").replace("_", "-")
        raise UserError(f"{flag} ({where}):{what}") from None
    config = yaml.safe_load(dump_config(base))
    draft = Sweep(Path("."), config, grid, list(seeds), launcher, jobs, settings)
    _start_workers(draft)
    _check_points(draft, message)
    path = create_experiment_dir(runs_dir, f"{base.experiment}-{name}")
    write_text(path / Files.CONFIG, dump_config(base))
    meta = {
        "grid": grid,
        "seeds": list(seeds),
        "launcher": launcher,
        "jobs": jobs,
        "resources": settings.model_dump(),
    }
    write_json(path / SWEEP, meta)
    made = Sweep(path, config, grid, list(seeds), launcher, jobs, settings)
    write_csv(path / MANIFEST, _new_manifest(made))
    return _run(made, message)


def resume(path: Path, message: Callable[[str], None] = lambda text: None) -> SweepResult:
    """Run again the points of the sweep in ``path`` that did not finish."""
    return _run(load_sweep(path), message)


def _start_workers(sweep: Sweep) -> None:
    """Start the local pool's fork server now, so that its imports overlap the checks."""
    if sweep.launcher == "local" and sweep.jobs > 1:
        _fork_server()
        multiprocessing.forkserver.ensure_running()


def _check_points(sweep: Sweep, message: Callable[[str], None]) -> None:
    """Every point's config parses; one point per grid combination is prepared (its data, model
    and start: what a seed cannot break), so a bad value stops the sweep before anything is
    written."""
    from .experiment import prepare

    first_seed = sweep.seeds[0]
    for point in sweep.points:
        try:
            cfg = sweep.point_config(point)
        except UserError as exc:
            raise UserError(f"{_describe(point)}: {exc}") from None
        if point.seed == first_seed:
            message(f"checking {_describe(point)}")
            try:
                prepare(cfg)
            except UserError as exc:
                raise UserError(f"{_describe(point)}: {exc}") from None


def _describe(point: Point) -> str:
    values = ", ".join(f"{key}={value}" for key, value in point.values.items())
    return f"point {point.name} ({values + ', ' if values else ''}seed {point.seed})"


def _run(sweep: Sweep, message: Callable[[str], None]) -> SweepResult:
    from .aggregate import aggregate_sweep

    _start_workers(sweep)
    manifest = read_manifest(sweep.path)
    points = sweep.points
    todo = []
    for point in points:
        row = manifest.index[manifest["point"] == point.index][0]
        if manifest.at[row, "state"] == "finished":
            continue
        done = complete_experiment(sweep, point)
        if done is not None:  # it finished, but the sweep was stopped before it could record so
            manifest.loc[row, ["state", "experiment"]] = ["finished", done.name]
            continue
        todo.append(point.index)
    write_csv(sweep.path / MANIFEST, manifest)
    total, started = len(points), time.perf_counter()
    finished = total - len(todo)
    if finished:
        message(f"{finished} of {total} points already finished; running the other {len(todo)}")

    def record(index: int, fields: dict[str, Any]) -> None:
        nonlocal finished
        row = manifest.index[manifest["point"] == index][0]
        for key, value in fields.items():
            manifest.at[row, key] = value
        write_csv(sweep.path / MANIFEST, manifest)
        if fields.get("state") in ("finished", "failed"):
            finished += 1
            point = points[index]
            how = fields["state"] if not fields.get("error") else f"failed: {fields['error']}"
            message(f"[{finished}/{total}] {_describe(point)} {how} ({time.perf_counter() - started:.1f} s)")

    if todo:
        try:
            LAUNCHERS[sweep.launcher](sweep, todo, record)
        finally:
            running = manifest["state"] == "running"
            if running.any():  # interrupted: what did not end is not finished
                manifest.loc[running, "state"] = "failed"
                manifest.loc[running, "error"] = "interrupted"
                write_csv(sweep.path / MANIFEST, manifest)
    table = aggregate_sweep(sweep.path)
    return SweepResult(sweep.path, manifest, table)


def finished_runs(sweep: Sweep, manifest: pd.DataFrame) -> Iterator[tuple[Point, Path]]:
    """Each finished point and its experiment directory."""
    points = sweep.points
    for _, row in manifest[manifest["state"] == "finished"].iterrows():
        path = sweep.path / str(row["experiment"])
        if path.is_dir():
            yield points[int(row["point"])], path
