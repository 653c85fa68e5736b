"""Experiment directories → one DataFrame → an aligned table, comparison.csv and figures.

Reads run directories only; never imports a backend. Broken, partial or foreign directories are
reported and skipped, and the rest are compared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from .errors import UserError  # noqa: E402
from .evaluate import match_components, permute  # noqa: E402
from .models import MODELS, LatentModel  # noqa: E402
from .runs import Files, read_summary, write_bytes, write_csv  # noqa: E402

__all__ = [
    "Comparison",
    "compare",
    "find_experiments",
    "format_table",
    "load_table",
    "plot_selection",
    "posterior_errors",
]

TABLE_COLUMNS = [
    "experiment",
    "backend",
    "status",
    "n_steps",
    "converged",
    "fit_seconds",
    "train_log_likelihood",
    "test_log_likelihood",
    "elbo",
    "bic",
    "ari",
    "seconds_to_within_1e-3",
    "seconds_to_within_1e-4",
]


@dataclass(frozen=True)
class Comparison:
    table: pd.DataFrame
    figures: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _is_experiment(path: Path) -> bool:
    return (path / Files.CONFIG).is_file() or (path / Files.DATA).is_file()


def find_experiments(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """Experiment directories named directly or held one level down; and what was skipped."""
    found: list[Path] = []
    skipped: list[str] = []
    for path in paths:
        if not path.is_dir():
            skipped.append(f"{path}: not a directory")
        elif _is_experiment(path):
            found.append(path)
        else:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            inside = [p for p in children if _is_experiment(p)]
            skipped.extend(f"{p}: not an experiment directory" for p in children if p not in inside)
            if not inside and not children:
                skipped.append(f"{path}: holds no experiment directories")
            found.extend(inside)
    return found, skipped


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


def format_table(table: pd.DataFrame, columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """An aligned text table of the given columns (default: those that matter most)."""
    columns = [c for c in columns if c in table.columns]
    cells = [columns] + [[_cell(row[c]) for c in columns] for _, row in table.iterrows()]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _metrics(backend_dir: Path) -> pd.DataFrame | None:
    try:
        frame = pd.read_csv(backend_dir / Files.METRICS)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    needed = {"step", "wall_seconds", "objective", "log_likelihood"}
    return frame if needed <= set(frame.columns) and len(frame) else None


def _save(figure: plt.Figure, path: Path) -> Path:
    from io import BytesIO

    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    write_bytes(path, buffer.getvalue())
    return path


def plot_traces(experiment: str, runs: pd.DataFrame, out: Path) -> Path | None:
    """Objective and exact log-likelihood against step and wall time, one line per backend."""
    traces = []
    for _, row in runs.iterrows():
        frame = _metrics(Path(row["path"]))
        if frame is not None:
            if "restart" in frame.columns:
                frame = frame[frame["restart"] == row.get("restart", 0)]
            traces.append((row["backend"], frame))
    if not traces:
        return None
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for name, frame in traces:
        evaluated = frame.dropna(subset=["log_likelihood"])
        for col, x in enumerate(["step", "wall_seconds"]):
            shown, points = (
                (frame, evaluated) if col == 0 else (frame[frame[x] > 0], evaluated[evaluated[x] > 0])
            )
            axes[0, col].plot(shown[x], shown["objective"], label=name, lw=1.2)
            axes[1, col].plot(points[x], points["log_likelihood"], marker=".", label=name, lw=1.2)
    for col, label in enumerate(["step", "wall time (s), log scale"]):
        axes[1, col].set_xlabel(label)
    for row in range(2):
        axes[row, 1].set_xscale("log")
    axes[0, 0].set_ylabel("objective per point\n(log-lik. / log-post. / ELBO)")
    axes[1, 0].set_ylabel("exact train log-likelihood per point")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        _zoom(ax)
    axes[0, 0].legend()
    figure.suptitle(f"{experiment}: objectives and exact log-likelihood")
    return _save(figure, out / f"{experiment}-traces.png")


def _zoom(ax: plt.Axes) -> None:
    """Show the approach to the optimum, not the first steps' large values."""
    values = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.array([])])
    values = values[np.isfinite(values)]
    if values.size:
        top, low = values.max(), np.quantile(values, 0.1)
        pad = 0.05 * max(top - low, 1e-9)
        ax.set_ylim(low - pad, top + pad)


def _ellipse(ax: plt.Axes, mean: np.ndarray, cov: np.ndarray, color: str) -> None:
    """The 1- and 2-sd ellipses of a 2-D Gaussian: mean (2,), cov (2, 2)."""
    centre = (float(mean[0]), float(mean[1]))
    values, vectors = np.linalg.eigh(cov)
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    for scale in (1.0, 2.0):
        width, height = 2 * scale * np.sqrt(np.maximum(values[::-1], 0))
        ax.add_patch(Ellipse(centre, width, height, angle=angle, fill=False, color=color, lw=1.5))


def plot_components(experiment_dir: Path, runs: pd.DataFrame, out: Path) -> Path | None:
    """Each backend's fitted components side by side (and the simulated truth): for Gaussian
    components, the sample of train points kept in the run directory with ellipses at 1 and 2
    standard deviations (on the first two principal components when there are more than two
    features); for other models, a heat map of the pivot parameter (components × features)."""
    panels = []
    if (experiment_dir / Files.TRUTH).is_file():
        truth = load_file(str(experiment_dir / Files.TRUTH))
        panels.append(("truth (simulated)", truth))
    for _, row in runs.iterrows():
        try:
            params = load_file(str(Path(row["path"]) / Files.PARAMS))
        except Exception:  # a missing or broken file: that backend has no panel
            continue
        panels.append((row["backend"], params))
    if not panels:
        return None
    if all("means" in p and "covariances" in p for _, p in panels):
        return _plot_ellipses(experiment_dir, panels, out)
    model = _model_class(runs)
    return None if model is None else _plot_heatmaps(experiment_dir, panels, model.pivot, out)


def _plot_ellipses(
    experiment_dir: Path, panels: list[tuple[str, dict[str, torch.Tensor]]], out: Path
) -> Path | None:
    try:
        x = load_file(str(experiment_dir / Files.SAMPLE))["x"].to(torch.float64).numpy()
    except Exception:  # a run directory from before the sample was kept
        return None
    center = x.mean(0)
    if x.shape[1] > 2:
        _, _, vt = np.linalg.svd(x - center, full_matrices=False)
        basis, axis_names = vt[:2].T, ("PC 1", "PC 2")
    elif x.shape[1] == 2:
        basis, axis_names = np.eye(2), ("feature 1", "feature 2")
    else:
        return None
    points = (x - center) @ basis
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, params) in zip(axes[0], panels, strict=True):
        ax.scatter(points[:, 0], points[:, 1], s=4, c="0.6", alpha=0.5, linewidths=0)
        means = (params["means"].to(torch.float64).numpy() - center) @ basis
        covs = basis.T @ params["covariances"].to(torch.float64).numpy() @ basis
        for k, (mean, cov) in enumerate(zip(means, covs, strict=True)):
            _ellipse(ax, mean, cov, colors[k % len(colors)])
            ax.plot(*mean, "x", color=colors[k % len(colors)])
        ax.set_title(name)
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel(axis_names[1])
    figure.suptitle(f"{experiment_dir.name}: fitted components")
    return _save(figure, out / f"{experiment_dir.name}-components.png")


def _plot_heatmaps(
    experiment_dir: Path, panels: list[tuple[str, dict[str, torch.Tensor]]], pivot: str, out: Path
) -> Path | None:
    """One heat map per panel of ``pivot`` (K, D), components ordered by weight, weights in the
    row labels."""
    shown = [(name, p) for name, p in panels if pivot in p and p[pivot].dim() == 2]
    if not shown:
        return None
    top = max(float(p[pivot].max()) for _, p in shown)
    figure, axes = plt.subplots(
        len(shown),
        1,
        figsize=(
            max(6.0, 0.25 * shown[0][1][pivot].shape[1] + 2),
            1.2 + 0.45 * sum(p[pivot].shape[0] for _, p in shown),
        ),
        squeeze=False,
    )
    for ax, (name, params) in zip(axes[:, 0], shown, strict=True):
        values = params[pivot].to(torch.float64).numpy()
        weights = params["weights"].to(torch.float64).numpy() if "weights" in params else np.ones(len(values))
        order = np.argsort(-weights)
        image = ax.imshow(values[order], aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
        ax.set_yticks(range(len(order)), [f"k={k} (π={weights[k]:.2f})" for k in order], fontsize=7)
        ax.set_title(f"{name}: {pivot}", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("feature")
    figure.suptitle(f"{experiment_dir.name}: fitted components")
    return _save(figure, out / f"{experiment_dir.name}-components.png")


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
    for experiment in experiments:
        runs = table[(table["experiment_dir"] == str(experiment)) & (table["status"] == "completed")]
        if runs.empty:
            continue
        trace = plot_traces(experiment.name, runs, out)
        figures += [trace] if trace else []
        try:
            components = plot_components(experiment, runs, out)
        except UserError as exc:
            skipped.append(f"{experiment}: no component figure ({exc})")
            continue
        figures += [components] if components else []
    return Comparison(table, figures, skipped)


def plot_selection(table: pd.DataFrame, chosen: dict[str, int | None], path: Path, title: str) -> Path:
    """Information criteria (lower is better) and the ELBO (higher is better) against K, with the
    K each criterion picks marked."""
    has_elbo = pd.to_numeric(table["elbo"], errors="coerce").notna().any()
    figure, axes = plt.subplots(1, 2 if has_elbo else 1, figsize=(11 if has_elbo else 6, 4.2), squeeze=False)
    ax = axes[0, 0]
    for name in ("bic", "aic", "icl"):
        values = pd.to_numeric(table[name], errors="coerce")
        if values.notna().any():
            (line,) = ax.plot(
                table["k"], values, marker="o", label=f"{name.upper()} (picks K={chosen[name]})"
            )
            if chosen[name] is not None:
                ax.plot(
                    chosen[name],
                    values[table["k"] == chosen[name]].iloc[0],
                    "*",
                    ms=16,
                    color=line.get_color(),
                )
    ax.set_xlabel("K")
    ax.set_ylabel("criterion (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_elbo:
        ax = axes[0, 1]
        values = pd.to_numeric(table["elbo"], errors="coerce")
        ax.plot(
            table["k"], values, marker="o", color="C3", label=f"ELBO per point (picks K={chosen['elbo']})"
        )
        if chosen["elbo"] is not None:
            ax.plot(chosen["elbo"], values[table["k"] == chosen["elbo"]].iloc[0], "*", ms=16, color="C3")
        effective = pd.to_numeric(table.get("effective_k"), errors="coerce")
        if effective is not None and effective.notna().any():
            for k, value, eff in zip(table["k"], values, effective, strict=True):
                if eff == eff:
                    ax.annotate(
                        f"eff. {int(eff)}",
                        (k, value),
                        textcoords="offset points",
                        xytext=(0, 8),
                        ha="center",
                        fontsize=8,
                    )
        ax.set_xlabel("K")
        ax.set_ylabel("ELBO per point (higher is better)")
        ax.legend()
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)
