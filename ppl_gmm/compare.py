"""Experiment directories → one DataFrame → an aligned table, comparison.csv and figures.

Reads run directories only; never imports a backend. Broken, partial or foreign directories are
reported and skipped, and the rest are compared; a path that does not exist is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from .errors import UserError
from .evaluate import match_components, permute
from .figures import Experiment, plot_components, plot_models, plot_states, plot_traces, plot_transitions
from .models import MODELS, LatentModel
from .runs import Files, read_summary, write_csv
from .sweep import SLURM_LOGS, is_sweep

__all__ = [
    "TABLE_COLUMNS",
    "TABLE_WIDTH",
    "Comparison",
    "compare",
    "find_experiments",
    "format_table",
    "load_table",
    "models_on_same_data",
    "posterior_errors",
]

# the printed table, most important first; comparison.csv keeps every field
TABLE_COLUMNS = [
    "backend",
    "status",
    "n_steps",
    "fit_seconds",
    "target",
    "target_value",
    "seconds_to_within_1e-3",
    "train_log_likelihood",
    "test_log_likelihood",
    "ari",
]
TABLE_WIDTH = 100  # columns of a terminal; the last columns give way beyond it

# column → its two header lines
_HEADERS = {
    "backend": ("", "backend"),
    "status": ("", "status"),
    "n_steps": ("", "steps"),
    "converged": ("", "converged"),
    "fit_seconds": ("fit", "seconds"),
    "target": ("", "target"),
    "target_value": ("target", "value"),
    "seconds_to_within_1e-3": ("s to best", "- 1e-3"),
    "seconds_to_within_1e-4": ("s to best", "- 1e-4"),
    "train_log_likelihood": ("train", "log-lik."),
    "test_log_likelihood": ("test", "log-lik."),
    "elbo": ("", "ELBO"),
    "bic": ("", "BIC"),
    "ari": ("", "ARI"),
    "nmi": ("", "NMI"),
}
_TARGETS = {"log_likelihood": "log-lik.", "log_posterior": "log post.", "elbo": "ELBO"}
_SECONDS = re.compile(r"(^|_)seconds($|_)")
# search this deep below a PATH for experiments (runs/ → a select or sweep folder → experiments)
_DEPTH = 3


@dataclass(frozen=True)
class Comparison:
    table: pd.DataFrame
    figures: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _is_experiment(path: Path) -> bool:
    """An experiment directory; a sweep's (or select's) holds a config too, and experiments."""
    return not is_sweep(path) and ((path / Files.CONFIG).is_file() or (path / Files.DATA).is_file())


def find_experiments(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Experiment directories named directly or held below (a folder of runs, and the folders
    ``select`` and ``sweep`` write inside it); and what was skipped. A missing path is an error."""
    found: list[Path] = []
    skipped: list[str] = []
    for path in paths:
        if not path.exists():
            raise UserError(
                f"{path}: no such directory. Expected an experiment directory or a folder of them, "
                "such as runs/ (the path `ppl-gmm run` printed last)."
            )
        if not path.is_dir():
            raise UserError(
                f"{path}: expected an experiment directory or a folder of them, but found a file."
            )
        inside = _search(path, _DEPTH, skipped)
        if not inside and not any(line.startswith(f"{path}") for line in skipped):
            skipped.append(f"{path}: holds no experiment directories")
        found.extend(inside)
    return found, skipped


def _search(path: Path, depth: int, skipped: list[str]) -> list[Path]:
    if _is_experiment(path):
        return [path]
    found = []
    logs = {SLURM_LOGS} if is_sweep(path) else set()  # a sweep's job logs: no experiment to skip
    for child in sorted(
        p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in logs
    ):
        below = _search(child, depth - 1, []) if depth > 1 else []
        if below:
            found.extend(below)
        else:
            skipped.append(f"{child}: not an experiment directory")
    return found


def load_table(experiments: Sequence[Path]) -> tuple[pd.DataFrame, list[str]]:
    """One row per backend run: every summary.json field, flattened."""
    rows: list[dict[str, object]] = []
    skipped: list[str] = []
    for experiment in experiments:
        backends = sorted(p for p in experiment.iterdir() if p.is_dir() and not p.name.startswith("."))
        found = 0
        for backend_dir in backends:
            summary = read_summary(backend_dir)
            if summary is None or "backend" not in summary or "status" not in summary:
                skipped.append(f"{backend_dir}: no readable summary.json (partial or broken run)")
                continue
            found += 1
            rows.append(
                {
                    "experiment": experiment.name,
                    "experiment_dir": str(experiment),
                    "path": str(backend_dir),
                    **summary,
                }
            )
        if not found:
            skipped.append(f"{experiment}: no backend results")
    table = pd.json_normalize(rows) if rows else pd.DataFrame(columns=TABLE_COLUMNS)
    return table, skipped


def posterior_errors(experiment_rows: pd.DataFrame) -> pd.DataFrame:
    """For each backend with a posterior (posterior.safetensors: ``<name>.mean`` / ``<name>.std``),
    the root-mean-square error of its posterior means and standard deviations against the MCMC
    reference of the same experiment, after matching components by posterior mean. One row per
    (experiment, backend); empty without an mcmc run."""
    rows = []
    for experiment, runs in experiment_rows.groupby("experiment_dir", sort=False):
        loaded = {}
        for _, row in runs.iterrows():
            try:
                loaded[row["backend"]] = load_file(str(Path(row["path"]) / Files.POSTERIOR))
            except Exception:  # no posterior kept by this backend
                continue
        reference = loaded.pop("mcmc", None)
        model = _model_class(runs)
        if reference is None or model is None:
            continue
        pivot = f"{model.pivot}.mean"
        axes = {key: model.component_axes.get(key.rsplit(".", 1)[0], ()) for key in reference}
        for backend, moments in loaded.items():
            if pivot not in moments or moments[pivot].shape != reference[pivot].shape:
                continue
            flat = [m[pivot].reshape(m[pivot].shape[0], -1) for m in (reference, moments)]
            matched = permute(moments, torch.as_tensor(match_components(*flat)), axes)
            row = {"experiment": Path(experiment).name, "backend": backend}
            for key, value in reference.items():
                if key in matched and matched[key].shape == value.shape:
                    group, stat = key.rsplit(".", 1)
                    diff = matched[key].to(torch.float64) - value.to(torch.float64)
                    row[f"posterior_{group}_{stat}_error_vs_mcmc"] = float(diff.pow(2).mean().sqrt())
            rows.append(row)
    return pd.DataFrame(rows)


def _model_class(runs: pd.DataFrame) -> type[LatentModel] | None:
    """The model class the runs of one experiment name (None when unknown here)."""
    names = runs["model"].dropna().unique() if "model" in runs.columns else []
    return MODELS.get(str(names[0])) if len(names) and str(names[0]) in MODELS else None


def format_table(
    table: pd.DataFrame, columns: Sequence[str] = TABLE_COLUMNS, width: int = TABLE_WIDTH
) -> str:
    """Aligned text, one block per experiment (its name above it), with two-line headers; the
    last columns are left out until the lines fit in ``width`` characters."""
    columns = [c for c in columns if c in table.columns and c != "experiment"]
    groups = list(table.groupby("experiment", sort=False)) if "experiment" in table.columns else [("", table)]
    headers = [_header(c) for c in columns]
    cells = [[_cell(c, row[c]) for c in columns] for _, row in table.iterrows()]
    widths = [max(len(h[0]), len(h[1]), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    while len(widths) > 1 and sum(widths) + 2 * (len(widths) - 1) > width:
        widths.pop()
    shown = len(widths)

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values[:shown], widths, strict=True)).rstrip()

    blocks = []
    for name, rows in groups:
        lines = [str(name)[:width]] if name else []
        lines += [line([h[0] for h in headers]), line([h[1] for h in headers])]
        lines = [item for item in lines if item]
        lines += [line([_cell(c, row[c]) for c in columns]) for _, row in rows.iterrows()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _header(column: str) -> tuple[str, str]:
    if column in _HEADERS:
        return _HEADERS[column]
    posterior = re.fullmatch(r"posterior_(.+)_(mean|std)_error_vs_mcmc", column)
    if posterior:
        return posterior[1], posterior[2]
    head, _, tail = column.rpartition("_")
    return head, tail


def _cell(column: str, value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if column == "target":
        return _TARGETS.get(str(value), str(value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        digits = 3 if _SECONDS.search(column) or column in ("ari", "nmi") else 5
        return f"{value:.{digits}g}"
    return str(value)


def compare(paths: Sequence[Path], out: Path) -> Comparison:
    """Compare every backend run under ``paths``; write comparison.csv and figures into ``out``."""
    experiments, skipped = find_experiments(paths)
    table, more = load_table(experiments)
    skipped += more
    if table.empty:
        where = ", ".join(str(p) for p in paths)
        raise UserError(f"{where}: no experiment directories with backend results to compare.")
    posterior = posterior_errors(table)
    if not posterior.empty:
        table = table.merge(posterior, on=["experiment", "backend"], how="left")
    write_csv(out / Files.COMPARISON, table)
    figures: list[Path] = []
    read: list[Experiment] = []
    for path in experiments:
        runs = table[(table["experiment_dir"] == str(path)) & (table["status"] == "completed")]
        if runs.empty:
            continue
        experiment = Experiment.read(path, runs)
        read.append(experiment)
        drawn = [
            plot_traces(experiment, out),
            plot_components(experiment, out),
            plot_transitions(experiment, out),
            plot_states(experiment, out),
        ]
        figures += [figure for figure in drawn if figure is not None]
    for name, group in models_on_same_data(read).items():
        figure = plot_models(group, out / f"{name}-models.png")
        if figure is not None:
            figures.append(figure)
    return Comparison(table, figures, skipped)


def models_on_same_data(experiments: Sequence[Experiment]) -> dict[str, list[Experiment]]:
    """Experiments fitting different models to the same data (the same data.json sha256: the
    same train rows, standardized alike), one per model (the last given: the newest of a sorted
    folder), by a figure name: the data source, with the data's hash when one source has
    several. Only data fitted by two or more models are kept."""
    groups: dict[str, dict[str, Experiment]] = {}
    for experiment in experiments:
        digest = experiment.data.get("sha256")
        model = experiment.model_class
        if isinstance(digest, str) and model is not None:
            groups.setdefault(digest, {})[model.name] = experiment
    kept = {digest: list(by_model.values()) for digest, by_model in groups.items() if len(by_model) > 1}
    sources = [str(group[0].data.get("source", "data")) for group in kept.values()]
    return {
        source if sources.count(source) == 1 else f"{source}-{digest[:8]}": group
        for source, (digest, group) in zip(sources, kept.items(), strict=True)
    }
