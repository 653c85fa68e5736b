"""Data: synthetic mixtures with known truth, CSV and .npy files (or a directory of .npy shards),
built-in sets; split, standardize.

Rows are independent points, or, with ``data.sequence_column`` (CSV) or ``data.lengths_path``
(.npy), consecutive runs of rows form sequences, which the split keeps whole.

Everything is checked here, once: a bad file or value becomes a one-line ``UserError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import distributed
from .config import DataConfig
from .errors import UserError

__all__ = [
    "BUILTIN",
    "Checker",
    "Dataset",
    "Shard",
    "Simulator",
    "check_sequence_lengths",
    "load_data",
    "sha256_of",
]


@dataclass(frozen=True)
class Shard:
    """A rank's view of data split over the ranks of a sharded run (``distributed``): the train
    and test splits' sizes over all ranks, and on rank 0 a reader of any rows of the whole train
    split, by index (rows (I,) -> (I, D) float64, standardized as the split is), for its hash
    and the figures' sample."""

    n_train: int
    n_test: int
    read_train: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass(frozen=True)
class Dataset:
    """Train (and test) features as float64 CPU tensors, with true labels when known.

    train: (N, D); test: (M, D) or None; *_labels: (N,) / (M,) int arrays or None;
    truth: the generating parameters of synthetic data (weights, means, covariances) or None;
    center, scale: (D,) the train split's statistics when standardized (x - center) / scale, or None.
    train_lengths: (S,) / test_lengths: (T,) int64 rows per sequence, in row order (as hmmlearn's
    ``lengths``; each sequence's rows are contiguous), or None: the rows are independent points.
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
    train_lengths: np.ndarray | None = None
    test_lengths: np.ndarray | None = None
    # a sharded run: train, test and their labels are this rank's contiguous share of each split
    shard: Shard | None = None

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])

    @property
    def n_train(self) -> int:
        """Rows of the train split (over all ranks of a sharded run)."""
        return self.shard.n_train if self.shard is not None else int(self.train.shape[0])

    @property
    def n_test(self) -> int:
        if self.shard is not None:
            return self.shard.n_test
        return 0 if self.test is None else int(self.test.shape[0])

    def train_rows(self, index: np.ndarray) -> Tensor:
        """Rows (I, D) of the whole train split by index (I,): in a sharded run, on rank 0 only."""
        if self.shard is None:
            return self.train[torch.from_numpy(index)]
        assert self.shard.read_train is not None, "only rank 0 reads the whole train split"
        return torch.from_numpy(self.shard.read_train(index))

    @property
    def has_labels(self) -> bool:
        return self.train_labels is not None

    def describe(self) -> dict[str, object]:
        return {
            "source": self.source,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "dim": self.dim,
            "has_labels": self.has_labels,
            "feature_names": list(self.feature_names),
            "sha256": self._sha256(),
            # what new data need to be scored by this run's fits (ppl-gmm assign)
            "standardization": None
            if self.center is None
            else {"center": list(self.center), "scale": list(self.scale or ())},
            **self._describe_sequences(),
        }

    def _sha256(self) -> str:
        """``sha256_of`` the whole train split; in a sharded run (rank 0) read a chunk at a time."""
        if self.shard is None:
            return sha256_of(self.train, self.train_lengths)
        digest = hashlib.sha256()
        for start in range(0, self.n_train, HASH_ROWS):
            rows = self.train_rows(np.arange(start, min(start + HASH_ROWS, self.n_train)))
            digest.update(np.ascontiguousarray(rows.numpy(), dtype=np.float64).data)
        return digest.hexdigest()

    def _describe_sequences(self) -> dict[str, int | None]:
        lengths = self.train_lengths
        if lengths is None:
            return dict.fromkeys(["n_sequences_train", "n_sequences_test", "min_length", "max_length"])
        return {
            "n_sequences_train": int(lengths.size),
            "n_sequences_test": 0 if self.test_lengths is None else int(self.test_lengths.size),
            "min_length": int(lengths.min()),  # of the train sequences
            "max_length": int(lengths.max()),
        }


HASH_ROWS = 1 << 16  # rows hashed (and checked) at a time: no full-size temporaries


def sha256_of(x: Tensor, lengths: np.ndarray | None = None) -> str:
    """SHA-256 of the data as C-ordered float64 bytes, computed a chunk of rows at a time, then of
    the sequence lengths as little-endian int64 when there are sequences (so that the same rows
    cut differently hash differently, and data without sequences hash as the rows alone)."""
    digest = hashlib.sha256()
    for rows in x.split(HASH_ROWS):
        digest.update(np.ascontiguousarray(rows.numpy(), dtype=np.float64).data)
    if lengths is not None:
        digest.update(b"lengths")
        digest.update(np.ascontiguousarray(lengths, dtype="<i8").data)
    return digest.hexdigest()


def check_sequence_lengths(lengths: np.ndarray, minimum: int, reason: str) -> None:
    """Raise ``UserError`` if a sequence has fewer than ``minimum`` rows; ``reason`` says who needs
    them, e.g. "the transitions of model 'gaussian_hmm' need 2 rows per sequence"."""
    short = np.flatnonzero(lengths < minimum)
    if short.size:
        raise UserError(
            f"data: {short.size} of the {lengths.size} train sequences have fewer than {minimum} rows "
            f"(the shortest has {int(lengths.min())}); {reason}. Drop or merge the short sequences."
        )


Simulator = Callable[
    [int, np.random.Generator], tuple[np.ndarray, np.ndarray, dict[str, Tensor], np.ndarray | None]
]
"""Draws n points (n, D), their labels (n,), the generating parameters and the lengths of the
sequences the rows form (None: independent points): the model's own (``LatentModel.simulate``),
handed in by the experiment."""

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


def _need_path(cfg: DataConfig, directory: bool = False) -> Path:
    """``data.path``, which names a file (or, with ``directory``, a file or a directory)."""
    if not cfg.path:
        raise UserError(f"data.path: data.source is {cfg.source!r}, so a file path is needed.")
    path = Path(cfg.path)
    if path.is_dir() and not directory:
        raise UserError(f"data.path: {path} is a directory; name a {cfg.source} file.")
    if path.is_dir():
        return path
    if not path.is_file():
        raise UserError(f"data.path: file not found: {path}.")
    return path


def _read_csv(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray | None, list[str], np.ndarray | None]:
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
    lengths = None if cfg.sequence_column is None else _sequence_lengths(frame, cfg.sequence_column, path)
    if frame.shape[1] == 0:
        raise UserError(f"{path}: no feature columns.")
    for name in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name]):
            raise UserError(
                f"{path}: column {name!r} is not numeric. Drop it, or name it in data.label_column."
            )
    # a writable copy: pandas hands out read-only views, which torch warns about
    return frame.to_numpy(dtype=np.float64, copy=True), labels, [str(c) for c in frame.columns], lengths


def _sequence_lengths(frame: pd.DataFrame, name: str, path: Path) -> np.ndarray:
    """Pops the sequence column off ``frame``; the rows of each of its values, which must be
    contiguous, form one sequence. Returns (S,) int64 lengths in row order."""
    if name not in frame.columns:
        raise UserError(
            f"data.sequence_column: {path} has no column {name!r}; "
            f"its columns are {', '.join(map(str, frame.columns))}."
        )
    column = frame.pop(name)
    missing = np.flatnonzero(column.isna().to_numpy())
    if missing.size:
        raise UserError(
            f"{path}: column {name!r} has {missing.size} missing sequence value(s), the first in "
            f"{_row(int(missing[0]), 'csv')}. Give every row the sequence it belongs to."
        )
    codes, values = pd.factorize(column, sort=False)  # codes count sequences in order of appearance
    back = np.flatnonzero(np.diff(codes) < 0)
    if back.size:
        row = int(back[0]) + 1
        raise UserError(
            f"{path}: column {name!r}: sequence {values.tolist()[codes[row]]!r} reappears in "
            f"{_row(row, 'csv')} after other sequences; the rows of a sequence must be contiguous. "
            f"Sort the rows by {name!r} (keeping each sequence's order), or give each run its own value."
        )
    starts = np.flatnonzero(np.diff(codes)) + 1
    return np.diff(np.concatenate([[0], starts, [codes.size]])).astype(np.int64)


def _read_npy(
    cfg: DataConfig, cast: bool = True
) -> tuple[np.ndarray | _NpyShards, np.ndarray | None, list[str], np.ndarray | None]:
    """The file's array, memory-mapped; in float64 with ``cast`` (else as stored, for a rank of a
    sharded run to convert only its rows). A directory's shards are concatenated in float64 with
    ``cast``, else left in their files (``_NpyShards``)."""
    path = _need_path(cfg, directory=True)
    if cfg.label_column is not None:
        raise UserError("data.label_column: only CSV files have named columns; set it to null.")
    if path.is_dir():
        shards = _NpyShards.open(path)
        n_rows = shards.shape[0]
        lengths = None if cfg.lengths_path is None else _read_lengths(Path(cfg.lengths_path), n_rows, path)
        x = shards.window(0, n_rows) if cast else shards
        return x, None, [f"x{j}" for j in range(shards.width)], lengths
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
    lengths = (
        None if cfg.lengths_path is None else _read_lengths(Path(cfg.lengths_path), array.shape[0], path)
    )
    array = np.asarray(array, dtype=np.float64) if cast else array
    return array, None, [f"x{j}" for j in range(array.shape[1])], lengths


@dataclass(frozen=True)
class _NpyHeader:
    """What a .npy file's header says: the array's shape, dtype and order, and where its data start."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int


_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _npy_header(path: Path) -> _NpyHeader:
    """The header of a .npy file, read without mapping the file (numpy's loader maps it for a
    header version without a public reader); ``UserError`` if it is no .npy file or too short
    for the array its header describes."""
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version in _HEADERS:
                shape, fortran, dtype = _HEADERS[version](handle)
                offset = handle.tell()
            else:
                mapped = np.load(path, allow_pickle=False, mmap_mode="r")
                shape, dtype, offset = mapped.shape, mapped.dtype, int(getattr(mapped, "offset", 0))
                fortran = bool(mapped.flags.f_contiguous and not mapped.flags.c_contiguous)
                del mapped
        size = path.stat().st_size
    except (ValueError, OSError, EOFError, TypeError, SyntaxError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"{path}: cannot read as a .npy array ({detail}).") from None
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size - offset < needed:
        raise UserError(
            f"{path}: expected {needed} bytes of data for shape {shape} of dtype {dtype}, but found "
            f"{max(size - offset, 0)}: the file is truncated."
        )
    return _NpyHeader(tuple(int(n) for n in shape), dtype, bool(fortran), offset)


@dataclass(frozen=True)
class _NpyShards:
    """The rows of a directory's .npy files (shards), taken in sorted file-name order, as one
    array (N, D). A file is memory-mapped only while rows of it are read: a rank of a sharded run
    maps the files that hold its rows alone.

    paths: (F,) the shards; starts: (F + 1,) each shard's first row in the whole, then N.
    """

    paths: tuple[Path, ...]
    starts: np.ndarray
    width: int

    @classmethod
    def open(cls, directory: Path) -> _NpyShards:
        """The ``*.npy`` files of ``directory`` (other files are ignored), checked from their
        headers alone: 2-D, numeric, the same number of columns."""
        paths = sorted((p for p in directory.iterdir() if p.name.endswith(".npy")), key=lambda p: p.name)
        if not paths:
            raise UserError(
                f"data.path: expected .npy files (the data set's shards) in the directory {directory}, "
                "but found none."
            )
        width, rows = None, []
        for path in paths:
            header = _npy_header(path)
            if header.dtype.kind not in "biuf":
                raise UserError(f"{path}: expected a numeric array, but found dtype {header.dtype}.")
            if len(header.shape) != 2:
                raise UserError(
                    f"{path}: expected a 2-D array (points × features), but found shape {header.shape}."
                )
            if header.shape[1] == 0:
                raise UserError(f"{path}: no feature columns (shape {header.shape}).")
            if width is not None and header.shape[1] != width:
                raise UserError(
                    f"{path}: expected {width} columns, as {paths[0].name} has (every shard of "
                    f"{directory} has the same columns), but found shape {header.shape}."
                )
            width = header.shape[1]
            rows.append(header.shape[0])
        assert width is not None
        return cls(tuple(paths), np.concatenate([[0], np.cumsum(rows)]).astype(np.int64), width)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.starts[-1]), self.width

    def _map(self, i: int) -> np.ndarray:
        # copy-on-write, as one file is mapped: writable for torch, the file never written
        return np.load(self.paths[i], allow_pickle=False, mmap_mode="c")

    def window(self, start: int, stop: int, keep: bool = False) -> np.ndarray:
        """Rows [start, stop) of the whole, in float64: with ``keep``, a view of the file's map
        where they lie in one float64 shard; else (or across shards) an array of their own."""
        ends = self.starts[1:]
        files = np.flatnonzero((self.starts[:-1] < np.minimum(stop, ends)) & (ends > start))
        parts = []
        for i in files.tolist():
            lo, hi = max(start, int(self.starts[i])), min(stop, int(self.starts[i + 1]))
            parts.append((lo - start, self._map(i)[lo - int(self.starts[i]) : hi - int(self.starts[i])]))
        if keep and len(parts) == 1 and parts[0][1].dtype == np.float64:
            return parts[0][1]
        out = np.empty((max(stop - start, 0), self.width), dtype=np.float64)
        for at, part in parts:
            out[at : at + part.shape[0]] = part
        return out

    def locate(self, row: int) -> tuple[Path, int]:
        """The shard that holds row ``row`` of the whole, and the row's number in it."""
        i = int(np.searchsorted(self.starts[1:], row, side="right"))  # shards that end before it
        return self.paths[i], row - int(self.starts[i])

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows (I, D) of the whole by index (I,), in any order, in float64."""
        ordered = bool(np.all(index[1:] >= index[:-1]))
        order = None if ordered else np.argsort(index, kind="stable")
        wanted = index if order is None else index[order]
        out = np.empty((wanted.size, self.width), dtype=np.float64)
        cuts = np.searchsorted(wanted, self.starts)  # where each shard's rows begin among the wanted
        for i in np.flatnonzero(cuts[1:] > cuts[:-1]).tolist():
            lo, hi = int(cuts[i]), int(cuts[i + 1])
            out[lo:hi] = self._map(i)[wanted[lo:hi] - self.starts[i]]
        if order is None:
            return out
        result = np.empty_like(out)
        result[order] = out
        return result


def _read_lengths(path: Path, n_rows: int, data_path: Path) -> np.ndarray:
    """(S,) int64 sequence lengths from a .npy file or a text file of one integer per line,
    checked: each at least 1, summing to the data's ``n_rows``."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "file not found"
        raise UserError(f"data.lengths_path: {what}: {path}.")
    try:
        with path.open("rb") as handle:
            is_npy = handle.read(6) == b"\x93NUMPY"
        lengths = np.load(path, allow_pickle=False) if is_npy else _read_lengths_text(path)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read as sequence lengths ({exc}).") from None
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise UserError(
            f"data.lengths_path: expected a 1-D array of integers (one length per sequence), but {path} "
            f"holds shape {lengths.shape} of dtype {lengths.dtype}."
        )
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        i = int(bad[0])
        raise UserError(
            f"{path}: every sequence length must be at least 1, but entry {i + 1} (counted from 1) "
            f"is {int(lengths[i])}."
        )
    # exact even where an int64 sum would overflow
    big = lengths.size > 0 and lengths.size * int(lengths.max()) >= 2**63
    total = int(lengths.sum(dtype=object)) if big else int(lengths.sum(dtype=np.int64))
    if total != n_rows:
        raise UserError(
            f"{path}: the sequence lengths sum to {total}, but {data_path} has {n_rows} rows; "
            "they must be equal."
        )
    return lengths.astype(np.int64)


def _read_lengths_text(path: Path) -> np.ndarray:
    values = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            values.append(int(line))
        except ValueError:
            raise UserError(
                f"{path}: line {number} is {line.strip()!r}, not an integer; "
                "expected one sequence length per line."
            ) from None
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        raise UserError(f"{path}: a sequence length does not fit in 64 bits.") from None


_Source = tuple[
    np.ndarray | _NpyShards, np.ndarray | None, list[str], np.ndarray | None, dict[str, Tensor] | None
]


def _read_source(
    cfg: DataConfig, rng: np.random.Generator, simulate: Simulator | None, cast: bool = True
) -> _Source:
    """The rows (N, D), labels, feature names, sequence lengths and (synthetic) truth; the rows
    are an array with ``cast``, and may be ``_NpyShards`` without."""
    _check_sequence_fields(cfg)
    truth = None
    x: np.ndarray | _NpyShards
    labels: np.ndarray | None
    lengths: np.ndarray | None = None
    if cfg.source == "synthetic":
        if simulate is None:
            raise UserError("data.source: synthetic data are drawn from a model, and none was given.")
        x, labels, truth, lengths = simulate(cfg.n, rng)
        names = [f"x{j}" for j in range(cfg.dim)]
    elif cfg.source == "csv":
        x, labels, names, lengths = _read_csv(cfg)
    elif cfg.source == "npy":
        x, labels, names, lengths = _read_npy(cfg, cast)
    elif cfg.source in BUILTIN:
        x, labels, names = BUILTIN[cfg.source]()
    else:
        known = ", ".join(["synthetic", "csv", "npy", *sorted(BUILTIN)])
        raise UserError(f"data.source: unknown data source {cfg.source!r}. Known sources: {known}.")
    return x, labels, names, lengths, truth


def load_data(
    cfg: DataConfig,
    seed: int,
    simulate: Simulator | None = None,
    check: Checker | None = None,
    world: distributed.World | None = None,
) -> Dataset:
    """Load or draw the data, check it (``check``: against the model's support), split it and
    optionally standardize it. ``simulate`` draws synthetic data. With ``world`` of R > 1 ranks
    (a sharded run), this rank keeps only its share of each split (``_load_shard``)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    if world is not None and world.size > 1:
        return _load_shard(cfg, rng, simulate, check, world)
    x, labels, names, lengths, truth = _read_source(cfg, rng, simulate)
    assert isinstance(x, np.ndarray)  # cast: shards are concatenated
    where = cfg.path if cfg.source in ("csv", "npy") else f"data set {cfg.source!r}"
    _check_values(x, where, names, cfg.source)
    if check is not None:
        check(x, str(where))

    train_lengths = test_lengths = None
    if lengths is None:
        train_idx, test_idx = _split(x.shape[0], cfg.test_fraction, rng, where, "points", 2)
    else:
        seq_train, seq_test = _split(lengths.size, cfg.test_fraction, rng, where, "sequences", 1)
        starts = np.cumsum(lengths) - lengths
        train_idx, test_idx = _rows_of(starts, lengths, seq_train), _rows_of(starts, lengths, seq_test)
        train_lengths = lengths[seq_train]
        test_lengths = lengths[seq_test] if seq_test.size else None
        if train_idx.size < 2:
            raise UserError(
                f"data.test_fraction: the {seq_train.size} train sequence(s) of {where} have "
                f"{train_idx.size} row(s); at least 2 are needed. Lower data.test_fraction or use more data."
            )
    n_test = test_idx.size
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
        train_lengths=train_lengths,
        test_lengths=test_lengths,
    )


def _load_shard(
    cfg: DataConfig,
    rng: np.random.Generator,
    simulate: Simulator | None,
    check: Checker | None,
    world: distributed.World,
) -> Dataset:
    """``load_data`` for one rank of a sharded run: the same split on every rank (it depends on
    the seed and the number of rows alone), of which this rank keeps a contiguous share of the
    train rows and of the test rows (``distributed.shard_range``): shares of the sorted train
    (and test) row numbers, so without a test split a rank's rows are a contiguous range of the
    file's. From a memory-mapped .npy, or the shards of a directory that hold them, it reads only
    those. Each rank checks its own rows, then the ranks agree on the first error
    (the lowest rank's), so that they fail together; the standardization's moments are sums over
    all ranks. Rank 0 keeps a reader of the whole train split (for its hash and the figures)."""
    error: UserError | None = None
    try:
        x, labels, names, lengths, truth = _read_source(cfg, rng, simulate, cast=False)
        where = cfg.path if cfg.source in ("csv", "npy") else f"data set {cfg.source!r}"
        if lengths is not None:
            raise UserError(
                f"data: expected independent rows in a sharded run ({world.size} ranks), but {where} "
                "holds sequences, which rows cut across ranks would break. Run it in one process."
            )
        train_idx, test_idx = _split(x.shape[0], cfg.test_fraction, rng, where, "points", 2)
        if train_idx.size < 2 * world.size:
            raise UserError(
                f"data: {train_idx.size} train points are too few for {world.size} ranks (2 each at "
                "least). Use fewer ranks or more data."
            )
        mine = train_idx[slice(*distributed.shard_range(train_idx.size))]
        mine_test = test_idx[slice(*distributed.shard_range(test_idx.size))]
        if test_idx.size:
            train = _rows(x, mine)
        else:  # the train rows are all rows in order: a slice of the file, kept mapped if float64
            train = _window(x, int(mine[0]), int(mine[-1]) + 1, keep=not cfg.standardize)
        test = _rows(x, mine_test)
        _check_values(train, where, names, cfg.source, mine)
        _check_values(test, where, names, cfg.source, mine_test, least=0)
        if check is not None:
            check(train, str(where))
            check(test, str(where))
    except UserError as exc:
        error = exc
    message = distributed.agree(error)
    if message is not None:
        raise UserError(message)
    center = scale = None
    if cfg.standardize:
        center, scale = _sharded_moments(train, train_idx.size, names)
        train, test = (train - center) / scale, (test - center) / scale
    reader = None
    if world.rank == 0:
        reader = _train_reader(x, _npy_paths(cfg, x), train_idx, center, scale)
    return Dataset(
        source=cfg.source,
        train=torch.from_numpy(np.ascontiguousarray(train)),
        test=torch.from_numpy(np.ascontiguousarray(test)) if test_idx.size else None,
        train_labels=None if labels is None else np.asarray(labels)[mine],
        test_labels=None if labels is None or not test_idx.size else np.asarray(labels)[mine_test],
        feature_names=tuple(names),
        truth=truth,
        center=None if center is None else tuple(center.tolist()),
        scale=None if scale is None else tuple(scale.tolist()),
        shard=Shard(int(train_idx.size), int(test_idx.size), reader),
    )


def _rows(x: np.ndarray | _NpyShards, index: np.ndarray) -> np.ndarray:
    """Rows of x (a memory map reads only those) as a float64 array of their own."""
    return x.take(index) if isinstance(x, _NpyShards) else np.array(x[index], dtype=np.float64)


def _window(x: np.ndarray | _NpyShards, start: int, stop: int, keep: bool) -> np.ndarray:
    """Rows [start, stop) of x in float64: with ``keep``, a view of a float64 memory map where
    the rows lie in one file; else an array of their own."""
    if isinstance(x, _NpyShards):
        return x.window(start, stop, keep)
    if keep and x.dtype == np.float64:
        return x[start:stop]
    return np.array(x[start:stop], dtype=np.float64)


def _npy_paths(cfg: DataConfig, x: np.ndarray | _NpyShards) -> tuple[Path, ...] | None:
    """The .npy files that hold the rows, in order; None for rows from another source."""
    if isinstance(x, _NpyShards):
        return x.paths
    return (Path(str(cfg.path)),) if cfg.source == "npy" else None


def _sharded_moments(train: np.ndarray, n: int, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The train split's center and scale (as ``load_data`` computes them) from sums over the
    ranks' rows train (n_r, D) of n in all."""
    top = distributed.all_max(torch.from_numpy(np.abs(train).max(axis=0, initial=0.0))).numpy()
    top[top == 0] = 1.0
    sums = torch.from_numpy((train / top).sum(axis=0))
    distributed.all_sum([sums])
    mean = sums.numpy() / n
    squares = torch.from_numpy(((train / top - mean) ** 2).sum(axis=0))
    distributed.all_sum([squares])
    center, scale = top * mean, top * np.sqrt(squares.numpy() / n)
    constant = np.flatnonzero(scale == 0)
    if constant.size:
        raise UserError(
            f"data.standardize: feature {names[constant[0]]!r} is constant in the train split, "
            "so it cannot be scaled. Drop it or set data.standardize: false."
        )
    return center, scale


def _train_reader(
    x: np.ndarray | _NpyShards,
    paths: Sequence[Path] | None,
    train_idx: np.ndarray,
    center: np.ndarray | None,
    scale: np.ndarray | None,
) -> Callable[[np.ndarray], np.ndarray]:
    """Rows of the whole train split by index, standardized as the split is: from the rows x
    in memory, or (``paths`` given) from the .npy files by plain reads (a memory map's pages
    would count in the process's memory: rank 0 reads the whole split for the data's hash)."""
    from_file = None if paths is None else _npy_rows(paths)

    def read(index: np.ndarray) -> np.ndarray:
        if from_file is not None:
            rows = from_file(train_idx[index])
        elif paths is None or isinstance(x, _NpyShards):
            rows = _rows(x, train_idx[index])  # shards map only while they are read
        else:
            source = np.load(paths[0], allow_pickle=False, mmap_mode="r")
            rows = _rows(source[:, None] if source.ndim == 1 else source, train_idx[index])
        return rows if center is None or scale is None else (rows - center) / scale

    return read


def _npy_rows(paths: Sequence[Path]) -> Callable[[np.ndarray], np.ndarray] | None:
    """Rows of C-ordered .npy files, concatenated in order, by row number, as float64, read with
    ``np.fromfile`` in windows of at most ``HASH_ROWS`` rows of a file; None where a file cannot
    be read so (Fortran order): map it instead."""
    headers = [_npy_header(path) for path in paths]
    if any(header.fortran or len(header.shape) not in (1, 2) or header.dtype.hasobject for header in headers):
        return None
    width = 1 if len(headers[0].shape) == 1 else headers[0].shape[1]
    starts = np.concatenate([[0], np.cumsum([header.shape[0] for header in headers])])

    def read(rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows, kind="stable")
        wanted = np.asarray(rows)[order]
        out = np.empty((wanted.size, width), dtype=np.float64)
        cuts = np.searchsorted(wanted, starts)  # where each file's rows begin among the wanted
        for f in np.flatnonzero(cuts[1:] > cuts[:-1]).tolist():
            _read_windows(paths[f], headers[f], wanted[cuts[f] : cuts[f + 1]] - starts[f], out[cuts[f] :])
        result = np.empty_like(out)
        result[order] = out
        return result

    return read


def _read_windows(path: Path, header: _NpyHeader, wanted: np.ndarray, out: np.ndarray) -> None:
    """Rows ``wanted`` (W,), sorted, of one file into out[:W], a window of rows at a time."""
    width = 1 if len(header.shape) == 1 else header.shape[1]
    row_bytes = width * header.dtype.itemsize
    with path.open("rb") as handle:
        i = 0
        while i < wanted.size:
            first = int(wanted[i])
            j = int(np.searchsorted(wanted, first + HASH_ROWS, side="left"))
            span = int(wanted[j - 1]) - first + 1
            handle.seek(header.offset + first * row_bytes)
            block = np.fromfile(handle, dtype=header.dtype, count=span * width).reshape(span, width)
            out[i:j] = block[wanted[i:j] - first]
            i = j


def _check_sequence_fields(cfg: DataConfig) -> None:
    if cfg.sequence_column is not None and cfg.source != "csv":
        fix = "give the lengths in data.lengths_path" if cfg.source == "npy" else "set it to null"
        raise UserError(
            f"data.sequence_column: expected null with data.source {cfg.source!r} (only CSV files have "
            f"named columns), but found {cfg.sequence_column!r}. Try: {fix}."
        )
    if cfg.lengths_path is not None and cfg.source != "npy":
        fix = "name the sequence column in data.sequence_column" if cfg.source == "csv" else "set it to null"
        raise UserError(
            f"data.lengths_path: expected null with data.source {cfg.source!r} (lengths cut .npy rows "
            f"into sequences), but found {cfg.lengths_path!r}. Try: {fix}."
        )
    if cfg.sequence_column is not None and cfg.sequence_column == cfg.label_column:
        raise UserError(
            f"data.sequence_column: {cfg.sequence_column!r} is also data.label_column; a column holds "
            "either the sequences or the true labels."
        )


def _split(
    n: int, test_fraction: float, rng: np.random.Generator, where: object, what: str, least: int
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded partition of ``n`` items (points or sequences) into sorted train and test indices:
    round(test_fraction · n) test items, at least one when test_fraction > 0."""
    order = rng.permutation(n)
    n_test = max(int(round(test_fraction * n)), 1) if test_fraction > 0 else 0
    n_train = n - n_test
    if n_train < least:
        raise UserError(
            f"data.test_fraction: {where} has {n} {what}, which leaves {n_train} for training; at least "
            f"{least} {'is' if least == 1 else 'are'} needed. Lower data.test_fraction or use more data."
        )
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def _rows_of(starts: np.ndarray, lengths: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """The row indices of the ``chosen`` sequences, in their order, each one's rows in order.

    starts, lengths: (S,) first row and rows of every sequence; chosen: (C,) sequence indices.
    """
    size = lengths[chosen]
    offset = np.cumsum(size) - size  # where each chosen sequence starts among the chosen rows
    return np.repeat(starts[chosen] - offset, size) + np.arange(int(size.sum()))


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


def _check_values(
    x: np.ndarray,
    where: object,
    names: list[str],
    source: str,
    rows: np.ndarray | None = None,
    least: int = 2,
) -> None:
    """Raise ``UserError`` at the first value of x that is not finite; ``rows`` (N,): the file's
    row of each row of x (default: x is the file)."""
    if x.shape[0] < least:
        raise UserError(f"{where}: has {x.shape[0]} point(s); at least {least} are needed.")
    count, first = 0, None
    for start in range(0, x.shape[0], HASH_ROWS):
        bad = ~np.isfinite(x[start : start + HASH_ROWS])
        if bad.any():
            count += int(bad.sum())
            if first is None:
                row, col = np.argwhere(bad)[0]
                first = (start + int(row), int(col))
    if first is not None and rows is not None:
        first = (int(rows[first[0]]), first[1])
    if first is not None:
        # pandas reads an empty CSV cell as NaN
        kind = "missing, NaN or infinite" if source == "csv" else "NaN or infinite"
        cell = _cell(*first, names, source)
        if source == "npy" and Path(str(where)).is_dir():  # a directory of shards: the shard's row
            shard, row = _NpyShards.open(Path(str(where))).locate(first[0])
            cell = f"{shard}, {_cell(row, first[1], names, source)}"
        raise UserError(
            f"{where}: {count} value(s) are {kind}; the first is in {cell}. Remove or impute them."
        )
