"""Data: synthetic mixtures with known truth, CSV and .npy files, built-in sets; split, standardize.

Everything is checked here, once: a bad file or value becomes a one-line ``UserError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .config import DataConfig
from .errors import UserError

__all__ = ["BUILTIN", "Checker", "Dataset", "Simulator", "load_data", "sha256_of"]


@dataclass(frozen=True)
class Dataset:
    """Train (and test) features as float64 CPU tensors, with true labels when known.

    train: (N, D); test: (M, D) or None; *_labels: (N,) / (M,) int arrays or None;
    truth: the generating parameters of synthetic data (weights, means, covariances) or None;
    center, scale: (D,) the train split's statistics when standardized (x - center) / scale, or None.
    """

    source: str
    train: Tensor
    test: Tensor | None
    train_labels: np.ndarray | None
    test_labels: np.ndarray | None
    feature_names: tuple[str, ...]
    truth: dict[str, Tensor] | None = None
    center: tuple[float, ...] | None = None
    scale: tuple[float, ...] | None = None

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def has_labels(self) -> bool:
        return self.train_labels is not None

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "n_train": int(self.train.shape[0]),
            "n_test": 0 if self.test is None else int(self.test.shape[0]),
            "dim": self.dim,
            "has_labels": self.has_labels,
            "feature_names": list(self.feature_names),
            "sha256": sha256_of(self.train),
            # what new data need to be scored by this run's fits (ppl-gmm assign)
            "standardization": None
            if self.center is None
            else {"center": list(self.center), "scale": list(self.scale or ())},
        }


HASH_ROWS = 1 << 16  # rows hashed (and checked) at a time: no full-size temporaries


def sha256_of(x: Tensor) -> str:
    """SHA-256 of the data as C-ordered float64 bytes, computed a chunk of rows at a time."""
    digest = hashlib.sha256()
    for rows in x.split(HASH_ROWS):
        digest.update(np.ascontiguousarray(rows.numpy(), dtype=np.float64).data)
    return digest.hexdigest()


Simulator = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray, dict[str, Tensor]]]
"""Draws n points (n, D), their labels (n,) and the generating parameters: the model's own
(``LatentModel.simulate``), handed in by the experiment."""

Checker = Callable[[np.ndarray, str], None]
"""Raises ``UserError`` naming the file if values lie outside the model's support."""


def _read_builtin_sklearn(name: str) -> Callable[[], tuple[np.ndarray, np.ndarray | None, list[str]]]:
    def load() -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        from sklearn import datasets

        bunch = getattr(datasets, f"load_{name}")()
        return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), list(bunch.feature_names)

    return load


def _read_digits(binary: bool) -> Callable[[], tuple[np.ndarray, np.ndarray | None, list[str]]]:
    """scikit-learn's 8×8 handwritten digits: each pixel counts the dark pixels (0-16) of a 4×4
    block of the original image; ``binary`` keeps only whether at least half of them are dark."""

    def load() -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        from sklearn import datasets

        bunch = datasets.load_digits()
        x = np.asarray(bunch.data, dtype=np.float64)
        if binary:
            x = (x >= 8).astype(np.float64)
        return x, np.asarray(bunch.target), list(bunch.feature_names)

    return load


def _read_packaged(filename: str) -> Callable[[], tuple[np.ndarray, np.ndarray | None, list[str]]]:
    def load() -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        with resources.files("ppl_gmm.datasets").joinpath(filename).open("r") as handle:
            frame = pd.read_csv(handle, comment="#")
        return frame.to_numpy(dtype=np.float64, copy=True), None, list(frame.columns)

    return load


BUILTIN: dict[str, Callable[[], tuple[np.ndarray, np.ndarray | None, list[str]]]] = {
    "iris": _read_builtin_sklearn("iris"),
    "wine": _read_builtin_sklearn("wine"),
    "old_faithful": _read_packaged("old_faithful.csv"),
    # old_faithful's 272 rows unchanged, then 14 gross outliers (~5%) drawn once by the rule in
    # the file's header: uniform in the box of twice the data's range on each side of its centre,
    # kept only outside the box of once its range (none near the clusters), seed 0. Not marked
    # as labels: labels are true classes, scored by ARI, and the outliers are no class.
    "old_faithful_outliers": _read_packaged("old_faithful_outliers.csv"),
    "digits": _read_digits(binary=False),
    "digits_binary": _read_digits(binary=True),
}


def _need_path(cfg: DataConfig) -> Path:
    if not cfg.path:
        raise UserError(f"data.path: data.source is {cfg.source!r}, so a file path is needed.")
    path = Path(cfg.path)
    if path.is_dir():
        raise UserError(f"data.path: {path} is a directory; name a {cfg.source} file.")
    if not path.is_file():
        raise UserError(f"data.path: file not found: {path}.")
    return path


def _read_csv(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    path = _need_path(cfg)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read as CSV ({detail}).") from None
    labels = None
    if cfg.label_column is not None:
        if cfg.label_column not in frame.columns:
            raise UserError(
                f"data.label_column: {path} has no column {cfg.label_column!r}; "
                f"its columns are {', '.join(map(str, frame.columns))}."
            )
        column = frame.pop(cfg.label_column)
        missing = np.flatnonzero(column.isna().to_numpy())
        if missing.size:
            raise UserError(
                f"{path}: column {cfg.label_column!r} has {missing.size} missing label(s), the first "
                f"in {_row(int(missing[0]), 'csv')}. Fill them in, or set data.label_column: null."
            )
        labels = pd.factorize(column, sort=True)[0]
    if frame.shape[1] == 0:
        raise UserError(f"{path}: no feature columns.")
    for name in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name]):
            raise UserError(
                f"{path}: column {name!r} is not numeric. Drop it, or name it in data.label_column."
            )
    # a writable copy: pandas hands out read-only views, which torch warns about
    return frame.to_numpy(dtype=np.float64, copy=True), labels, [str(c) for c in frame.columns]


def _read_npy(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    path = _need_path(cfg)
    if cfg.label_column is not None:
        raise UserError("data.label_column: only CSV files have named columns; set it to null.")
    try:
        # copy-on-write map: a file larger than memory is paged in as it is read, and the
        # array is writable for torch without ever writing to the file
        array = np.load(path, allow_pickle=False, mmap_mode="c")
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read as a .npy array ({exc}).") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise UserError(f"{path}: expected a numeric array, but found dtype {getattr(array, 'dtype', '?')}.")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise UserError(f"{path}: expected a 2-D array (points × features), but found shape {array.shape}.")
    if array.shape[1] == 0:
        raise UserError(f"{path}: no feature columns (shape {array.shape}).")
    return np.asarray(array, dtype=np.float64), None, [f"x{j}" for j in range(array.shape[1])]


def load_data(
    cfg: DataConfig, seed: int, simulate: Simulator | None = None, check: Checker | None = None
) -> Dataset:
    """Load or draw the data, check it (``check``: against the model's support), split it and
    optionally standardize it. ``simulate`` draws synthetic data."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    truth = None
    labels: np.ndarray | None
    if cfg.source == "synthetic":
        if simulate is None:
            raise UserError("data.source: synthetic data are drawn from a model, and none was given.")
        x, labels, truth = simulate(cfg.n, rng)
        names = [f"x{j}" for j in range(cfg.dim)]
    elif cfg.source == "csv":
        x, labels, names = _read_csv(cfg)
    elif cfg.source == "npy":
        x, labels, names = _read_npy(cfg)
    elif cfg.source in BUILTIN:
        x, labels, names = BUILTIN[cfg.source]()
    else:
        known = ", ".join(["synthetic", "csv", "npy", *sorted(BUILTIN)])
        raise UserError(f"data.source: unknown data source {cfg.source!r}. Known sources: {known}.")
    where = cfg.path if cfg.source in ("csv", "npy") else f"data set {cfg.source!r}"
    _check_values(x, where, names, cfg.source)
    if check is not None:
        check(x, str(where))

    order = rng.permutation(x.shape[0])
    n_test = int(round(cfg.test_fraction * x.shape[0])) if cfg.test_fraction > 0 else 0
    if cfg.test_fraction > 0:
        n_test = max(n_test, 1)
    n_train = x.shape[0] - n_test
    if n_train < 2:
        raise UserError(
            f"data.test_fraction: {where} has {x.shape[0]} points, which leaves {n_train} for "
            "training; at least 2 are needed. Lower data.test_fraction or use more data."
        )
    train_idx, test_idx = np.sort(order[:n_train]), np.sort(order[n_train:])
    # without a test split the train rows are all rows in order: a memory-mapped file stays mapped
    train, test = (x[train_idx], x[test_idx]) if n_test else (x, None)
    center = scale = None
    if cfg.standardize:
        # moments of x / max|x|, scaled back: values near the float64 limit do not overflow
        top = np.abs(train).max(axis=0)
        top[top == 0] = 1.0
        center, scale = top * (train / top).mean(axis=0), top * (train / top).std(axis=0)
        constant = np.flatnonzero(scale == 0)
        if constant.size:
            raise UserError(
                f"data.standardize: feature {names[constant[0]]!r} is constant in the train split, "
                "so it cannot be scaled. Drop it or set data.standardize: false."
            )
        train = (train - center) / scale
        test = None if test is None else (test - center) / scale
    return Dataset(
        source=cfg.source,
        train=torch.from_numpy(np.ascontiguousarray(train)),
        test=None if test is None else torch.from_numpy(np.ascontiguousarray(test)),
        train_labels=None if labels is None else np.asarray(labels)[train_idx],
        test_labels=None if labels is None or not n_test else np.asarray(labels)[test_idx],
        feature_names=tuple(names),
        truth=truth,
        center=None if center is None else tuple(center.tolist()),
        scale=None if scale is None else tuple(scale.tolist()),
    )


def _row(row: int, source: str) -> str:
    """A 0-based row index as a user counts rows in the file."""
    if source == "csv":
        return f"row {row + 1} (counted from 1 below the header line)"
    return f"row {row + 1} (counted from 1)"


def _cell(row: int, col: int, names: list[str], source: str) -> str:
    """A 0-based (row, column) as a user finds it: by name where columns have names."""
    if source == "npy":
        return f"{_row(row, source)}, column {col + 1} (x[{row}, {col}] in NumPy)"
    return f"column {names[col]!r}, {_row(row, source)}"


def _check_values(x: np.ndarray, where: object, names: list[str], source: str) -> None:
    if x.shape[0] < 2:
        raise UserError(f"{where}: has {x.shape[0]} point(s); at least 2 are needed.")
    count, first = 0, None
    for start in range(0, x.shape[0], HASH_ROWS):
        bad = ~np.isfinite(x[start : start + HASH_ROWS])
        if bad.any():
            count += int(bad.sum())
            if first is None:
                row, col = np.argwhere(bad)[0]
                first = (start + int(row), int(col))
    if first is not None:
        # pandas reads an empty CSV cell as NaN
        kind = "missing, NaN or infinite" if source == "csv" else "NaN or infinite"
        raise UserError(
            f"{where}: {count} value(s) are {kind}; the first is in {_cell(*first, names, source)}. "
            "Remove or impute them."
        )
