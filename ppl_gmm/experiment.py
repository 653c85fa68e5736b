"""run(cfg): data → model → init → each backend → evaluate → the experiment directory.

``prepare`` checks everything that can be checked before fitting and writes nothing;
``execute`` fits and writes. A failing backend is recorded as ``failed`` and the others still run;
an interruption records the running backend as ``interrupted`` and keeps everything finished.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import numpy as np
import pandas as pd
import pyro
import torch
from pydantic import BaseModel, ValidationError

from . import __version__, distributed
from .backends import BACKENDS, Backend, FitResult, Options, StepInfo
from .backends.base import one_line
from .config import Config, dump_config, format_validation_error
from .data import Dataset, Simulator, check_sequence_lengths, load_data
from .errors import UserError
from .evaluate import assignments, parameter_errors, score
from .init import initialize
from .models import MODELS, LatentModel, Params
from .runs import Files, Summary, create_experiment_dir
from .runs import save_tensors as _save_tensors
from .runs import write_csv as _write_csv
from .runs import write_json as _write_json
from .runs import write_summary as _write_summary
from .runs import write_text as _write_text

M = TypeVar("M", bound=BaseModel)
P = ParamSpec("P")


def _writes() -> bool:
    """Whether this process writes the experiment directory: the only process, or rank 0 of a
    sharded run (the other ranks fit and score alike, and write nothing)."""
    return distributed.world().rank == 0


def _rank0(write: Callable[P, None]) -> Callable[P, None]:
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        if _writes():
            write(*args, **kwargs)

    return guarded


save_tensors, write_csv, write_json = _rank0(_save_tensors), _rank0(_write_csv), _rank0(_write_json)
write_summary, write_text = _rank0(_write_summary), _rank0(_write_text)

__all__ = [
    "Interrupted",
    "Outcome",
    "Plan",
    "Progress",
    "Silent",
    "auto_threads",
    "execute",
    "prepare",
    "run",
    "simulator",
    "target_of",
    "torch_threads",
]


class Progress(Protocol):
    """Where long work reports itself; the command line draws it on stderr."""

    def begin(self, backend: str, restart: int, total: int | None) -> None: ...
    def step(self, info: StepInfo) -> None: ...
    def end(self) -> None: ...
    def message(self, text: str) -> None: ...


class Silent:
    """No progress, no messages; override ``message`` to show warnings some other way."""

    def begin(self, backend: str, restart: int, total: int | None) -> None:
        pass

    def step(self, info: StepInfo) -> None:
        pass

    def end(self) -> None:
        pass

    def message(self, text: str) -> None:
        pass


@dataclass(frozen=True)
class Plan:
    """Everything an experiment needs, checked: the resolved config, data, model and inits."""

    config: Config
    data: Dataset
    model: LatentModel
    backends: tuple[tuple[str, Backend[Any], Options], ...]
    inits: tuple[Params, ...]
    device: torch.device
    dtype: torch.dtype
    threads: int = 1  # torch threads of each backend whose options set none (config's threads)


@dataclass(frozen=True)
class Outcome:
    path: Path
    summaries: Mapping[str, Summary]

    @property
    def failed(self) -> list[str]:
        return [name for name, s in self.summaries.items() if s.status == "failed"]


class Interrupted(Exception):
    """The run was interrupted; what finished is saved under ``path``."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"interrupted; results so far are in {path}")
        self.path = path
        self.backend: str = ""
        self.run: Any = None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for, but no GPU is available here. Use cpu or auto.")
    return torch.device(name)


def _resolve_backends(
    cfg: Config, model_cls: type[LatentModel]
) -> tuple[tuple[str, Backend[Any], Options], ...]:
    """Every backend's options validated, and the model's own fields filled in or refused."""
    resolved = []
    for name, raw in cfg.backends.items():
        backend = BACKENDS.get(name, field=f"backends.{name}")()
        if not isinstance(raw, Mapping):
            raise UserError(f"backends.{name}: expected a mapping of options, but found {raw!r}.")
        try:
            options = backend.options.model_validate(dict(raw))
        except ValidationError as err:
            raise UserError(format_validation_error(err, backend.options, f"backends.{name}")) from None
        resolved.append((name, backend, _model_fields(options, model_cls, f"backends.{name}")))
    return tuple(resolved)


MODEL_FIELDS = ("reg_covar",)  # options that only some models use (``backend_fields``)


def _model_fields(options: M, model_cls: type[LatentModel], where: str) -> M:
    """``options`` with each model-specific field (``MODEL_FIELDS``) set to the model's default
    where the model uses it and left unset, and refused where the model does not use it."""
    update = {}
    for field in MODEL_FIELDS:
        if field not in type(options).model_fields:
            continue
        value = getattr(options, field)
        if field in model_cls.backend_fields:
            if value is None:
                update[field] = model_cls.backend_fields[field]
        elif value is not None:
            users = ", ".join(name for name in MODELS if field in MODELS.get(name).backend_fields)
            raise UserError(
                f"{where}.{field}: model {model_cls.name!r} has no use for {field} (an option of "
                f"{users}); remove it."
            )
    return options.model_copy(update=update) if update else options


def simulator(cfg: Config, model_cls: type[LatentModel]) -> Simulator:
    """Draws synthetic data from the model itself: a random truth of ``data.k`` components."""

    def simulate(
        n: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor], np.ndarray | None]:
        truth_model = model_cls.for_simulation(cfg.model.model_copy(update={"k": cfg.data.k}), cfg.data.dim)
        lengths = None
        if model_cls.sequential:
            size = cfg.data.sequence_length or n
            lengths = np.full(n // size, size, dtype=np.int64)
            if n % size:
                lengths = np.append(lengths, n % size)
            truth_model = truth_model.bind(lengths)
        truth = truth_model.sample_truth(rng, cfg.data.separation)
        x, labels = truth_model.simulate(truth, n, rng)
        return x.numpy(), labels.numpy(), truth, lengths

    return simulate


def prepare(cfg: Config, data: Dataset | None = None) -> Plan:
    """Load the data, build the model, resolve options and draw the initial parameters.
    ``data``, when given, is used as it is instead of ``cfg.data`` (the Python estimator's arrays).

    Raises ``UserError`` for anything wrong with the config or data; writes nothing.
    """
    device = _device(cfg.device)
    dtype = {"float64": torch.float64, "float32": torch.float32}[cfg.dtype]
    model_cls = MODELS.get(cfg.model.name, field="model.name")
    backends = _resolve_backends(cfg, model_cls)
    if distributed.sharded():
        _check_sharded(cfg, backends)
    init_cfg = _model_fields(cfg.init, model_cls, "init")
    if cfg.data.standardize and not model_cls.standardizable:
        raise UserError(
            f"data.standardize: model {model_cls.name!r} needs the data's own values (its support is "
            "not the real line), which z-scores would change. Set data.standardize: false."
        )
    if data is None:
        try:
            data_seed = cfg.seed if cfg.data.seed is None else cfg.data.seed
            data = load_data(
                cfg.data, data_seed, simulator(cfg, model_cls), model_cls.check_data, distributed.world()
            )
        except MemoryError:
            raise UserError("data: not enough memory to hold the data. Lower data.n or data.dim.") from None
    n_train = data.n_train
    if cfg.model.k > n_train:
        raise UserError(
            f"model.k: {cfg.model.k} components need at least as many train points, but the data "
            f"have {n_train}. Lower model.k or data.test_fraction."
        )
    if cfg.data.sequence_length is not None and not model_cls.sequential:
        raise UserError(
            f"data.sequence_length: model {model_cls.name!r} draws independent points, not sequences; "
            "set it to null."
        )
    if model_cls.sequential and data.train_lengths is None and data.test is not None:
        raise UserError(
            f"data.test_fraction: model {model_cls.name!r} reads the rows as one sequence (no "
            "data.sequence_column or data.lengths_path), which a random test split would cut. Set "
            "data.test_fraction: 0, or give the sequences."
        )
    if model_cls.sequential and data.train_lengths is not None:
        check_sequence_lengths(
            data.train_lengths, 2, f"the transitions of model {model_cls.name!r} need 2 rows per sequence"
        )
    model = model_cls.from_config(cfg.model, data.train).bind(data.train_lengths)
    for _, backend, options in backends:
        backend.check(model, options)
    x = data.train.to(device)
    inits = tuple(
        {
            name: value.to("cpu", torch.float64)
            for name, value in initialize(model, x, init_cfg, cfg.seed, r).items()
        }
        for r in range(cfg.init.n_init)
    )
    try:
        # the first use of torch's linear algebra and distributions initializes them lazily:
        # done here, it is not charged to the first backend's timings
        model.bind(None).log_likelihood(x[:2].to(torch.float64), inits[0])
        log_prior = float(model.log_prior(inits[0]))
    except (torch.linalg.LinAlgError, ValueError) as exc:
        raise UserError(
            f"init: the initial parameters cannot be scored ({one_line(exc)}). "
            "Raise init.reg_covar or set data.standardize: true."
        ) from None
    if not math.isfinite(log_prior):
        raise UserError(
            f"model.hyperparameters: the prior's log density at the initial parameters is {log_prior}, "
            "so no backend can start: the hyperparameters are too extreme for float64. Bring them "
            "nearer the data's scale, or leave them null for the data-based defaults."
        )
    if dtype != torch.float64:
        try:  # what float64 holds may round to a singular covariance or prior scale
            narrow = {name: value.to(device, dtype) for name, value in inits[0].items()}
            model.bind(None).log_likelihood(x[:2].to(dtype), narrow)
            model.log_prior(narrow)
        except (torch.linalg.LinAlgError, ValueError) as exc:
            raise UserError(
                f"dtype: in {cfg.dtype} the initial parameters or the prior cannot be scored "
                f"({one_line(exc)}); the data are too ill-conditioned for it. Use dtype: "
                "float64, or set data.standardize: true."
            ) from None
    resolved = cfg.model_copy(
        update={
            "init": init_cfg,
            "backends": {name: options.model_dump(mode="json") for name, _, options in backends},
        }
    )
    # a rank of a sharded run works on its own rows
    threads = cfg.threads or auto_threads(data.train.shape[0], data.train.shape[1], cfg.model.k)
    return Plan(resolved, data, model, backends, inits, device, dtype, threads)


SHARDED_BACKENDS = ("em", "online_em")  # backends whose sums over rows are all-reduced across ranks
# (their closed-form path only: each backend's ``check`` refuses the rest)


def _check_sharded(cfg: Config, backends: tuple[tuple[str, Backend[Any], Options], ...]) -> None:
    """Refuse, before loading data, what a sharded run (``distributed``) cannot do."""
    size = distributed.world().size
    for name, _, options in backends:
        if name not in SHARDED_BACKENDS:
            raise UserError(
                f"backends.{name}: expected only {' or '.join(SHARDED_BACKENDS)} in a sharded run ({size} "
                f"ranks), but found {name}. Run {name} in one process, or remove it."
            )
        if options.save_assignments:
            raise UserError(
                f"backends.{name}.save_assignments: a sharded run ({size} ranks) keeps no rank's rows "
                "all in one place. Set it to false, or run in one process."
            )
    if cfg.model.prior != "none":
        raise UserError(
            f"model.prior: a sharded run ({size} ranks) fits maximum likelihood only (the prior's "
            "defaults come from all the data). Set model.prior: none, or run in one process."
        )


# torch's own thread count when this module was imported: all physical cores, or what
# OMP_NUM_THREADS says; captured before any fit changes it
DEFAULT_THREADS = torch.get_num_threads()
# Below this many n_train · dim · k, one thread is fastest: each step's kernels are too small to
# split, and handing work to a second thread costs more than it saves (Pyro's many small ops
# worst). Measured on a 2-core machine (torch 2.13, ms per step with 1 / 2 threads; other jobs
# were running, which inflates the 2-thread times): map at n·d·k = 1800: 16 / 80, 12000:
# 10 / 180, 320000: 33 / 83, 6.4M: 568 / 1105; em at 12000: 2.9 / 57, 320000: 4.3 / 19, 6.4M:
# 29 / 21 (em's row-block lanes pay off on large data). Above the bound, all cores.
SMALL_PROBLEM = 10**6


def auto_threads(n_train: int, dim: int, k: int) -> int:
    """The threads of ``threads: null``: 1 for a small problem (``SMALL_PROBLEM``), else torch's
    default (``DEFAULT_THREADS``), and never more than the cores this process may use."""
    if n_train * dim * k < SMALL_PROBLEM:
        return 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(DEFAULT_THREADS, usable))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for a while, and restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


FIGURE_POINTS = 5000  # train points kept in the run directory for figures


def _figure_sample(data: Dataset, seed: int) -> torch.Tensor:
    """At most ``FIGURE_POINTS`` train rows (a seeded subset, in order), so that figures are
    drawn from the run directory alone."""
    n = data.n_train
    if n <= FIGURE_POINTS:
        return data.train if data.shard is None else data.train_rows(np.arange(n))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    return data.train_rows(np.sort(rng.choice(n, FIGURE_POINTS, replace=False)))


def _pyro_seed(seed: int, restart: int) -> int:
    """The seed of Pyro's (and torch's, numpy's) global generators for one restart: derived from
    the config's seed as the data's and the inits' are, and within the 32 bits numpy accepts."""
    return int(np.random.SeedSequence([seed, 4, restart]).generate_state(1)[0])


def _versions() -> dict[str, str]:
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "ppl_gmm": __version__,
    }


def _init_tensors(inits: tuple[Params, ...]) -> dict[str, torch.Tensor]:
    tensors = dict(inits[0])
    for r, params in enumerate(inits[1:], start=1):
        tensors.update({f"restart{r}.{name}": value for name, value in params.items()})
    return tensors


@dataclass
class _BackendRun:
    summary: Summary
    metrics: pd.DataFrame
    params: Params | None


def execute(plan: Plan, runs_dir: Path, progress: Progress | None = None) -> Outcome:
    """Fit every backend and write the experiment directory; returns its path and summaries."""
    progress = (progress or Silent()) if _writes() else Silent()
    cfg = plan.config
    path = create_experiment_dir(runs_dir, cfg.experiment) if _writes() else Path()
    if distributed.sharded():  # every rank knows the name that rank 0 created
        path = Path(distributed.broadcast_text(str(path)))
    write_text(path / Files.CONFIG, dump_config(cfg))
    if _writes():  # rank 0 hashes the whole train split
        write_json(path / Files.DATA, plan.data.describe())
    save_tensors(path / Files.INIT, _init_tensors(plan.inits))
    if plan.data.truth is not None:
        save_tensors(path / Files.TRUTH, plan.data.truth)
    if _writes():
        sample = {"x": _figure_sample(plan.data, cfg.seed)}
        if plan.data.train_lengths is not None and sample["x"].shape[0] == plan.data.train.shape[0]:
            # every train row, in order: the figures can cut them into the train sequences again
            sample["lengths"] = torch.as_tensor(plan.data.train_lengths, dtype=torch.int64)
        save_tensors(path / Files.SAMPLE, sample)
    common = {
        "model": plan.model.name,
        "seed": cfg.seed,
        "device": str(plan.device),
        "dtype": cfg.dtype,
        "versions": _versions(),
    }
    runs: dict[str, _BackendRun] = {}
    try:
        for name, backend, options in plan.backends:
            runs[name] = _run_backend(plan, path, name, backend, options, common, progress)
    except Interrupted as stop:
        runs[stop.backend] = stop.run
        raise Interrupted(path) from None
    finally:
        _compare_backends(plan, path, runs)
    return Outcome(path, {name: run.summary for name, run in runs.items()})


def target_of(backend: Backend[Any], model: LatentModel) -> str | None:
    """What ``backend`` maximizes, per point, and so what its progress is timed on: the ELBO for
    variational backends; for the others the log posterior (the log-likelihood plus log p(θ) / N)
    when the model has a prior, else the log-likelihood. None for a sampler, which optimizes
    nothing (it is the posterior's reference)."""
    if backend.samples:
        return None
    if backend.variational:
        return "elbo"
    return "log_posterior" if model.has_prior else "log_likelihood"


def _kept_rows(run: _BackendRun) -> pd.DataFrame:
    """The metrics rows of the restart whose fit was kept."""
    metrics = run.metrics
    if "restart" in metrics.columns:
        metrics = metrics[metrics["restart"] == run.summary.get("restart", 0)]
    return metrics.reset_index(drop=True)


def _progress(run: _BackendRun, backend: Backend[Any], options: Options) -> pd.DataFrame:
    """``wall_seconds`` and ``value`` of the backend's target at the estimates its kept fit
    reached after the start (step 0, the shared start, counts for nobody): each step's where the
    step's objective is the target (``objective_is_target``), each exact log-likelihood for the
    log-likelihood target, and the final value at the end of the fit."""
    rows = _kept_rows(run)
    when = rows[["step", "wall_seconds"]]
    parts = [pd.DataFrame({"step": [], "wall_seconds": [], "value": []})]
    if backend.objective_is_target(options):
        values = rows["objective"].shift(-1) if backend.objective_lags else rows["objective"]
        parts.append(when.assign(value=values))
    if run.summary.target == "log_likelihood":
        parts.append(when.assign(value=rows["log_likelihood"]))
    if len(rows) and run.summary.target_value is not None:
        parts.append(when.tail(1).assign(value=run.summary.target_value))
    frame = pd.concat(parts, ignore_index=True).astype(float)
    frame = frame[(frame["step"] > 0) & np.isfinite(frame["value"])]
    return frame.sort_values(["wall_seconds", "step"], kind="stable")


def _compare_backends(plan: Plan, path: Path, runs: Mapping[str, _BackendRun]) -> None:
    """Add what needs every backend's results to each summary, and write comparison.csv.

    Backends that share a target (``target_of``) are compared with each other: ``best_target``
    is the best value any of them reached (``_progress``), and ``seconds_to_within_1e-3`` /
    ``1e-4`` the wall time at which a backend's own target first came within that gap per point
    of it (null when it never did, and for a sampler). ``best_log_likelihood`` is the best train
    log-likelihood any backend reached, by a final estimate or along the way (a sampler's draws
    do not count). Then parameter errors against the truth and the first completed backend,
    after matching."""
    done = {name: run for name, run in runs.items() if run.params is not None}
    fitters = {name: (backend, options) for name, backend, options in plan.backends}
    reached = [run.summary.train_log_likelihood for run in done.values()]
    for name, run in done.items():
        if not fitters[name][0].samples:  # step 0 is the shared start, not something a backend reached
            reached += [float(v) for v in run.metrics.loc[run.metrics["step"] > 0, "log_likelihood"].dropna()]
    best_log_likelihood = max((v for v in reached if v is not None and np.isfinite(v)), default=None)
    progress = {name: _progress(run, *fitters[name]) for name, run in done.items()}
    best: dict[str, float] = {}
    for name, run in done.items():
        target = run.summary.target
        if target is not None and len(progress[name]):
            best[target] = max(best.get(target, -math.inf), float(progress[name]["value"].max()))
    reference = next(iter(done), None)
    reference_params = done[reference].params if reference is not None else None
    for name, run in runs.items():
        if run.params is None:
            continue
        best_target = best.get(run.summary.target) if run.summary.target is not None else None
        extra: dict[str, Any] = {"best_log_likelihood": best_log_likelihood, "best_target": best_target}
        for gap, key in ((1e-3, "seconds_to_within_1e-3"), (1e-4, "seconds_to_within_1e-4")):
            extra[key] = None
            if best_target is not None:
                hits = progress[name].loc[progress[name]["value"] >= best_target - gap, "wall_seconds"]
                extra[key] = float(hits.iloc[0]) if len(hits) else None
        if plan.data.truth is not None and plan.model.k == len(plan.data.truth[plan.model.pivot]):
            errors = parameter_errors(plan.model, plan.data.truth, run.params)
            extra.update({f"{key}_error_vs_truth": value for key, value in errors.items()})
        extra["reference_backend"] = reference
        if reference_params is not None:
            errors = parameter_errors(plan.model, reference_params, run.params)
            extra.update({f"{key}_error_vs_reference": value for key, value in errors.items()})
        run.summary = replace(run.summary, extras={**run.summary.extras, **extra})
        write_summary(path / name, run.summary)
    write_csv(path / Files.COMPARISON, pd.json_normalize([run.summary.to_json() for run in runs.values()]))


@dataclass(frozen=True)
class _Outcome:
    """How a backend's fits ended, before scoring: its status and what it reported."""

    status: str
    error: str | None
    fit_seconds: float  # the kept restart's (failed or interrupted: the last restart's)
    fit_seconds_all_restarts: float
    result: FitResult | None = None
    restart: int = 0


def _threads_of(plan: Plan, options: Options) -> int:
    """The threads a backend runs on: its own ``threads`` option where it has one and it is
    set (em's worker lanes), else the config's."""
    own = getattr(options, "threads", None)
    return own if isinstance(own, int) else plan.threads


def _run_backend(
    plan: Plan,
    path: Path,
    name: str,
    backend: Backend[Any],
    options: Options,
    common: Mapping[str, Any],
    progress: Progress,
) -> _BackendRun:
    threads = _threads_of(plan, options)
    with torch_threads(threads):  # the fit and the scoring alike
        return _fit_backend(plan, path, name, backend, options, {**common, "threads": threads}, progress)


def _fit_backend(
    plan: Plan,
    path: Path,
    name: str,
    backend: Backend[Any],
    options: Options,
    common: Mapping[str, Any],
    progress: Progress,
) -> _BackendRun:
    out = path / name
    if _writes():
        out.mkdir()
    rows: list[dict[str, Any]] = []
    x = plan.data.train.to(plan.device, plan.dtype)
    best: tuple[Any, int, FitResult] | None = None
    spent: list[float] = []  # fit seconds of each restart
    try:
        for restart, init in enumerate(plan.inits):
            pyro.clear_param_store()
            pyro.set_rng_seed(_pyro_seed(plan.config.seed, restart))
            started = time.perf_counter()

            def report(info: StepInfo, restart: int = restart) -> None:
                rows.append({"restart": restart, **info._asdict()})
                progress.step(info)

            init_here = {key: value.to(plan.device, plan.dtype).clone() for key, value in init.items()}
            progress.begin(name, restart, backend.total_steps(options, plan.data.n_train))
            try:
                result = backend.fit(plan.model, x, init_here, options, report)
            except BaseException:
                spent.append(time.perf_counter() - started)
                raise
            finally:
                progress.end()
            spent.append(result.fit_seconds)
            train = score(plan.model, result.params, plan.data)["train_log_likelihood"]
            if best is None or train > best[0]:
                best = (train, restart, result)
    except KeyboardInterrupt:
        stop = Interrupted(path)
        stop.backend = name
        ended = _Outcome("interrupted", "interrupted by the user", spent[-1] if spent else 0.0, sum(spent))
        stop.run = _write_backend(out, name, ended, common, rows, plan, options, None)
        raise stop from None
    except Exception as exc:  # a failing backend must not take the others down
        message = " ".join(str(exc).split()) or type(exc).__name__
        progress.message(f"warning: {name} failed: {message}")
        ended = _Outcome("failed", message, spent[-1] if spent else 0.0, sum(spent))
        return _write_backend(out, name, ended, common, rows, plan, options, None)
    assert best is not None
    _, restart, result = best
    if not result.converged:
        fix = _convergence_fix(name, backend)
        progress.message(f"warning: {name} did not converge in {result.n_steps} steps; {fix}")
    for stem, tensors in result.tensors.items():
        save_tensors(out / Files.tensors(stem), tensors)
    ended = _Outcome("completed", None, spent[restart], sum(spent), result, restart)
    run = _write_backend(out, name, ended, common, rows, plan, options, target_of(backend, plan.model))
    collapse = _collapse_warning(plan, run)
    if collapse:
        progress.message(f"warning: {name}: {collapse}")
    return run


STEP_FIELDS = ("max_iter", "steps", "max_epochs", "epochs")  # what bounds an optimizer's steps


def _convergence_fix(name: str, backend: Backend[Any]) -> str:
    """What to change when ``backend`` did not converge, naming fields its options have."""
    fields = backend.options.model_fields
    if backend.samples:
        more = " and ".join(f"backends.{name}.{f}" for f in ("warmup_steps", "num_samples") if f in fields)
        return f"its draws have not mixed; raise {more}." if more else "its draws have not mixed."
    bound = next((f for f in STEP_FIELDS if f in fields), None)
    fixes = ([f"raise backends.{name}.{bound}"] if bound else []) + (
        [f"loosen backends.{name}.tol"] if "tol" in fields else []
    )
    return (" or ".join(fixes) + ".") if fixes else "its stopping rule was not met."


def _collapse_warning(plan: Plan, run: _BackendRun) -> str | None:
    """Why a fit's log-likelihood may be meaningless for lack of data, or None: fewer train points
    than parameters, a component holding less than 2 points' worth of weight under maximum
    likelihood (its covariance can then shrink onto a point, the likelihood growing without
    bound), or a train log-likelihood that is not finite."""
    n, k = plan.data.n_train, plan.model.k
    n_params = plan.model.n_params()
    train = run.summary.train_log_likelihood
    weights = run.params.get("weights") if run.params is not None else None
    light = (
        [] if weights is None or plan.model.has_prior else torch.nonzero(weights * n < 2).flatten().tolist()
    )
    if n < n_params:
        why = f"{k} components have {n_params} parameters but the train split has only {n} points"
    elif light:
        why = f"component {light[0]} of {k} holds less than 2 of the {n} train points' worth of weight"
    elif train is None or not math.isfinite(train):
        why = f"the train log-likelihood is {train}"
    else:
        return None
    shown = "" if train is None else f" (train log-likelihood {train:.4g} per point)"
    return f"{why}, so components collapse onto points and the fit{shown} is not meaningful. Lower model.k."


def _write_backend(
    out: Path,
    name: str,
    ended: _Outcome,
    common: Mapping[str, Any],
    rows: list[dict[str, Any]],
    plan: Plan,
    options: Options,
    target: str | None,
) -> _BackendRun:
    metrics = pd.DataFrame(rows, columns=["restart", "step", "wall_seconds", "objective", "log_likelihood"])
    if len(plan.inits) == 1:
        metrics = metrics.drop(columns="restart")
    write_csv(out / Files.METRICS, metrics)
    result, params, scores = ended.result, None, {}
    target_value = None
    if result is not None:
        params = {key: value.detach().to("cpu", torch.float64) for key, value in result.params.items()}
        save_tensors(out / Files.PARAMS, params)
        scores = score(plan.model, params, plan.data)
        target_value = _target_value(target, plan, params, scores["train_log_likelihood"], result.elbo)
        if options.save_assignments:
            write_csv(out / Files.ASSIGNMENTS, assignments(plan.model, params, plan.data))
    summary = Summary(
        backend=name,
        status=ended.status,
        error=ended.error,
        n_steps=result.n_steps if result else int(metrics["step"].max()) if len(metrics) else 0,
        converged=result.converged if result else False,
        fit_seconds=ended.fit_seconds,
        fit_seconds_all_restarts=ended.fit_seconds_all_restarts,
        point_estimate=result.point_estimate if result else None,
        elbo=result.elbo if result else None,
        target=target,
        target_value=target_value,
        extras={"restart": ended.restart, **dict(result.extras)} if result else {},
        **scores,  # type: ignore[arg-type]
        **common,
    )
    write_summary(out, summary)
    return _BackendRun(summary, metrics, params)


def _target_value(
    target: str | None, plan: Plan, params: Params, train: float | int | None, elbo: float | None
) -> float | None:
    """The final value of ``target`` per point: the train log-likelihood, plus log p(θ) / N for
    the log posterior; the ELBO as the backend estimated it."""
    if target == "elbo":
        return elbo
    if target is None or train is None:
        return None
    if target == "log_posterior":
        return float(train) + float(plan.model.log_prior(params)) / plan.data.n_train
    return float(train)


def run(cfg: Config, runs_dir: Path, progress: Progress | None = None) -> Outcome:
    return execute(prepare(cfg), runs_dir, progress)
