"""The Python face: ``run`` an experiment, ``load`` a run's backend as an estimator, ``assign`` new
data to a run's components. Like the command line, it only calls the experiment and reads the
run directory; errors are ``UserError`` with the command line's one-line messages."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from .config import Config, load_config, parse_config
from .data import Dataset
from .errors import UserError
from .estimator import Mixture, run_data
from .evaluate import assignments
from .experiment import Interrupted, Progress, Silent
from .experiment import run as run_experiment
from .runs import Files, Summary, write_csv

__all__ = ["RunResult", "assign", "load", "run"]


@dataclass(frozen=True)
class RunResult:
    """What an experiment left: its directory, resolved config, each backend's summary (the
    fields of its summary.json) and fitted parameters (float64 tensors as in its
    params.safetensors; completed backends only), in the config's order."""

    path: Path
    config: Config
    summaries: Mapping[str, Summary]
    params: Mapping[str, Mapping[str, Tensor]]

    @property
    def failed(self) -> list[str]:
        return [name for name, summary in self.summaries.items() if summary.status == "failed"]

    def estimator(self, backend: str | None = None) -> Mixture:
        """A backend's fit as a fitted ``Mixture`` (default: the first completed backend)."""
        name = backend if backend is not None else next(iter(self.params), None)
        if name is None or name not in self.params:
            done = ", ".join(self.params) or "none"
            raise UserError(f"backend {name!r} has no fitted parameters here; completed backends: {done}.")
        return Mixture.from_run(self.path / name)


class _Warnings(Silent):
    """Progress for Python callers: no bars; the run's warnings (a backend failed or did not
    converge) as Python warnings."""

    def message(self, text: str) -> None:
        warnings.warn(text.removeprefix("warning: "), RuntimeWarning, stacklevel=2)


def run(
    config: str | os.PathLike[str] | Mapping[str, Any] | Config,
    *,
    runs_dir: str | os.PathLike[str] = "runs",
    progress: Progress | None = None,
    quiet: bool = False,
    **overrides: Any,
) -> RunResult:
    """Run an experiment as ``ppl-gmm run`` does and return its results.

    ``config`` is a YAML file, a mapping of fields or a ``Config``. ``overrides`` set fields by
    their dotted path, as the command line's KEY=VALUE but with Python values: ``model__k=5``
    (scikit-learn's ``__`` for nesting) or ``**{"model.k": 5}``; a mapping value replaces the
    whole section, as ``backends={"em": {}}``. ``progress`` receives each step (an object with
    ``begin``, ``step``, ``end`` and ``message``); without one the run's warnings become Python
    warnings, and ``quiet`` silences them too.
    """
    items = [f"{key.replace('__', '.')}={_yaml(value)}" for key, value in overrides.items()]
    if isinstance(config, Config):
        cfg = parse_config(config.model_dump(mode="json"), items)
    elif isinstance(config, Mapping):
        cfg = parse_config(dict(config), items)
    else:
        cfg = load_config(Path(config), items)
    reporter = progress if progress is not None else Silent() if quiet else _Warnings()
    try:
        outcome = run_experiment(cfg, Path(runs_dir), reporter)
    except Interrupted as stop:
        raise KeyboardInterrupt(str(stop)) from None
    params = {
        name: MappingProxyType(load_file(str(outcome.path / name / Files.PARAMS)))
        for name in outcome.summaries
        if (outcome.path / name / Files.PARAMS).is_file()
    }
    resolved = load_config(outcome.path / Files.CONFIG)
    return RunResult(
        outcome.path, resolved, MappingProxyType(dict(outcome.summaries)), MappingProxyType(params)
    )


def _yaml(value: Any) -> str:
    """A Python value as the YAML text of a KEY=VALUE override."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    try:
        return yaml.safe_dump(value, default_flow_style=True, width=2**31).removesuffix("\n...\n").strip()
    except yaml.YAMLError:
        raise UserError(f"override: cannot write {value!r} as a config value.") from None


def load(path: str | os.PathLike[str]) -> Mixture:
    """A run's backend directory (or an experiment directory's best completed backend) as a
    fitted ``Mixture``: see ``Mixture.from_run``."""
    return Mixture.from_run(path)


def assign(
    run_dir: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Assign the rows of a CSV or .npy file to the components of a run's backend and write a
    CSV: ``hard`` (the most probable component), ``p0`` ... (the responsibilities),
    ``log_likelihood`` (log p(x_n | θ)) and ``label`` when the file has the run's label column.

    The file is read with the run's own data settings: a CSV's columns are picked by the run's
    feature names (other columns are ignored), a .npy array must have the run's number of columns,
    and the run's standardization (the train split's center and scale) is applied. ``out``
    defaults to ``<data file stem>.assignments.csv`` in the current directory; returns its path.
    """
    estimator = load(run_dir)
    experiment_dir = _experiment_dir(Path(run_dir))
    cfg = load_config(experiment_dir / Files.CONFIG)
    description = run_data(experiment_dir)
    path = Path(data_path)
    x, labels = _read_features(path, list(description["feature_names"]), cfg.data.label_column)
    if cfg.data.standardize:
        x = _standardize(x, description, experiment_dir)
    model, params = estimator.model_, estimator.params_
    model.check_data(x, str(path))
    rows = torch.from_numpy(x)
    frame = assignments(
        model, params, Dataset(path.name, rows, None, labels, None, tuple(description["feature_names"]))
    )
    frame.insert(
        frame.columns.get_loc("p0") + model.k, "log_likelihood", model.log_likelihood(rows, params).numpy()
    )
    target = Path(out) if out is not None else Path(f"{path.stem}.assignments.csv")
    write_csv(target, frame)
    return target


def _experiment_dir(run_dir: Path) -> Path:
    return run_dir if (run_dir / Files.CONFIG).is_file() else run_dir.parent


def _standardize(x: np.ndarray, description: Mapping[str, Any], experiment_dir: Path) -> np.ndarray:
    stats = description.get("standardization")
    if not isinstance(stats, Mapping):
        raise UserError(
            f"{experiment_dir / Files.DATA}: the run standardized its data (data.standardize: true) "
            "but did not keep the train split's center and scale, which runs made before ppl-gmm "
            "kept them lack. Run the experiment again to assign new data."
        )
    return (x - np.asarray(stats["center"], dtype=np.float64)) / np.asarray(stats["scale"], dtype=np.float64)


def _read_features(path: Path, names: list[str], label_column: str | None) -> tuple[np.ndarray, Any]:
    """The run's features of the rows of a CSV (by column name) or a .npy array (by position), as
    float64 (N, D), and the label column's values when a CSV has it."""
    if not path.is_file():
        raise UserError(f"{path}: file not found." if not path.exists() else f"{path}: not a file.")
    labels = None
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"{path}: cannot read as a .npy array ({exc}).") from None
        if array.dtype.kind not in "biuf" or array.ndim not in (1, 2):
            raise UserError(
                f"{path}: expected a numeric 2-D array, but found {array.dtype} of shape {array.shape}."
            )
        x = np.array(array.reshape(len(array), -1), dtype=np.float64)
        if x.shape[1] != len(names):
            raise UserError(
                f"{path}: has {x.shape[1]} columns, but the run was fitted on {len(names)} features "
                f"({', '.join(names)})."
            )
        columns = names
    else:
        try:
            frame = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: cannot read as CSV ({detail}).") from None
        frame.columns = [str(c) for c in frame.columns]
        missing = [name for name in names if name not in frame.columns]
        if missing:
            raise UserError(
                f"{path}: has no column {missing[0]!r}; the run's features are {', '.join(names)}."
            )
        for name in names:
            if not pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name]):
                raise UserError(f"{path}: column {name!r} is not numeric.")
        if label_column is not None and label_column in frame.columns:
            labels = frame[label_column].to_numpy()
        x = frame[names].to_numpy(dtype=np.float64, copy=True)
        columns = names
    if x.shape[0] == 0:
        raise UserError(f"{path}: has no rows.")
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise UserError(
            f"{path}: {int(bad.sum())} value(s) are missing, NaN or infinite; the first is in column "
            f"{columns[col]!r}, row {row + 1} (counted from 1). Remove or impute them."
        )
    return x, labels
