"""A sweep's runs over seeds → per grid point and backend: each metric's mean, standard deviation
and 95% bootstrap confidence interval, and the local-optimum rate: ``runs.csv`` (one row per
finished point and backend), ``aggregate.csv``, ``sweep.png`` (means with intervals per grid point)
and ``sweep-traces.png`` (log-likelihood against time, median and band over seeds).

A backend's ``reached_best_rate`` at a grid point is the share of its seeds whose train
log-likelihood came within ``OPTIMUM_TOL`` per point of the best of its seeds there, and its
``local_optimum_rate`` the share that stopped below (1 minus it). It
compares fits of the same data: set ``data.seed`` in the sweep's config so that the seeds change
the starts and not the data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .errors import UserError
from .figures import plot_sweep, plot_sweep_traces
from .runs import read_summary, write_csv
from .sweep import finished_runs, load_sweep, read_manifest

__all__ = ["CONFIDENCE", "METRICS", "OPTIMUM_TOL", "aggregate_sweep", "summarize"]

# summary fields aggregated over seeds, when the runs have them
METRICS = [
    "train_log_likelihood",
    "test_log_likelihood",
    "target_value",
    "elbo",
    "fit_seconds",
    "seconds_to_within_1e-3",
    "seconds_to_within_1e-4",
    "n_steps",
    "ari",
    "nmi",
    "bic",
]
CONFIDENCE = 0.95
RESAMPLES = 2000
OPTIMUM_TOL = 1e-4  # per point, as seconds_to_within_1e-4 counts reaching the best


def summarize(values: np.ndarray, seed: int = 0) -> dict[str, float]:
    """mean, sd (n - 1) and the percentile bootstrap's 95% interval of the mean; the interval is
    NaN for fewer than two values, and the value itself when they are all equal."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    nan = float("nan")
    if values.size == 0:
        return {"mean": nan, "sd": nan, "ci_low": nan, "ci_high": nan}
    mean = float(values.mean())
    if values.size < 2:
        return {"mean": mean, "sd": nan, "ci_low": nan, "ci_high": nan}
    if np.all(values == values[0]):
        return {"mean": mean, "sd": 0.0, "ci_low": mean, "ci_high": mean}
    interval = stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=CONFIDENCE,
        n_resamples=RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return {
        "mean": mean,
        "sd": float(values.std(ddof=1)),
        "ci_low": float(interval.low),
        "ci_high": float(interval.high),
    }


def _runs(path: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per finished point and completed backend: the grid values, seed, backend and the
    summary's numbers; and the grid's keys."""
    sweep = load_sweep(path)
    rows = []
    for point, experiment in finished_runs(sweep, read_manifest(path)):
        for backend in sweep.point_config(point).backends:
            summary = read_summary(experiment / backend)
            if not summary or summary.get("status") != "completed":
                continue
            numbers = {
                key: value
                for key, value in summary.items()
                if isinstance(value, int | float) and not isinstance(value, bool) and key != "seed"
            }
            rows.append(
                {
                    **point.values,
                    "seed": point.seed,
                    "backend": backend,
                    "experiment": experiment.name,
                    **numbers,
                }
            )
    return pd.DataFrame(rows), list(sweep.grid)


def aggregate_sweep(path: Path, out: Path | None = None) -> pd.DataFrame:
    """Write ``runs.csv``, ``aggregate.csv``, ``sweep.png`` and ``sweep-traces.png`` for the sweep
    directory ``path`` into ``out`` (default: the sweep directory); returns the aggregate (one row
    per grid point and backend)."""
    out = path if out is None else out
    runs, keys = _runs(path)
    if runs.empty:
        raise UserError(f"{path}: no finished point of the sweep has a completed backend to aggregate.")
    write_csv(out / "runs.csv", runs)
    metrics = [m for m in METRICS if m in runs] + sorted(c for c in runs if c.endswith("_error_vs_truth"))
    loglik = pd.to_numeric(runs.get("train_log_likelihood"), errors="coerce")
    # each backend against its own best: backends maximize different objectives (a MAP estimate,
    # a posterior mean), so another's higher likelihood is no optimum this one missed
    best = loglik.groupby([runs[k] for k in [*keys, "backend"]], sort=False, dropna=False).transform("max")
    runs["reached_best"] = loglik >= best - OPTIMUM_TOL
    rows = []
    for group_keys, group in runs.groupby([*keys, "backend"], sort=False, dropna=False):
        values = group_keys if isinstance(group_keys, tuple) else (group_keys,)
        row: dict[str, object] = dict(zip([*keys, "backend"], values, strict=True))
        row["n_seeds"] = len(group)
        reached = float(group["reached_best"].mean()) if loglik.notna().any() else math.nan
        row["reached_best_rate"] = reached
        row["local_optimum_rate"] = 1.0 - reached  # the share of seeds stuck below the best
        for metric in metrics:
            for name, value in summarize(pd.to_numeric(group[metric], errors="coerce").to_numpy()).items():
                row[f"{metric}_{name}"] = value
        rows.append(row)
    table = pd.DataFrame(rows)
    write_csv(out / "aggregate.csv", table)
    plot_sweep(table, keys, out / "sweep.png", path.name)
    plot_sweep_traces(_traces(path, runs, keys), out / "sweep-traces.png", path.name)
    return table


def _traces(path: Path, runs: pd.DataFrame, keys: list[str]) -> dict[str, dict[str, list[pd.DataFrame]]]:
    """grid point label → backend → each seed's metrics.csv (the kept restart's rows)."""
    traces: dict[str, dict[str, list[pd.DataFrame]]] = {}
    for _, run in runs.iterrows():
        label = ", ".join(f"{key}={run[key]}" for key in keys) or "all seeds"
        try:
            metrics = pd.read_csv(path / run["experiment"] / run["backend"] / "metrics.csv")
        except (OSError, ValueError):
            continue
        if "restart" in metrics:
            metrics = metrics[metrics["restart"] == run.get("restart", 0)]
        traces.setdefault(label, {}).setdefault(run["backend"], []).append(metrics)
    return traces
