"""The command line: parse arguments, call, print. Nothing below this module prints or reads argv."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from tqdm import tqdm

from . import __version__
from .backends import StepInfo
from .config import load_config
from .errors import UserError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


class _Bars:
    """Progress on stderr: one bar per backend fit, with the current objective."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: tqdm | None = None

    def begin(self, backend: str, restart: int, total: int | None) -> None:
        desc = backend if restart == 0 else f"{backend} (restart {restart})"
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="step",
            file=sys.stderr,
            disable=self.quiet,
            dynamic_ncols=True,
            leave=True,
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
        if not self.quiet:
            tqdm.write(text, file=sys.stderr)


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


def _cmd_run(args: argparse.Namespace) -> int:
    from .experiment import Interrupted, execute, prepare

    config = load_config(args.config, args.overrides)
    plan = prepare(config)
    try:
        outcome = execute(plan, Path(args.runs_dir), _Bars(args.quiet))
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

    paths = [Path(p) for p in args.paths]
    out = Path(args.out) if args.out else (paths[0] if len(paths) == 1 and paths[0].is_dir() else Path("."))
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
    config = load_config(args.config, args.overrides)
    result = select(config, ks, args.backend, Path(args.runs_dir), _Bars(args.quiet))
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


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ppl-gmm", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"ppl-gmm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="run every backend of a config on the same data from the same start",
        description="Run every backend listed in CONFIG on the same data and initial parameters; "
        "write one experiment directory and print its path last.",
    )
    run.add_argument("config", help="a YAML config, e.g. configs/quickstart.yaml")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override a config field by its dotted path, e.g. model.k=5",
    )
    run.add_argument("--runs-dir", default="runs", help="where experiment directories go (default: runs)")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    run.set_defaults(handler=_cmd_run)
    comp = commands.add_parser(
        "compare",
        help="tabulate and plot experiment directories",
        description="Read experiment directories (or folders holding several, such as runs/), print "
        "one row per backend run, and write comparison.csv and PNG figures.",
    )
    comp.add_argument("paths", nargs="+", metavar="PATH", help="experiment directories or folders of them")
    comp.add_argument(
        "--out",
        help="where comparison.csv and the figures go (default: the single PATH, else the current folder)",
    )
    comp.set_defaults(handler=_cmd_compare)
    sel = commands.add_parser(
        "select",
        help="choose the number of components: one experiment per K",
        description="Run one backend of CONFIG once per K on the same data; write selection.csv "
        "(k, bic, aic, icl, elbo, effective_k) and selection.png into one directory, print its path last.",
    )
    sel.add_argument("config", help="a YAML config, e.g. configs/select.yaml")
    sel.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override a config field")
    sel.add_argument("--k", required=True, help="the range of K, e.g. 1..8")
    sel.add_argument("--backend", default="em", help="the backend to fit for each K (default: em)")
    sel.add_argument("--runs-dir", default="runs", help="where the selection directory goes (default: runs)")
    sel.add_argument("--quiet", action="store_true", help="no progress on stderr")
    sel.set_defaults(handler=_cmd_select)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after the flags: `run CONFIG --quiet model.k=5`
    if extra and hasattr(args, "overrides") and not any(item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.handler(args)
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
