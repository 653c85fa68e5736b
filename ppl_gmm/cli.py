"""The command line: parse arguments, call, print. Nothing below this module prints or reads argv.

Only the standard library is imported up front, so that ``--help`` and usage errors answer at
once; torch, Pyro and the rest load inside the command that needs them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .errors import UserError

if TYPE_CHECKING:
    from .backends import StepInfo
    from .config import Config
    from .experiment import Progress

__all__ = ["BACKEND_NAMES", "DATA_SOURCES", "MODEL_NAMES", "main"]

# The registries' names, written out so that --help need not import torch; a test keeps them equal.
BACKEND_NAMES = ("em", "incremental_em", "map", "mcmc", "online_em", "svi", "vb")
MODEL_NAMES = (
    "bernoulli_hmm",
    "bernoulli_mixture",
    "gaussian_hmm",
    "gmm",
    "poisson_hmm",
    "poisson_mixture",
    "student_t_mixture",
)
DATA_SOURCES = (
    "synthetic",
    "csv",
    "npy",
    "digits",
    "digits_binary",
    "iris",
    "old_faithful",
    "old_faithful_outliers",
    "wine",
)

_DESCRIPTION = f"""\
Fit a latent-variable model (a Gaussian, Student-t, Poisson or Bernoulli mixture, a Gaussian hidden
Markov model, or your own) with several inference backends on the same data from the same start,
and compare them.

backends:      {", ".join(BACKEND_NAMES)}
models:        {", ".join(MODEL_NAMES)}
data sources:  {", ".join(DATA_SOURCES)}"""

_EPILOG = """\
examples:
  ppl-gmm run configs/quickstart.yaml                 EM on synthetic 2-D data, seconds
  ppl-gmm run configs/compare.yaml --threads 1        em, map, svi and vb side by side
  ppl-gmm run configs/quickstart.yaml model.k=5 seed=3
  ppl-gmm compare runs/                               table and figures of every run in runs/
  ppl-gmm select configs/select.yaml --k 1..8         BIC, AIC and ICL for K = 1..8
  ppl-gmm sweep configs/quickstart.yaml --grid model.k=2,3 --seeds 0..4 --jobs 2
                                                      every K over 5 seeds, with intervals
  ppl-gmm assign runs/NAME/em new.csv                components of new data, by a fitted run

A config is a YAML file; KEY=VALUE overrides a field by its dotted path. Every field, its default
and each backend's options are described in the README (README.md, "Running experiments" and
"Backends"). `ppl-gmm COMMAND --help` shows a command's arguments.

exit codes:
  0    success
  1    a backend failed while fitting (its status is `failed`; the other backends are kept)
  2    bad usage, config or data: one `error:` line on stderr, nothing written
  130  interrupted (Ctrl-C or SIGTERM): finished backends are kept"""

# the stderr lines that --quiet keeps: what went wrong, as opposed to how far the work has got
_ALWAYS_SHOWN = ("warning:", "error:")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `error:` line (exit 2); a missing argument is shown with an example."""

    def __init__(self, *args: Any, example: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.example = example

    def error(self, message: str) -> NoReturn:
        required = "the following arguments are required: "
        if message.startswith(required) and self.example:
            message = f"missing {message[len(required) :]}; for example `{self.example}`"
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


# ---- progress on stderr ------------------------------------------------------------------------


class _Warnings:
    """No progress; warnings still shown (``--quiet``)."""

    def begin(self, backend: str, restart: int, total: int | None) -> None:
        pass

    def step(self, info: StepInfo) -> None:
        pass

    def end(self) -> None:
        pass

    def message(self, text: str) -> None:
        if text.startswith(_ALWAYS_SHOWN):
            sys.stderr.write(f"{text}\n")


class _Lines(_Warnings):
    """Progress for a log file (stderr is not a terminal): no bars, whose carriage-return updates
    pile up in a file, but a line when each fit ends and at most one every ``every`` seconds
    while it runs."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.name = ""
        self.total: int | None = None
        self.started = self.last = 0.0
        self.info: StepInfo | None = None

    def begin(self, backend: str, restart: int, total: int | None) -> None:
        self.name = backend if restart == 0 else f"{backend} (restart {restart})"
        self.total = total
        self.started = self.last = time.perf_counter()
        self.info = None

    def step(self, info: StepInfo) -> None:
        self.info = info
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            sys.stderr.write(f"{self.name}: step {info.step}{of}, objective {info.objective:.6g}\n")

    def end(self) -> None:
        seconds = time.perf_counter() - self.started
        if self.info is None:
            sys.stderr.write(f"{self.name}: stopped before its first step, {seconds:.3g} s\n")
        else:
            steps = f"{self.info.step} step{'' if self.info.step == 1 else 's'}"
            sys.stderr.write(
                f"{self.name}: {steps}, {seconds:.3g} s, final objective {self.info.objective:.6g}\n"
            )

    def message(self, text: str) -> None:
        sys.stderr.write(f"{text}\n")


class _Bars(_Warnings):
    """Progress for a terminal: one bar per backend fit, with the current objective."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self.tqdm = tqdm
        self.bar: Any = None

    def begin(self, backend: str, restart: int, total: int | None) -> None:
        desc = backend if restart == 0 else f"{backend} (restart {restart})"
        self.bar = self.tqdm(
            total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True
        )

    def step(self, info: StepInfo) -> None:
        if self.bar is not None:
            if info.step > 0:
                self.bar.update(1)
            self.bar.set_postfix(objective=f"{info.objective:.6g}", refresh=False)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def message(self, text: str) -> None:
        self.tqdm.write(text, file=sys.stderr)


def _progress(quiet: bool) -> Progress:
    if quiet:
        return _Warnings()
    return _Bars() if sys.stderr.isatty() else _Lines()


# ---- the commands ------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _format(value: object, digits: int = 6) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _print_rows(rows: list[list[str]]) -> None:
    """Print rows of cells as aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _load(args: argparse.Namespace) -> Config:
    """The config with its KEY=VALUE overrides; ``--threads N`` is the override ``threads=N``."""
    from .config import load_config

    overrides = list(args.overrides)
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    return load_config(args.config, overrides)


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiment import Interrupted, execute, prepare

    plan = prepare(_load(args))
    try:
        outcome = execute(plan, Path(args.runs_dir), _progress(args.quiet))
    except Interrupted as exc:
        sys.stderr.write(f"error: interrupted; finished backends are kept in {exc.path}\n")
        print(exc.path)
        return 130
    header = ["backend", "status", "n_steps", "converged", "train_ll", "test_ll", "fit_seconds"]
    lines = [header]
    for name, s in outcome.summaries.items():
        lines.append(
            [
                name,
                s.status,
                _format(s.n_steps),
                _format(s.converged),
                _format(s.train_log_likelihood),
                _format(s.test_log_likelihood),
                _format(s.fit_seconds, 3),
            ]
        )
    _print_rows(lines)
    print(outcome.path)
    return 1 if outcome.failed else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, format_table
    from .sweep import is_sweep

    paths = [Path(p) for p in args.paths]
    out = Path(args.out) if args.out else (paths[0] if len(paths) == 1 and paths[0].is_dir() else Path("."))
    if len(paths) == 1 and is_sweep(paths[0]):
        from .aggregate import aggregate_sweep

        _print_aggregate(aggregate_sweep(paths[0], out))
        sys.stderr.write(f"wrote runs.csv, aggregate.csv, sweep.png and sweep-traces.png to {out}\n")
        print(out)
        return 0
    result = compare(paths, out)
    for line in result.skipped:
        sys.stderr.write(f"warning: skipped {line}\n")
    print(format_table(result.table))
    posterior = [c for c in result.table.columns if c.startswith("posterior_") and c.endswith("_vs_mcmc")]
    if posterior and result.table[posterior].notna().any().any():
        print()
        print("posterior against MCMC (root-mean-square error after matching components):")
        rows = result.table[result.table[posterior].notna().any(axis=1)]
        print(format_table(rows, ["experiment", "backend", *posterior]))
    names = ", ".join(p.name for p in result.figures) or "no figures"
    sys.stderr.write(f"wrote comparison.csv and {names} to {out}\n")
    print(out)
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from .select import CRITERIA, parse_k_range, select

    ks = parse_k_range(args.k)
    quiet = args.quiet

    def message(text: str) -> None:
        if not quiet:
            sys.stderr.write(f"{text}\n")

    result = select(_load(args), ks, args.backend, Path(args.runs_dir), message, args.jobs)
    columns = ["k", *CRITERIA, "effective_k", "status"]
    lines = [columns]
    for _, row in result.table.iterrows():
        cells = []
        for name in columns:
            mark = "*" if name in CRITERIA and result.chosen[name] == row["k"] else ""
            value = row[name]
            cells.append("-" if value is None or value != value else f"{_format(value)}{mark}")
        lines.append(cells)
    _print_rows(lines)
    picks = ", ".join(f"{name.upper()} picks K={k}" for name, k in result.chosen.items() if k is not None)
    print(f"(* marks the chosen K) {picks}")
    print(result.path)
    failed = (result.table["status"] != "completed").any()
    return 1 if failed else 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .config import apply_overrides
    from .sweep import parse_grid, parse_seeds, resume, sweep

    quiet = args.quiet

    def message(text: str) -> None:
        if not quiet or text.startswith(("warning:", "error:")):
            sys.stderr.write(f"{text}\n")

    if args.resume is not None:
        if args.config is not None or args.grid or args.seeds is not None:
            raise UserError(
                "--resume SWEEP_DIR takes the sweep's own config, grid and seeds: "
                "give no CONFIG, --grid or --seeds."
            )
        result = resume(Path(args.resume), message)
    else:
        if args.config is None:
            raise UserError(
                "sweep: expected CONFIG (or --resume SWEEP_DIR), e.g. "
                "ppl-gmm sweep configs/quickstart.yaml --grid model.k=2,3 --seeds 0..4."
            )
        import yaml

        from .config import load_config

        load_config(args.config, args.overrides)  # one error line for a bad file or override
        raw = apply_overrides(
            yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}, args.overrides
        )
        if args.threads is not None:
            raw["threads"] = args.threads
        resources = {
            "points_per_job": args.points_per_job,
            "partition": args.partition,
            "time_min": args.time_min,
            "cpus": args.cpus,
            "mem_gb": args.mem_gb,
            "gpus": args.gpus,
        }
        seeds = parse_seeds(args.seeds) if args.seeds is not None else [int(raw.get("seed", 0) or 0)]
        result = sweep(
            raw,
            parse_grid(args.grid),
            seeds,
            Path(args.runs_dir),
            args.launcher,
            args.jobs,
            resources,
            message,
        )
    states = result.manifest["state"].value_counts().to_dict()
    message(", ".join(f"{count} {state}" for state, count in states.items()))
    _print_aggregate(result.aggregate)
    print(result.path)
    return (
        0
        if set(states) <= {"finished"}
        and not result.manifest["failed_backends"].fillna("").astype(str).str.strip().any()
        else 1
    )


def _print_aggregate(table: Any) -> None:
    """One line per grid point and backend: the seeds, the mean train log-likelihood and fit time
    with their 95% intervals, and the local-optimum rate."""
    keys = [
        c
        for c in table.columns
        if c not in ("backend", "n_seeds")
        and not c.endswith(("_mean", "_sd", "_ci_low", "_ci_high", "_rate"))
    ]
    header = [*keys, "backend", "seeds", "train_ll mean [95% CI]", "fit_s mean [95% CI]", "local optima"]
    lines = [header]
    for _, row in table.iterrows():
        cells = [str(row[k]) for k in keys] + [str(row["backend"]), str(row["n_seeds"])]
        for metric in ("train_log_likelihood", "fit_seconds"):
            mean, low, high = (row.get(f"{metric}_{part}") for part in ("mean", "ci_low", "ci_high"))
            interval = "" if low is None or low != low else f" [{_format(low, 5)}, {_format(high, 5)}]"
            cells.append(f"{_format(mean, 6)}{interval}")
        rate = row.get("local_optimum_rate")
        cells.append("-" if rate is None or rate != rate else f"{rate:.0%}")
        lines.append(cells)
    _print_rows(lines)


# ---- the arguments -----------------------------------------------------------------------------


def _config_arguments(parser: argparse.ArgumentParser, example: str, what: str) -> None:
    """The arguments of every command that runs a config."""
    parser.add_argument("config", metavar="CONFIG", help=f"a YAML config, e.g. {example}")
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],  # without a default argparse reports an optional list as required
        metavar="KEY=VALUE",
        help="override a config field by its dotted path, e.g. model.k=5 backends.em.tol=1e-8",
    )
    parser.add_argument(
        "--runs-dir", default="runs", help=f"where {what} goes (default: runs under the current folder)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="threads of every backend and of the scoring, as the config field `threads`; 1 keeps "
        "timings fair when other work shares the machine",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress on stderr (warnings and errors are still shown)"
    )


def _cmd_assign(args: argparse.Namespace) -> int:
    from .api import assign

    print(assign(args.run, args.data, args.out))
    return 0


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser, "configs/quickstart.yaml", "the experiment directory")


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="experiment directories, or folders of them such as runs/"
    )
    parser.add_argument(
        "--out",
        help="where comparison.csv and the figures go (default: the single PATH, else the current folder)",
    )


def _select_arguments(parser: argparse.ArgumentParser) -> None:
    _config_arguments(parser, "configs/select.yaml", "the selection directory")
    parser.add_argument("--k", required=True, help="the range of K, e.g. 1..8")
    parser.add_argument("--backend", default="em", help="the backend to fit for each K (default: em)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="values of K fitted at once, by local worker processes (default: 1)",
    )


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", metavar="CONFIG", nargs="?", help="a YAML config, e.g. configs/quickstart.yaml"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the base config by its dotted path, e.g. data.n=5000",
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a field and its values, e.g. model.k=2,3,4; repeat for a Cartesian product",
    )
    parser.add_argument(
        "--seeds", metavar="A..B", help="the seeds of every grid point (default: the config's seed)"
    )
    parser.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="a local process pool (default) or Slurm job arrays through submitit",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="points run at once: local worker processes, or Slurm's array parallelism (default: 1)",
    )
    parser.add_argument("--runs-dir", default="runs", help="where the sweep directory goes (default: runs)")
    parser.add_argument(
        "--resume", metavar="SWEEP_DIR", help="run again the points of this sweep that did not finish"
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads of each point (default: the worker's share of the cores)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    slurm = parser.add_argument_group("Slurm resources per job (override the config's launcher: block)")
    slurm.add_argument("--partition", help="the partition (default: the cluster's)")
    slurm.add_argument("--time-min", type=int, metavar="MIN", help="time limit in minutes (default: 60)")
    slurm.add_argument(
        "--cpus", type=int, metavar="N", help="cores per job, and its torch threads (default: 1)"
    )
    slurm.add_argument("--mem-gb", type=float, metavar="GB", help="memory per job (default: the partition's)")
    slurm.add_argument("--gpus", type=int, metavar="N", help="GPUs per job (default: 0)")
    slurm.add_argument(
        "--points-per-job", type=int, metavar="N", help="points each job runs one after another (default: 1)"
    )


def _assign_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        metavar="RUN_DIR/BACKEND",
        help="a backend directory such as runs/quickstart-20261125-101500-1a2b3c/em (an experiment "
        "directory: its best completed backend)",
    )
    parser.add_argument(
        "data",
        metavar="DATA",
        help="a CSV (the run's feature columns, by name) or a .npy array (the run's columns, in order)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="the CSV to write (default: <DATA stem>.assignments.csv in the current folder)",
    )


@dataclass(frozen=True)
class _Command:
    name: str
    help: str  # one line in `ppl-gmm --help`
    description: str  # the top of `ppl-gmm NAME --help`
    example: str  # shown when a required argument is missing
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


_COMMANDS: tuple[_Command, ...] = (
    _Command(
        "run",
        "fit every backend of a config on the same data from the same start",
        "Fit every backend listed in CONFIG on the same data from the same initial parameters, "
        "one after another; write one experiment directory and print its path last.",
        "ppl-gmm run configs/quickstart.yaml model.k=5",
        _run_arguments,
        _cmd_run,
    ),
    _Command(
        "compare",
        "tabulate and plot experiment directories",
        "Read experiment directories (or folders holding several, such as runs/), print one row per "
        "backend run, and write comparison.csv and PNG figures. Given a sweep directory, aggregate "
        "its runs over seeds instead: per grid point and backend, each metric's mean, sd and 95% "
        "bootstrap interval, and the local-optimum rate (aggregate.csv, sweep.png, sweep-traces.png).",
        "ppl-gmm compare runs/",
        _compare_arguments,
        _cmd_compare,
    ),
    _Command(
        "select",
        "choose the number of components: one experiment per K",
        "Fit one backend of CONFIG once per K on the same data; write selection.csv (k, bic, aic, "
        "icl, elbo, effective_k) and selection.png into one directory and print its path last.",
        "ppl-gmm select configs/select.yaml --k 1..8",
        _select_arguments,
        _cmd_select,
    ),
    _Command(
        "sweep",
        "repeat a config over a grid of values and seeds, locally or on Slurm",
        "Run CONFIG once per point of the Cartesian product of the --grid values and the --seeds, on "
        "a local process pool or as a Slurm job array (submitit); write every experiment, a manifest "
        "of the points and their states, runs.csv, aggregate.csv (per grid point and backend: mean, "
        "sd and 95% bootstrap interval of each metric over seeds, and the local-optimum rate) and "
        "sweep.png into one sweep directory, and print its path last. --resume SWEEP_DIR runs again "
        "only the points that did not finish.",
        "ppl-gmm sweep configs/quickstart.yaml --grid model.k=2,3,4 --seeds 0..4 --jobs 2",
        _sweep_arguments,
        _cmd_sweep,
    ),
    _Command(
        "assign",
        "assign new data to a fitted run's components",
        "Read DATA with the run's own data settings (its feature columns and its standardization), "
        "and write a CSV with the most probable component (hard), the responsibilities (p0, p1, "
        "...) and the log-likelihood of each row; print its path last.",
        "ppl-gmm assign runs/quickstart-20261125-101500-1a2b3c/em new.csv",
        _assign_arguments,
        _cmd_assign,
    ),
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ppl-gmm",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        example="ppl-gmm run configs/quickstart.yaml",
    )
    parser.add_argument("--version", action="version", version=f"ppl-gmm {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, title="commands", metavar="COMMAND"
    )
    for command in _COMMANDS:
        sub = commands.add_parser(
            command.name, help=command.help, description=command.description, example=command.example
        )
        command.arguments(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .distributed import launch, sharded, world_from_env

    if world_from_env().size > 1 and not sharded():  # under torchrun or srun: every rank runs main
        return launch(main, list(sys.argv[1:] if argv is None else argv))
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after the flags: `run CONFIG --quiet model.k=5`
    if extra and hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.handler(args))
    except UserError as exc:
        if os.environ.get("PPL_GMM_DEBUG") == "1":
            traceback.print_exc()
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
