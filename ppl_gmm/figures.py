"""The figures of a comparison: objective traces, fitted components, a hidden Markov model's
transition matrices and state sequences, model selection.

Drawn from what an experiment directory keeps (summaries, metrics.csv, parameters, the sample of
train points, data.json, config.yaml); never from a backend. Every figure reads the same way: a
backend has one colour everywhere, and a component has the colour of the truth's (or the first
backend's) component it is matched to.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Ellipse, Patch  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from .evaluate import match_components, permute  # noqa: E402
from .models import MODELS, LatentModel  # noqa: E402
from .runs import Files, write_bytes  # noqa: E402

__all__ = [
    "KINDS",
    "backend_color",
    "component_color",
    "Experiment",
    "ema",
    "is_noisy",
    "matched_colors",
    "models_figure",
    "objective_kind",
    "plot_components",
    "plot_models",
    "plot_selection",
    "plot_states",
    "plot_sweep",
    "plot_sweep_traces",
    "plot_traces",
    "plot_transitions",
    "states_figure",
    "trace_figure",
    "transitions_figure",
]

# objective kind → its name on an axis; each kind gets its own axes (their scales differ)
KINDS: dict[str, str] = {"log_likelihood": "log-likelihood", "log_posterior": "log posterior", "elbo": "ELBO"}

# a fixed colour per known backend, whatever subset an experiment runs
_BACKENDS = ("em", "map", "svi", "vb", "mcmc", "online_em", "incremental_em", "partial_em")
_BACKEND_COLORS = [matplotlib.colormaps["tab10"](i) for i in range(10)]
# components use other hues than backends, so the two are never confused
_COMPONENT_COLORS = [matplotlib.colormaps["Dark2"](i) for i in range(8)] + [
    matplotlib.colormaps["Set1"](i) for i in range(9)
]

_ESTIMATES = {
    "mle": " (MLE)",
    "map": " (MAP)",
    "posterior_mean": " (posterior mean)",
    "posterior_median": " (posterior median)",
}

# the pivot parameter of count and binary models → what its colour bar shows
_PIVOT_LABELS = {"rates": "Poisson rate (expected count)", "probs": "Bernoulli probability"}


def backend_color(name: str) -> Any:
    """The colour of a backend in every figure: fixed for the known ones, and stable by name for
    others."""
    if name in _BACKENDS:
        return _BACKEND_COLORS[_BACKENDS.index(name)]
    return _BACKEND_COLORS[len(_BACKENDS) + zlib.crc32(name.encode()) % (10 - len(_BACKENDS))]


def component_color(index: int) -> Any:
    return _COMPONENT_COLORS[index % len(_COMPONENT_COLORS)]


def matched_colors(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The colour index of each of ``other``'s components: the index of the reference component
    it is matched to (``evaluate.match_components``: Hungarian on squared distances). With more
    components than the reference, the unmatched ones get new indices after the reference's.
    reference: (R, F), other: (K, F) rows identifying components; returns (K,) ints."""
    if reference.shape == other.shape:
        perm = match_components(torch.as_tensor(reference), torch.as_tensor(other))
        colors = np.empty(len(perm), dtype=int)
        colors[perm] = np.arange(len(perm))
        return colors
    cost = ((reference[:, None, :] - other[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    colors = np.full(other.shape[0], -1, dtype=int)
    colors[cols] = rows
    unmatched = np.flatnonzero(colors < 0)
    colors[unmatched] = reference.shape[0] + np.arange(len(unmatched))
    return colors


def objective_kind(summary: Mapping[str, Any], prior: str | None) -> str:
    """What a backend's ``objective`` column measures: its ``target`` when the summary names one;
    else the ELBO for variational backends, the log density of the draws (a log posterior) for
    samplers, and the log posterior or log-likelihood, by the prior, for point estimates."""
    target = summary.get("target")
    if isinstance(target, str) and target in KINDS:
        return target
    if _number(summary.get("elbo")) is not None:
        return "elbo"
    if summary.get("backend") == "mcmc" or prior == "conjugate":
        return "log_posterior"
    return "log_likelihood"


def is_noisy(values: np.ndarray) -> bool:
    """Whether a trace is a stochastic estimate (SVI's ELBO, online EM's mini-batches, MCMC's
    draws) rather than a smooth climb: its steps change direction in more than 30% of places."""
    steps = np.diff(values[np.isfinite(values)])
    steps = steps[steps != 0]
    return len(steps) >= 10 and float(np.mean(np.sign(steps[1:]) != np.sign(steps[:-1]))) > 0.3


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average whose window grows with the step, 10% of it up to ``span``
    points: early steps, where the objective moves fast, are not lagged (a log axis shows them
    wide)."""
    out = np.empty(len(values))
    level = float(values[0]) if len(values) else 0.0
    for t, value in enumerate(values):
        alpha = max(2.0 / (span + 1), min(1.0, 10.0 / (t + 1)))
        level += alpha * (float(value) - level)
        out[t] = level
    return out


@dataclass(frozen=True)
class Experiment:
    """What figures need of one experiment directory, read once."""

    path: Path
    runs: pd.DataFrame  # its completed backend rows of the comparison table
    prior: str | None
    model: dict[str, Any]  # the config's model block
    data: dict[str, Any]  # data.json
    standardized: bool

    @classmethod
    def read(cls, path: Path, runs: pd.DataFrame) -> Experiment:
        config = _read_yaml(path / Files.CONFIG)
        model, data_cfg = (_section(config, name) for name in ("model", "data"))
        try:
            data = json.loads((path / Files.DATA).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        return cls(
            path,
            runs,
            model.get("prior"),
            model,
            data if isinstance(data, dict) else {},
            bool(data_cfg.get("standardize")),
        )

    @property
    def model_class(self) -> type[LatentModel] | None:
        names = self.runs["model"].dropna().unique() if "model" in self.runs.columns else []
        return MODELS.get(str(names[0])) if len(names) and str(names[0]) in MODELS else None

    def feature_name(self, j: int) -> str:
        names = self.data.get("feature_names")
        name = str(names[j]) if isinstance(names, list) and j < len(names) else f"feature {j + 1}"
        return f"{name} (standardized)" if self.standardized else name


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _save(figure: plt.Figure, path: Path) -> Path:
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_bytes(path, buffer.getvalue())
    return path


# ---- traces ----------------------------------------------------------------------------------


def _metrics(backend_dir: Path, restart: object) -> pd.DataFrame | None:
    try:
        frame = pd.read_csv(backend_dir / Files.METRICS)
    except (OSError, ValueError, pd.errors.ParserError):
        return None
    if not {"step", "wall_seconds", "objective", "log_likelihood"} <= set(frame.columns):
        return None
    if "restart" in frame.columns:  # the kept restart's trace
        frame = frame[frame["restart"] == (restart if isinstance(restart, int) else 0)]
    return frame if len(frame) else None


def plot_traces(experiment: Experiment, out: Path) -> Path | None:
    """``trace_figure`` saved as ``<experiment>-traces.png`` in ``out``."""
    figure = trace_figure(experiment)
    return None if figure is None else _save(figure, out / f"{experiment.path.name}-traces.png")


def trace_figure(experiment: Experiment) -> plt.Figure | None:
    """One row of axes per objective kind present (each backend's own objective, with a moving
    average over noisy ones), then the exact train log-likelihood every backend is scored by;
    against step (left) and wall time (right), both on log axes that start at the first step."""
    traces = []
    for _, row in experiment.runs.iterrows():
        frame = _metrics(Path(row["path"]), row.get("restart", 0))
        if frame is not None:
            traces.append((str(row["backend"]), objective_kind(row, experiment.prior), frame))
    if not traces:
        return None
    kinds = [kind for kind in KINDS if any(k == kind for _, k, _ in traces)]
    figure, axes = plt.subplots(
        len(kinds) + 1,
        2,
        figsize=(11, 2.9 * (len(kinds) + 1) + 0.6),
        sharex="col",
        squeeze=False,
        layout="constrained",
    )
    smoothed = False
    for name, kind, frame in traces:
        color = backend_color(name)
        shown = frame[frame["step"] > 0]  # step 0 is the shared start, at ~0 s: off a log axis
        evaluated = shown.dropna(subset=["log_likelihood"])
        row = kinds.index(kind)
        for col, x in enumerate(("step", "wall_seconds")):
            smoothed |= _line(axes[row, col], shown[x], shown["objective"].to_numpy(dtype=float), color)
            exact = evaluated["log_likelihood"].to_numpy(dtype=float)
            smoothed |= _line(axes[-1, col], evaluated[x], exact, color)
    start = _start(traces)
    for col, (x, where) in enumerate((("step", "by step"), ("wall time (s)", "by wall time"))):
        for row, kind in enumerate(kinds):
            axes[row, col].set_title(f"{KINDS[kind]} per point, {where}")
        axes[-1, col].set_title(f"exact train log-likelihood per point, {where}")
        if start is not None:
            axes[-1, col].axhline(start, color="0.4", ls=":", lw=1.2)
        axes[-1, col].set_xlabel(f"{x}, log scale")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
    for row, kind in enumerate(kinds):
        axes[row, 0].set_ylabel(f"{KINDS[kind]} per point")
    axes[-1, 0].set_ylabel("log-likelihood per point")
    handles = [Line2D([], [], color=backend_color(n), lw=2, label=_trace_label(n, k)) for n, k, _ in traces]
    if smoothed:
        handles.append(Line2D([], [], color="0.3", lw=0.6, alpha=0.4, label="raw (noisy estimate)"))
        handles.append(Line2D([], [], color="0.3", lw=1.8, label="moving average"))
    if start is not None:
        handles.append(Line2D([], [], color="0.4", ls=":", lw=1.2, label="shared start (step 0)"))
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
    figure.suptitle(f"{experiment.path.name}: each backend's objective, and the exact log-likelihood")
    return figure


def _trace_label(backend: str, kind: str) -> str:
    return f"{backend} (log density of its draws)" if backend == "mcmc" else f"{backend} ({KINDS[kind]})"


def _line(ax: plt.Axes, x: pd.Series, values: np.ndarray, color: Any) -> bool:
    """A trace; a noisy one raw in a light line under its moving average. Returns whether smoothed."""
    noisy = is_noisy(values)
    if noisy:
        ax.plot(x, values, color=color, lw=0.6, alpha=0.3)
        values = ema(values, max(5, len(values) // 25))
    ax.plot(x, values, color=color, lw=1.8, marker="." if len(values) < 30 else None)
    return noisy


def _start(traces: Sequence[tuple[str, str, pd.DataFrame]]) -> float | None:
    """The train log-likelihood of the shared start (step 0), where a trace recorded it."""
    for _, _, frame in traces:
        first = frame[frame["step"] == 0]["log_likelihood"].dropna()
        if len(first):
            return float(first.iloc[0])
    return None


# ---- fitted components -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Panel:
    title: str
    params: dict[str, torch.Tensor]
    colors: np.ndarray  # (K,) the colour index of each component


def _panels(experiment: Experiment, pivot: str) -> list[_Panel]:
    """The truth (simulated data) and each backend's estimate, every component coloured as the
    reference component it matches: the truth's, else the first backend's ordered by weight."""
    loaded: list[tuple[str, dict[str, torch.Tensor]]] = []
    if (experiment.path / Files.TRUTH).is_file():
        loaded.append(("truth (simulated)", load_file(str(experiment.path / Files.TRUTH))))
    for _, row in experiment.runs.iterrows():
        try:
            params = load_file(str(Path(row["path"]) / Files.PARAMS))
        except (OSError, ValueError, RuntimeError):  # a missing or broken file: no panel
            continue
        estimate = _ESTIMATES.get(str(row.get("point_estimate")), "")
        ll = _number(row.get("train_log_likelihood"))
        score = "" if ll is None else f"\ntrain log-lik. {ll:.4g} per point"
        loaded.append((f"{row['backend']}{estimate}{score}", params))
    loaded = [(t, p) for t, p in loaded if pivot in p]
    if not loaded:
        return []
    features = [p[pivot].to(torch.float64).reshape(p[pivot].shape[0], -1).numpy() for _, p in loaded]
    weights = loaded[0][1].get("weights")
    order = (
        np.argsort(-weights.numpy(), kind="stable") if weights is not None else np.arange(len(features[0]))
    )
    reference_colors = np.empty(len(order), dtype=int)
    reference_colors[order] = np.arange(len(order))
    panels = []
    for (title, params), feature in zip(loaded, features, strict=True):
        matched = matched_colors(features[0], feature)
        inside = matched < len(reference_colors)
        colors = np.where(inside, reference_colors[np.minimum(matched, len(order) - 1)], matched)
        panels.append(_Panel(title, {k: v.to(torch.float64) for k, v in params.items()}, colors))
    return panels


def plot_components(experiment: Experiment, out: Path) -> Path | None:
    """Gaussian components as ellipses over the kept train points (on the first two principal
    components beyond two features); other models as heat maps of their pivot parameter."""
    model = experiment.model_class
    pivot = model.pivot if model is not None else "means"
    panels = _panels(experiment, pivot)
    if not panels:
        return None
    if all("means" in p.params and "covariances" in p.params for p in panels):
        return _plot_ellipses(experiment, panels, out)
    return _plot_heatmaps(experiment, panels, pivot, out)


def _assignments(
    experiment: Experiment, x: np.ndarray, params: Mapping[str, torch.Tensor]
) -> np.ndarray | None:
    """The most probable component of each point under ``params`` (the model's own log joint);
    None when the model cannot be rebuilt from the saved config."""
    model_class = experiment.model_class
    if model_class is None:
        return None
    fields = {**experiment.model, "k": int(params[model_class.pivot].shape[0]), "prior": "none"}
    if "covariance" in fields:  # saved covariances are full matrices whatever the type
        fields["covariance"] = "full"
    try:
        points = torch.as_tensor(x)
        model = model_class.from_config(model_class.options.model_validate(fields), points)
        if model_class.sequential:  # smoothed states within each train sequence, where known
            model = model.bind(_train_lengths(experiment, x.shape[0]))
        return model.log_joint(points, params).argmax(1).numpy()
    except (ValueError, RuntimeError, KeyError):  # a config from another version: plain points
        return None


def _ellipse(ax: plt.Axes, mean: np.ndarray, cov: np.ndarray, color: Any) -> None:
    """The 1- and 2-sd contours of a 2-D Gaussian: mean (2,), cov (2, 2)."""
    values, vectors = np.linalg.eigh(cov)
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    for scale, style in ((1.0, "-"), (2.0, "--")):
        width, height = 2 * scale * np.sqrt(np.maximum(values[::-1], 0))
        ax.add_patch(
            Ellipse(
                (float(mean[0]), float(mean[1])),
                width,
                height,
                angle=angle,
                fill=False,
                color=color,
                lw=1.6,
                ls=style,
            )
        )


def _read_sample(experiment: Experiment) -> np.ndarray | None:
    """The kept train points (N, D), or None for a run directory from before they were kept or
    with fewer than two features."""
    try:
        x = load_file(str(experiment.path / Files.SAMPLE))["x"].to(torch.float64).numpy()
    except (OSError, ValueError, RuntimeError, KeyError):
        return None
    return x if x.shape[1] >= 2 else None


@dataclass(frozen=True)
class _View:
    """A 2-D view of the data: points → (points - center) @ basis, axes named ``names``."""

    center: np.ndarray  # (D,)
    basis: np.ndarray  # (D, 2)
    names: tuple[str, str]
    equal: bool  # whether both axes share one unit, so that circles stay round

    @classmethod
    def of(cls, experiment: Experiment, x: np.ndarray) -> _View:
        """The two features, or beyond two the first two principal components of ``x``."""
        center = x.mean(0)
        if x.shape[1] > 2:
            _, singular, vt = np.linalg.svd(x - center, full_matrices=False)
            share = singular**2 / (singular**2).sum()
            names = tuple(f"PC {i + 1} ({100 * share[i]:.0f}% of variance)" for i in range(2))
            # a rotation: both axes in the units of the (shared-unit) data space
            return cls(center, vt[:2].T, (names[0], names[1]), True)
        equal = experiment.standardized or experiment.data.get("source") == "synthetic"
        return cls(center, np.eye(2), (experiment.feature_name(0), experiment.feature_name(1)), equal)

    def points(self, x: np.ndarray) -> np.ndarray:
        return (x - self.center) @ self.basis

    def gaussians(self, params: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Component means (K, 2) and covariance (or scale) matrices (K, 2, 2) in the view."""
        means = self.points(params["means"].numpy())
        return means, self.basis.T @ params["covariances"].numpy() @ self.basis


def _draw_panel(
    ax: plt.Axes,
    points: np.ndarray,
    hard: np.ndarray | None,
    gaussians: tuple[np.ndarray, np.ndarray],
    colors: np.ndarray,
    marker: tuple[float, float],
) -> None:
    """Points (coloured by ``colors[hard]`` when known), and each component's mean and its 1σ and
    2σ contours; the view set by the points, not by a degenerate component's huge ellipse.
    marker: the points' size and opacity."""
    size, alpha = marker
    if hard is None:
        ax.scatter(points[:, 0], points[:, 1], s=size, c="0.6", alpha=alpha, linewidths=0, rasterized=True)
    else:
        shade = [component_color(c) for c in colors[hard]]
        ax.scatter(points[:, 0], points[:, 1], s=size, c=shade, alpha=alpha, linewidths=0, rasterized=True)
    for k, (mean, cov) in enumerate(zip(*gaussians, strict=True)):
        color = component_color(int(colors[k]))
        _ellipse(ax, mean, cov, color)
        ax.plot(*mean, "X", color=color, ms=9, mec="white", mew=1.0)
    low, high = points.min(0), points.max(0)
    pad = 0.08 * (high - low) + 1e-9
    ax.set_xlim(low[0] - pad[0], high[0] + pad[0])
    ax.set_ylim(low[1] - pad[1], high[1] + pad[1])
    ax.grid(alpha=0.2)


def _legend_handles(painted: bool, colors: set[int], contour: str = "") -> list[Any]:
    return [
        Line2D([], [], marker="X", color="0.2", mec="white", ls="", ms=9, label="component mean"),
        Line2D([], [], color="0.2", lw=1.6, label=f"1σ contour{contour}"),
        Line2D([], [], color="0.2", lw=1.6, ls="--", label=f"2σ contour{contour}"),
        Line2D(
            [],
            [],
            marker="o",
            color="0.5",
            ls="",
            ms=4,
            label="train points, coloured by\nmost probable component" if painted else "train points",
        ),
        *(Patch(color=component_color(c), label=f"component {c + 1}") for c in sorted(colors)),
    ]


def _plot_ellipses(experiment: Experiment, panels: list[_Panel], out: Path) -> Path | None:
    x = _read_sample(experiment)
    if x is None:
        return None
    view = _View.of(experiment, x)
    points = view.points(x)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    spread = np.ptp(points, axis=0) + 1e-12
    width = float(np.clip(3.6 * spread[0] / spread[1], 3.0, 5.5)) if view.equal else 4.2
    figure, axes = plt.subplots(
        nrows,
        ncols,
        figsize=((width + 0.6) * ncols, 3.6 * nrows + 1.2),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    painted = False
    for ax, panel in zip(axes.flat, panels, strict=False):
        hard = _assignments(experiment, x, panel.params)
        painted |= hard is not None
        _draw_panel(ax, points, hard, view.gaussians(panel.params), panel.colors, (4.0, 0.35))
        ax.set_title(panel.title, fontsize=10)
        if view.equal:
            ax.set_aspect("equal", adjustable="box")
    for ax in axes.flat:
        ax.set_xlabel(view.names[0])
        ax.set_ylabel(view.names[1])
        ax.label_outer()
    spare = list(axes.flat[len(panels) :])
    for ax in spare:
        ax.axis("off")
    handles = _legend_handles(painted, {int(c) for p in panels for c in p.colors})
    if spare:
        spare[0].legend(handles=handles, loc="center", frameon=False, title="colour = matched component")
    else:
        figure.legend(handles=handles, loc="outside lower center", ncols=ncols + 1, frameon=False)
    projection = " (first two principal components)" if x.shape[1] > 2 else ""
    figure.suptitle(f"{experiment.path.name}: fitted components{projection}")
    return _save(figure, out / f"{experiment.path.name}-components.png")


def _plot_heatmaps(experiment: Experiment, panels: list[_Panel], pivot: str, out: Path) -> Path | None:
    """One heat map per panel of ``pivot`` (K, D): rows in matched-component order, each labelled
    with its weight in its component's colour, one colour bar for all."""
    shown = [p for p in panels if p.params[pivot].dim() == 2]
    if not shown:
        return None
    dim = shown[0].params[pivot].shape[1]
    top = max(float(p.params[pivot].max()) for p in shown)
    figure, axes = plt.subplots(
        len(shown),
        1,
        figsize=(max(7.0, 0.16 * dim + 3), 1.4 + sum(0.3 * p.colors.size + 0.6 for p in shown)),
        squeeze=False,
        sharex=True,
        layout="constrained",
        height_ratios=[p.colors.size for p in shown],
    )
    images = []
    for ax, panel in zip(axes[:, 0], shown, strict=True):
        order = np.argsort(panel.colors, kind="stable")
        values = panel.params[pivot].numpy()[order]
        weights = panel.params["weights"].numpy()[order] if "weights" in panel.params else None
        images.append(
            ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
        )
        labels = [
            f"{panel.colors[k] + 1}" + ("" if weights is None else f" (π={weights[i]:.2f})")
            for i, k in enumerate(order)
        ]
        ax.set_yticks(range(len(order)), labels, fontsize=7)
        for tick, k in zip(ax.get_yticklabels(), order, strict=True):
            tick.set_color(component_color(int(panel.colors[k])))
        ax.set_title(panel.title.replace("\n", ", "), fontsize=9, loc="left")
    names = [experiment.feature_name(j) for j in range(dim)]
    every = max(1, math.ceil(dim / 32))
    axes[-1, 0].set_xticks(range(0, dim, every), names[::every], rotation=90, fontsize=6)
    axes[-1, 0].set_xlabel("feature")
    figure.colorbar(images[0], ax=axes[:, 0].tolist(), label=_PIVOT_LABELS.get(pivot, pivot), shrink=0.8)
    figure.supxlabel(
        "rows: component (weight π), numbered and coloured as the matched components", fontsize=8
    )
    figure.suptitle(f"{experiment.path.name}: fitted components ({pivot})")
    return _save(figure, out / f"{experiment.path.name}-components.png")


# ---- hidden Markov models --------------------------------------------------------------------

SEQUENCES_SHOWN = 5  # the first train sequences the state figure draws
STEPS_PER_STRIP = 100  # a longer sequence wraps onto more strips, cells staying wide enough to see
STRIPS = 8  # at most; the steps beyond are left out, as the title says


def _sequential_panels(experiment: Experiment) -> list[_Panel]:
    """``_panels`` of a sequential model (its pivot matched to the truth's, else the first
    backend's), or none for a model of independent points."""
    model = experiment.model_class
    if model is None or not model.sequential:
        return []
    return [p for p in _panels(experiment, model.pivot) if "transitions" in p.params]


def _in_colour_order(experiment: Experiment, panel: _Panel) -> dict[str, torch.Tensor]:
    """The panel's parameters with its components in the order of their colours (the matched
    reference components'), along every component axis: both of a transition matrix's."""
    model = experiment.model_class
    assert model is not None
    order = torch.as_tensor(np.argsort(panel.colors, kind="stable"))
    return permute(panel.params, order, model.component_axes)


def _state_labels(ax: plt.Axes, colors: np.ndarray, axis: str) -> None:
    """Tick labels 1..K of the states in colour order, each in its component's colour."""
    shown = np.sort(colors)
    labels = [str(int(c) + 1) for c in shown]
    if axis in ("x", "both"):
        ax.set_xticks(range(len(shown)), labels)
        for tick, c in zip(ax.get_xticklabels(), shown, strict=True):
            tick.set_color(component_color(int(c)))
            tick.set_fontweight("bold")
    if axis in ("y", "both"):
        ax.set_yticks(range(len(shown)), labels)
        for tick, c in zip(ax.get_yticklabels(), shown, strict=True):
            tick.set_color(component_color(int(c)))
            tick.set_fontweight("bold")


def transitions_figure(experiment: Experiment) -> plt.Figure | None:
    """One heat map per panel (the truth's, then each backend's) of the transition matrix
    p(z_t+1 = j | z_t = i), rows the state moved from: states in the order of the matched
    reference's (both axes permuted alike), each cell annotated with its probability, one colour
    scale 0..1 for all. None for a model without transitions."""
    panels = _sequential_panels(experiment)
    if not panels:
        return None
    k = max(p.colors.size for p in panels)
    width = max(7.5, max(2.6, 0.55 * k + 1.0) * len(panels) + 1.4)
    side = (width - 1.4) / len(panels)  # square panels: titles, labels and colour bar around them
    figure, axes = plt.subplots(
        1,
        len(panels),
        figsize=(width, side + 1.9),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, panel in zip(axes[0], panels, strict=True):
        values = _in_colour_order(experiment, panel)["transitions"].numpy()
        image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        if values.shape[0] <= 12:  # beyond, the numbers no longer fit their cells
            for (i, j), value in np.ndenumerate(values):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=9 if values.shape[0] <= 6 else 7,
                    color="white" if value > 0.6 else "0.1",
                )
        _state_labels(ax, panel.colors, "both")
        ax.set_xlabel("to state")
        ax.set_ylabel("from state")
        ax.set_title(panel.title, fontsize=10)
        if len({p.colors.size for p in panels}) == 1:  # the same states in every panel
            ax.label_outer()
    assert image is not None
    figure.colorbar(image, ax=axes[0].tolist(), label="transition probability", shrink=0.85)
    figure.suptitle(
        f"{experiment.path.name}: transition matrices p(to state | from state),\n"
        "states numbered and coloured as the matched components",
        fontsize=11,
    )
    return figure


def plot_transitions(experiment: Experiment, out: Path) -> Path | None:
    """``transitions_figure`` saved as ``<experiment>-transitions.png`` in ``out``."""
    figure = transitions_figure(experiment)
    return None if figure is None else _save(figure, out / f"{experiment.path.name}-transitions.png")


def _train_lengths(experiment: Experiment, n: int) -> np.ndarray | None:
    """The lengths of the train sequences, when the ``n`` kept train rows are all of them (in
    order): as the run kept them in sample.safetensors, or as data.json determines them (one
    sequence, or sequences of one length); else None."""
    try:  # kept by the run when the sample holds every train row
        kept = load_file(str(experiment.path / Files.SAMPLE)).get("lengths")
    except (OSError, SafetensorError):
        kept = None
    if kept is not None and int(kept.sum()) == n:
        return kept.numpy()
    data = experiment.data
    n_train, count = data.get("n_train"), data.get("n_sequences_train")
    shortest, longest = data.get("min_length"), data.get("max_length")
    if n_train != n:
        return None
    if count is None or count == 1:
        return np.array([n])
    if isinstance(count, int) and shortest == longest and isinstance(shortest, int) and count * shortest == n:
        return np.full(count, shortest)
    return None


def _true_states(experiment: Experiment) -> np.ndarray | None:
    """The simulated states of the train rows (N,), from a backend's assignments.csv."""
    for _, row in experiment.runs.iterrows():
        try:
            labels = pd.read_csv(Path(row["path"]) / Files.ASSIGNMENTS, usecols=["label"])["label"]
        except (OSError, ValueError, pd.errors.ParserError):
            continue
        return labels.to_numpy(dtype=int)
    return None


def _viterbi(
    experiment: Experiment, x: np.ndarray, lengths: np.ndarray, params: Mapping[str, torch.Tensor]
) -> np.ndarray | None:
    """The most probable state path of the rows ``x`` cut into ``lengths`` under ``params`` (the
    model rebuilt from the saved config); None when it cannot be."""
    model_class = experiment.model_class
    if model_class is None:
        return None
    fields = {**experiment.model, "k": int(params[model_class.pivot].shape[0]), "prior": "none"}
    if "covariance" in fields:  # saved covariances are full matrices whatever the type
        fields["covariance"] = "full"
    try:
        points = torch.as_tensor(x)
        model = model_class.from_config(model_class.options.model_validate(fields), points).bind(lengths)
    except (ValueError, RuntimeError, KeyError):  # a config from another version
        return None
    if not model.sequential:
        return None
    return model.most_probable_states(points, params).numpy()


def _strips(lengths: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(sequence, its first row, first step, end step) of each strip: every sequence cut into
    ``STEPS_PER_STRIP`` steps at a time, at most ``STRIPS`` strips in all."""
    offsets = np.cumsum(lengths) - lengths
    strips = [
        (i, int(offset), begin, min(begin + STEPS_PER_STRIP, int(length)))
        for i, (offset, length) in enumerate(zip(offsets, lengths, strict=True))
        for begin in range(0, int(length), STEPS_PER_STRIP)
    ]
    return strips[:STRIPS]


def states_figure(experiment: Experiment) -> plt.Figure | None:
    """For each of the first train sequences (at most ``SEQUENCES_SHOWN``), one strip per panel:
    the simulated states (when the truth is known) and each backend's Viterbi path, a cell per
    time step coloured as the matched component, a dot where a path leaves the simulated one.
    None for a model without transitions, or when the run directory does not determine the train
    sequences."""
    panels = _sequential_panels(experiment)
    sample = _read_sample(experiment)
    if not panels or sample is None:
        return None
    lengths = _train_lengths(experiment, sample.shape[0])
    if lengths is None:
        return None
    lengths = lengths[:SEQUENCES_SHOWN]
    x = sample[: int(lengths.sum())]
    rows, names = [], []
    truth_row = False
    for panel in panels:
        truth = panel.title.startswith("truth")
        if truth:
            states = _true_states(experiment)
            states = None if states is None else states[: x.shape[0]]
        else:
            states = _viterbi(experiment, x, lengths, panel.params)
        if states is not None and states.size == x.shape[0]:
            rows.append(panel.colors[states])
            names.append(panel.title.split("\n")[0])
            truth_row |= truth
    if not rows:
        return None
    paths = np.stack(rows)  # (rows, N) colour indices
    n_colors = int(paths.max()) + 1
    strips = _strips(lengths)
    width = max(stop - begin for _, _, begin, stop in strips)
    figure, axes = plt.subplots(
        len(strips),
        1,
        figsize=(min(14.0, max(8.0, 0.13 * width + 3.0)), 1.3 + len(strips) * (0.26 * len(rows) + 0.45)),
        squeeze=False,
        layout="constrained",
    )
    cmap = ListedColormap([component_color(c) for c in range(n_colors)])
    for ax, (sequence, offset, begin, stop) in zip(axes[:, 0], strips, strict=True):
        strip = paths[:, offset + begin : offset + stop]
        ax.imshow(
            strip,
            cmap=cmap,
            vmin=-0.5,
            vmax=n_colors - 0.5,
            aspect="auto",
            interpolation="nearest",
            extent=(begin + 0.5, stop + 0.5, len(rows) - 0.5, -0.5),
        )
        ax.set_xlim(begin + 0.5, begin + width + 0.5)  # one cell width on every strip
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        if width <= 60:  # cell borders, while cells are wide enough to show them
            ax.set_xticks(np.arange(begin + 1.5, stop, 1.0), minor=True)
        ax.set_yticks(np.arange(0.5, len(rows) - 1, 1.0), minor=True)
        ax.grid(which="minor", color="white", lw=0.8)
        ax.tick_params(which="minor", length=0)
        ax.spines[["top", "right"]].set_visible(False)
        if truth_row:  # where a backend's path leaves the simulated one
            wrong = np.argwhere(strip[1:] != strip[0])
            ax.plot(wrong[:, 1] + begin + 1, wrong[:, 0] + 1, "o", color="black", ms=3, ls="")
        length = int(lengths[sequence])
        steps = f"{length} steps" if stop - begin == length else f"steps {begin + 1}-{stop} of {length}"
        ax.set_title(f"train sequence {sequence + 1} ({steps})", fontsize=9, loc="left")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[-1, 0].set_xlabel("time step t")
    handles: list[Any] = [
        Patch(color=component_color(c), label=f"state {c + 1}") for c in sorted(set(paths.ravel().tolist()))
    ]
    if truth_row:
        handles.append(Line2D([], [], marker="o", color="black", ms=3, ls="", label="differs from the truth"))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    figure.suptitle(
        f"{experiment.path.name}: most probable (Viterbi) state paths\n"
        f"of the first {'train sequence' if len(lengths) == 1 else f'{len(lengths)} train sequences'}, "
        "states coloured as the matched components",
        fontsize=11,
    )
    return figure


def plot_states(experiment: Experiment, out: Path) -> Path | None:
    """``states_figure`` saved as ``<experiment>-states.png`` in ``out``."""
    figure = states_figure(experiment)
    return None if figure is None else _save(figure, out / f"{experiment.path.name}-states.png")


# ---- models side by side ---------------------------------------------------------------------


def _model_run(experiment: Experiment) -> pd.Series | None:
    """The run that stands for an experiment's model: its em run, else its best backend by train
    log-likelihood."""
    runs = experiment.runs
    em = runs[runs["backend"] == "em"]
    if len(em):
        return em.iloc[0]
    if "train_log_likelihood" not in runs.columns:
        return None
    scores = pd.to_numeric(runs["train_log_likelihood"], errors="coerce")
    return None if scores.isna().all() else runs.loc[scores.idxmax()]


def _data_view(experiment: Experiment, x: np.ndarray) -> _View:
    """``_View.of``, but two standardized features are shown in the data's own units, by the
    standardization data.json records: x · scale + center = (x + center / scale) @ diag(scale)."""
    standardization = experiment.data.get("standardization")
    names = experiment.data.get("feature_names")
    if x.shape[1] != 2 or not isinstance(standardization, dict) or not isinstance(names, list):
        return _View.of(experiment, x)
    scale = np.asarray(standardization["scale"], dtype=np.float64)
    center = np.asarray(standardization["center"], dtype=np.float64)
    return _View(-center / scale, np.diag(scale), (str(names[0]), str(names[1])), False)


_SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _by_color(colors: np.ndarray) -> list[tuple[int, int]]:
    """(component index, colour index) pairs, in colour order (the legend's)."""
    return [(int(k), int(colors[k])) for k in np.argsort(colors, kind="stable")]


def _model_title(model: str, row: pd.Series, params: Mapping[str, torch.Tensor], colors: np.ndarray) -> str:
    estimate = _ESTIMATES.get(str(row.get("point_estimate")), "")
    lines = [f"{model}: {row['backend']}{estimate}"]
    ll = _number(row.get("train_log_likelihood"))
    if ll is not None:
        lines.append(f"train log-lik. {ll:.4g} per point")
    if "dofs" in params:  # a t: its ellipses are scale matrices, and its tails have a ν each
        dofs = ", ".join(
            f"ν{str(c + 1).translate(_SUBSCRIPT)} = {float(params['dofs'][k]):.3g}"
            for k, c in _by_color(colors)
        )
        lines.append(f"{dofs}; ellipses: scale matrices Σ_k")
    else:
        lines.append("ellipses: covariances")
    return "\n".join(lines)


def models_figure(experiments: Sequence[Experiment]) -> plt.Figure | None:
    """One panel per experiment, each a different model fitted to the same data: its em run (else
    its best backend) as the points coloured by their most probable component and each
    component's mean and 1σ / 2σ contours (of the covariance, or for a model with degrees of
    freedom, such as student_t_mixture, of the scale matrix Σ_k). Components are coloured as the
    first panel's (largest weight first) they are matched to by mean. Two standardized features
    are shown in the data's own units; beyond two, the first two principal components."""
    loaded = []
    for experiment in experiments:
        row, x, model = _model_run(experiment), _read_sample(experiment), experiment.model_class
        if row is None or x is None or model is None:
            continue
        try:
            params = {
                k: v.to(torch.float64) for k, v in load_file(str(Path(row["path"]) / Files.PARAMS)).items()
            }
        except (OSError, ValueError, RuntimeError):
            continue
        if "means" in params and "covariances" in params:
            loaded.append((experiment, model.name, row, x, params))
    if len(loaded) < 2:
        return None
    first = loaded[0][4]
    order = (
        np.argsort(-first["weights"].numpy(), kind="stable")
        if "weights" in first
        else np.arange(first["means"].shape[0])
    )
    view = _data_view(loaded[0][0], loaded[0][3])
    figure, axes = plt.subplots(
        1,
        len(loaded),
        figsize=(4.9 * len(loaded), 5.2),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    shown: set[int] = set()
    painted = True
    for ax, (experiment, name, row, x, params) in zip(axes[0], loaded, strict=True):
        colors = matched_colors(first["means"].numpy()[order], params["means"].numpy())
        shown |= {int(c) for c in colors}
        hard = _assignments(experiment, x, params)
        painted &= hard is not None
        _draw_panel(ax, view.points(x), hard, view.gaussians(params), colors, (12.0, 0.7))
        ax.set_title(_model_title(name, row, params, colors), fontsize=10)
        ax.set_xlabel(view.names[0])
        ax.set_ylabel(view.names[1])
        ax.label_outer()
    handles = _legend_handles(painted, shown)
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, fontsize=9)
    data = loaded[0][0].data
    source = str(data.get("source", loaded[0][0].path.name))
    n = data.get("n_train")
    points = f", {n} train points" if isinstance(n, int) else ""
    figure.suptitle(f"{source}{points}: the same data, one panel per model")
    return figure


def plot_models(experiments: Sequence[Experiment], path: Path) -> Path | None:
    """``models_figure`` saved as ``path``."""
    figure = models_figure(experiments)
    return None if figure is None else _save(figure, path)


# ---- model selection -------------------------------------------------------------------------


def plot_selection(table: pd.DataFrame, chosen: Mapping[str, int | None], path: Path, title: str) -> Path:
    """Information criteria (lower is better) and, for variational backends, the ELBO (higher is
    better) against K, with the K each criterion picks starred."""
    elbo = pd.to_numeric(table["elbo"], errors="coerce")
    has_elbo = bool(elbo.notna().any())
    figure, axes = plt.subplots(
        1, 2 if has_elbo else 1, figsize=(11 if has_elbo else 6, 4.4), squeeze=False, layout="constrained"
    )
    ax = axes[0, 0]
    for color, name in zip(("C0", "C1", "C2"), ("bic", "aic", "icl"), strict=True):
        values = pd.to_numeric(table[name], errors="coerce")
        if values.notna().any():
            ax.plot(
                table["k"], values, marker="o", color=color, label=f"{name.upper()} (picks K={chosen[name]})"
            )
            if chosen[name] is not None:
                ax.plot(chosen[name], values[table["k"] == chosen[name]].iloc[0], "*", ms=16, color=color)
    ax.set_title("information criteria")
    ax.set_xlabel("number of components K")
    ax.set_ylabel("criterion (lower is better)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    if has_elbo:
        ax = axes[0, 1]
        ax.plot(table["k"], elbo, marker="o", color="C3", label=f"ELBO per point (picks K={chosen['elbo']})")
        if chosen["elbo"] is not None:
            ax.plot(chosen["elbo"], elbo[table["k"] == chosen["elbo"]].iloc[0], "*", ms=16, color="C3")
        effective = pd.to_numeric(table.get("effective_k"), errors="coerce")
        if effective is not None and effective.notna().any():
            for k, value, eff in zip(table["k"], elbo, effective, strict=True):
                if eff == eff:
                    ax.annotate(
                        f"eff. {int(eff)}",
                        (k, value),
                        textcoords="offset points",
                        xytext=(0, 8),
                        ha="center",
                        fontsize=8,
                    )
        ax.set_title("evidence lower bound (eff. = components in use)")
        ax.set_xlabel("number of components K")
        ax.set_ylabel("ELBO per point (higher is better)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)


# ---- sweeps -------------------------------------------------------------------------------------

_SWEEP_PANELS = [
    ("train_log_likelihood", "train log-likelihood per point"),
    ("fit_seconds", "fit seconds"),
    ("local_optimum_rate", "share of seeds below the best (local optima)"),
]


def plot_sweep(table: pd.DataFrame, keys: Sequence[str], path: Path, title: str) -> Path:
    """A sweep's aggregate: per backend, the mean over seeds of the train log-likelihood and of
    the fit time with their 95% bootstrap intervals as error bars, and the local-optimum rate,
    against the grid points (one line per backend, slightly offset so that bars do not hide each
    other)."""
    if keys:
        labels = table[list(keys)].astype(str).agg(", ".join, axis=1)
        xlabel = ", ".join(keys)
    else:
        labels = pd.Series(["all seeds"] * len(table), index=table.index)
        xlabel = ""
    order = list(dict.fromkeys(labels))
    position = {label: i for i, label in enumerate(order)}
    backends = list(dict.fromkeys(table["backend"]))
    panels = [(c, name) for c, name in _SWEEP_PANELS if c in table or f"{c}_mean" in table]
    figure, axes = plt.subplots(
        1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False, layout="constrained"
    )
    width = 0.6 / max(len(backends), 1)
    for ax, (column, name) in zip(axes[0], panels, strict=True):
        for b, backend in enumerate(backends):
            rows = table[table["backend"] == backend]
            x = (
                np.array([position[label] for label in labels[rows.index]])
                + (b - (len(backends) - 1) / 2) * width
            )
            if column in rows:  # a rate: no interval
                ax.plot(x, rows[column], "o", color=backend_color(backend), label=backend)
                ax.set_ylim(-0.05, 1.05)
                continue
            mean = rows[f"{column}_mean"].to_numpy(dtype=float)
            low = np.nan_to_num(mean - rows[f"{column}_ci_low"].to_numpy(dtype=float), nan=0.0)
            high = np.nan_to_num(rows[f"{column}_ci_high"].to_numpy(dtype=float) - mean, nan=0.0)
            ax.errorbar(
                x, mean, yerr=[low, high], fmt="o", capsize=4, color=backend_color(backend), label=backend
            )
        ax.set_xticks(range(len(order)), order, rotation=30 if len(order) > 4 else 0)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    n = int(table["n_seeds"].max()) if "n_seeds" in table else 0
    figure.suptitle(f"{title}: mean over {n} seeds, 95% bootstrap intervals")
    return _save(figure, path)


def plot_sweep_traces(
    traces: Mapping[str, Mapping[str, Sequence[pd.DataFrame]]], path: Path, title: str, panels: int = 6
) -> Path | None:
    """The exact train log-likelihood against wall time per backend, over a sweep's seeds: the
    median with a band from the 10th to the 90th percentile, one panel per grid point (the first
    ``panels``). ``traces``: grid point label → backend → each seed's metrics (``wall_seconds``,
    ``log_likelihood``). Each seed's curve holds its last evaluated value; a time enters the band
    once half the seeds have a value."""
    shown = [label for label, backends in traces.items() if any(backends.values())][:panels]
    if not shown:
        return None
    columns = min(3, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False, layout="constrained"
    )
    for ax, label in zip(axes.flat, shown, strict=False):
        for backend, runs in traces[label].items():
            curves = [
                run[["wall_seconds", "log_likelihood"]].dropna().sort_values("wall_seconds") for run in runs
            ]
            curves = [c for c in curves if not c.empty and (c["wall_seconds"] > 0).any()]
            if not curves:
                continue
            start = min(float(c["wall_seconds"][c["wall_seconds"] > 0].min()) for c in curves)
            stop = max(float(c["wall_seconds"].max()) for c in curves)
            grid = np.geomspace(start, max(stop, start * 1.0001), 200)
            values = np.full((len(curves), grid.size), np.nan)
            for i, curve in enumerate(curves):
                times, lls = curve["wall_seconds"].to_numpy(), curve["log_likelihood"].to_numpy()
                index = np.searchsorted(times, grid, side="right") - 1
                values[i] = np.where(index >= 0, lls[np.clip(index, 0, None)], np.nan)
            enough = np.sum(np.isfinite(values), 0) >= max(1, len(curves) / 2)
            if not enough.any():
                continue
            with np.errstate(all="ignore"):
                low, middle, high = np.nanpercentile(values[:, enough], [10, 50, 90], axis=0)
            color = backend_color(backend)
            ax.plot(grid[enough], middle, color=color, label=f"{backend} ({len(curves)} seeds)")
            ax.fill_between(grid[enough], low, high, color=color, alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(
            NullFormatter()
        )  # a short span labels its minor ticks on top of each other
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("wall seconds")
        ax.set_ylabel("train log-likelihood per point")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    figure.suptitle(f"{title}: median over seeds, 10–90% band")
    return _save(figure, path)
