"""Data loading, splitting and standardization."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.preprocessing import StandardScaler

from ppl_gmm import data as data_module
from ppl_gmm import distributed
from ppl_gmm.config import Config, DataConfig
from ppl_gmm.data import load_data
from ppl_gmm.errors import UserError
from ppl_gmm.experiment import simulator
from ppl_gmm.models.gmm import GaussianMixture


def test_synthetic_is_seeded_and_labelled() -> None:
    cfg = DataConfig(n=500, dim=3, k=4, separation=5.0, test_fraction=0.2)
    simulate = simulator(Config(data=cfg), GaussianMixture)
    a, b, c = load_data(cfg, 1, simulate), load_data(cfg, 1, simulate), load_data(cfg, 2, simulate)
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    assert a.train.shape == (400, 3) and a.test.shape == (100, 3)
    assert a.train_labels.shape == (400,) and a.test_labels.shape == (100,)
    means = a.truth["means"].numpy()
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(4, 1)]
    assert gaps.min() >= 5.0
    for k in range(4):  # points of each label sit around their true mean
        members = a.train.numpy()[a.train_labels == k]
        assert np.linalg.norm(members.mean(0) - means[k]) < 0.6


def test_csv_with_label_column(tmp_path) -> None:
    frame = pd.DataFrame({"a": [1.0, 2, 3, 4, 5], "kind": ["x", "y", "x", "y", "x"], "b": [0, 1, 0, 1, 2]})
    path = tmp_path / "cells.csv"
    frame.to_csv(path, index=False)
    data = load_data(DataConfig(source="csv", path=str(path), label_column="kind", test_fraction=0), 0)
    assert data.feature_names == ("a", "b")
    np.testing.assert_array_equal(data.train.numpy(), frame[["a", "b"]].to_numpy(dtype=float))
    np.testing.assert_array_equal(data.train_labels, [0, 1, 0, 1, 0])
    assert data.test is None and data.describe()["n_test"] == 0


def test_npy_file(tmp_path) -> None:
    array = np.arange(20, dtype=np.float32).reshape(10, 2)
    np.save(tmp_path / "x.npy", array)
    data = load_data(DataConfig(source="npy", path=str(tmp_path / "x.npy"), test_fraction=0.3), 0)
    assert data.train.dtype == torch.float64 and data.train.shape == (7, 2)
    both = np.sort(np.concatenate([data.train.numpy(), data.test.numpy()]), axis=0)
    np.testing.assert_array_equal(both, array.astype(np.float64))
    assert not data.has_labels


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_npy_without_a_split_stays_memory_mapped(tmp_path) -> None:
    """A float64 .npy with no test split and no standardizing is read through a memory map, never
    copied: loading, checking and hashing 160 MB of it adds almost no private memory."""
    path = tmp_path / "big.npy"
    rows = np.random.default_rng(0).normal(size=(1 << 16, 8))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=(20 * rows.shape[0], 8))
    for i in range(20):
        out[i * rows.shape[0] : (i + 1) * rows.shape[0]] = rows + i
    out.flush()
    del out
    before = _rss_anon_mb()
    data = load_data(DataConfig(source="npy", path=str(path), test_fraction=0), 0)
    digest = data.describe()["sha256"]
    grown = _rss_anon_mb() - before
    assert data.train.shape == (20 * rows.shape[0], 8) and data.train.dtype == torch.float64
    assert grown < 40, f"loading added {grown:.0f} MB of private memory for a 160 MB file"
    expected = np.concatenate([rows + i for i in range(20)])
    assert torch.equal(data.train[-5:], torch.from_numpy(expected[-5:]))
    assert digest == hashlib.sha256(expected.tobytes()).hexdigest()
    assert np.load(path, mmap_mode="r")[0, 0] == rows[0, 0]  # the file itself is untouched


@pytest.mark.parametrize(
    ("name", "shape", "labelled"),
    [("iris", (150, 4), True), ("wine", (178, 13), True), ("old_faithful", (272, 2), False)],
)
def test_builtin_sets(name: str, shape: tuple[int, int], labelled: bool) -> None:
    data = load_data(DataConfig(source=name, test_fraction=0), 0)
    assert tuple(data.train.shape) == shape and data.has_labels == labelled
    if name == "iris":
        np.testing.assert_array_equal(data.train.numpy(), load_iris().data)
    if name == "old_faithful":
        assert data.feature_names == ("eruptions", "waiting")
        assert 1.5 < float(data.train[:, 0].min()) and float(data.train[:, 1].max()) < 100


def test_split_is_a_seeded_partition() -> None:
    cfg = DataConfig(source="iris", test_fraction=0.2)
    data = load_data(cfg, 4)
    assert data.train.shape[0] == 120 and data.test.shape[0] == 30
    rows = {tuple(r) for r in np.concatenate([data.train.numpy(), data.test.numpy()]).tolist()}
    assert rows == {tuple(r) for r in load_iris().data.tolist()}
    assert not torch.equal(load_data(cfg, 5).train, data.train)


def test_standardize_uses_train_statistics() -> None:
    raw = load_data(DataConfig(source="wine", test_fraction=0.25), 0)
    scaled = load_data(DataConfig(source="wine", test_fraction=0.25, standardize=True), 0)
    scaler = StandardScaler().fit(raw.train.numpy())
    np.testing.assert_allclose(scaled.train.numpy(), scaler.transform(raw.train.numpy()), atol=1e-12)
    np.testing.assert_allclose(scaled.test.numpy(), scaler.transform(raw.test.numpy()), atol=1e-12)
    assert scaled.describe()["sha256"] != raw.describe()["sha256"]


# ---- where a bad value is: as a user counts in the file ----------------------------------------


def test_csv_non_finite_value_is_located_by_column_name_and_row(tmp_path) -> None:
    # the label column comes first, so the bad feature's position among the features (0) differs
    # from its position in the file (1): only its name identifies it
    text = "kind,b,c\nx,1,2\ny,3,4\nx,5,\ny,inf,8\nx,9,1\n"
    path = tmp_path / "cells.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_data(DataConfig(source="csv", path=str(path), label_column="kind", test_fraction=0), 0)
    message = str(info.value)
    assert message.startswith(f"{path}: 2 value(s) are missing, NaN or infinite"), message
    assert "column 'c', row 3 (counted from 1 below the header line)" in message, message
    # the row it names is the file's line after the header, and that line is the bad one
    assert text.splitlines()[3] == "x,5,"


def test_npy_non_finite_value_is_located_from_one_and_in_numpy_indices(tmp_path) -> None:
    array = np.ones((6, 3))
    array[4, 1] = np.nan
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(UserError) as info:
        load_data(DataConfig(source="npy", path=str(tmp_path / "x.npy"), test_fraction=0), 0)
    message = str(info.value)
    assert "1 value(s) are NaN or infinite" in message, message
    assert "row 5 (counted from 1), column 2 (x[4, 1] in NumPy)" in message, message


def test_csv_missing_label_is_located(tmp_path) -> None:
    path = tmp_path / "cells.csv"
    path.write_text("a,kind\n1,x\n2,\n3,y\n4,\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_data(DataConfig(source="csv", path=str(path), label_column="kind"), 0)
    message = str(info.value)
    assert "column 'kind' has 2 missing label(s), the first in row 2 (counted from 1" in message, message
    assert "data.label_column" in message, message


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int16])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
@pytest.mark.parametrize("shape", [(70_000, 3), (1000,)])
def test_npy_rows_by_plain_reads_equal_numpys_load(tmp_path: Path, dtype, version, shape) -> None:
    """The reader rank 0 hashes a sharded run's train split with: any rows, in any order, across
    read windows, as float64; a Fortran-ordered file is left to the memory map."""
    from ppl_gmm.data import _npy_rows

    rng = np.random.default_rng(0)
    array = (rng.normal(size=shape) * 100).astype(dtype)
    path = tmp_path / "x.npy"
    with path.open("wb") as handle:
        np.lib.format.write_array(handle, array, version=version)
    read = _npy_rows([path])
    assert read is not None
    expected = np.asarray(array, dtype=np.float64).reshape(shape[0], -1)
    for rows in (
        np.arange(shape[0]),
        rng.choice(shape[0], 500, replace=False),
        np.array([shape[0] - 1, 0, 5]),
    ):
        np.testing.assert_array_equal(read(rows), expected[rows])
    fortran = tmp_path / "f.npy"
    np.save(fortran, np.asfortranarray(rng.normal(size=(10, 3))))
    assert _npy_rows([fortran]) is None
    assert _npy_rows([path, fortran]) is None


# ---- a directory of .npy shards ----------------------------------------------------------------


def _write_shards(folder: Path, sizes: tuple[int, ...] = (37, 5, 58), width: int = 3) -> np.ndarray:
    """Shards of unequal sizes and dtypes whose names sort otherwise than they were written, a file
    that is no shard beside them; returns their rows in sorted file-name order, as float64."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    names, dtypes = ("b-01.npy", "a-10.npy", "b-00.npy"), (np.float64, np.int16, np.float32)
    parts = {}
    for name, size, dtype in zip(names, sizes, dtypes, strict=True):
        parts[name] = (rng.normal(size=(size, width)) * 50).astype(dtype)
        np.save(folder / name, parts[name])
    (folder / "README.txt").write_text("not a shard", encoding="utf-8")
    return np.concatenate([parts[name].astype(np.float64) for name in sorted(names)])


@pytest.mark.parametrize(("test_fraction", "standardize"), [(0.0, False), (0.3, True)])
def test_a_directory_of_shards_is_its_rows_as_one_file(tmp_path: Path, test_fraction, standardize) -> None:
    """A directory of shards loads, splits, standardizes and hashes as one .npy of the same rows."""
    expected = _write_shards(tmp_path / "shards")
    np.save(tmp_path / "whole.npy", expected)
    shards, whole = (
        load_data(
            DataConfig(source="npy", path=str(path), test_fraction=test_fraction, standardize=standardize), 4
        )
        for path in (tmp_path / "shards", tmp_path / "whole.npy")
    )
    assert torch.equal(shards.train, whole.train) and shards.train.shape[0] == round(
        100 * (1 - test_fraction)
    )
    assert (shards.test is None) == (whole.test is None) == (test_fraction == 0)
    if test_fraction:
        assert torch.equal(shards.test, whole.test)
    assert shards.describe()["sha256"] == whole.describe()["sha256"]
    assert shards.describe()["standardization"] == whole.describe()["standardization"]
    if not test_fraction:  # the rows in file-name order, against the bytes hashed independently
        np.testing.assert_array_equal(shards.train.numpy(), expected)
        assert shards.describe()["sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()


@pytest.mark.parametrize("test_fraction", [0.0, 0.25])
def test_ranks_map_only_the_shards_that_hold_their_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_fraction: float
) -> None:
    """Each of 3 ranks holds its contiguous share of the train (and test) rows that one process
    holds, mapping only the shards those rows lie in (a float64 share inside one shard stays a
    view of the map); rank 0 hashes the whole train split by plain reads, to one process's hash."""
    _write_shards(tmp_path / "shards", sizes=(25, 30, 45))  # in order: a-10 (30), b-00 (45), b-01 (25)
    cfg = DataConfig(source="npy", path=str(tmp_path / "shards"), test_fraction=test_fraction)
    alone = load_data(cfg, 4)
    mapped: list[int] = []
    real_map = data_module._NpyShards._map
    monkeypatch.setattr(data_module._NpyShards, "_map", lambda self, i: mapped.append(i) or real_map(self, i))
    monkeypatch.setattr(distributed, "agree", lambda error: None if error is None else str(error))
    for rank in range(3):
        mapped.clear()
        monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank, 3, 0))
        share = load_data(cfg, 4, world=distributed.World(rank, 3, 0))
        start, stop = distributed.shard_range(alone.n_train, rank, 3)
        assert torch.equal(share.train, alone.train[start:stop]) and share.n_train == alone.n_train
        if test_fraction:
            start_test, stop_test = distributed.shard_range(alone.n_test, rank, 3)
            assert torch.equal(share.test, alone.test[start_test:stop_test])
        else:  # the train rows are the file's rows [start, stop): which shards hold them is known
            holding = {
                f for f, (lo, hi) in enumerate([(0, 30), (30, 75), (75, 100)]) if lo < stop and start < hi
            }
            assert set(mapped) == holding, (rank, mapped)
        mapped.clear()
        if rank == 0:
            assert share.describe()["sha256"] == alone.describe()["sha256"]
            assert not mapped  # plain reads


def test_a_float64_window_inside_one_shard_stays_mapped(tmp_path: Path) -> None:
    """A rank's rows inside one float64 shard are a view of its map; rows across shards, or of
    another dtype, are a float64 array of their own."""
    expected = _write_shards(tmp_path / "shards", sizes=(25, 30, 45))  # b-01.npy (float64) is rows 75-99
    shards = data_module._NpyShards.open(tmp_path / "shards")
    assert [p.name for p in shards.paths] == ["a-10.npy", "b-00.npy", "b-01.npy"]
    for start, stop, mapped in [(80, 95, True), (10, 20, False), (70, 95, False), (0, 100, False)]:
        rows = shards.window(start, stop, keep=True)
        assert isinstance(rows, np.memmap) == mapped and rows.dtype == np.float64
        np.testing.assert_array_equal(rows, expected[start:stop])
    assert not isinstance(shards.window(80, 95), np.memmap)


def test_the_rows_of_several_files_by_plain_reads(tmp_path: Path) -> None:
    """The reader over several files: any rows, in any order, across files and read windows."""
    from ppl_gmm.data import _npy_rows

    rng = np.random.default_rng(1)
    parts = [
        rng.normal(size=(70_000, 2)),
        (rng.normal(size=(3, 2)) * 9).astype(np.int32),
        rng.normal(size=(0, 2)),
    ]
    parts.append(rng.normal(size=(900, 2)).astype(">f4"))
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], part)
    expected = np.concatenate([part.astype(np.float64) for part in parts])
    read = _npy_rows(paths)
    assert read is not None
    for rows in (np.arange(expected.shape[0]), rng.choice(expected.shape[0], 800, replace=False)):
        np.testing.assert_array_equal(read(rows), expected[rows])


def _save(path: Path, array: np.ndarray) -> None:
    np.save(path, array)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (
            lambda d: None,
            r"^data\.path: expected \.npy files \(the data set's shards\) in the directory \S+, "
            r"but found none\.$",
        ),
        (
            lambda d: _save(d / "b.npy", np.ones((4, 2))),
            r"^\S+/b\.npy: expected 3 columns, as a\.npy has .*found shape \(4, 2\)\.$",
        ),
        (
            lambda d: _save(d / "b.npy", np.ones(4)),
            r"^\S+/b\.npy: expected a 2-D array \(points × features\), but found shape \(4,\)\.$",
        ),
        (lambda d: _save(d / "b.npy", np.ones((2, 2, 3))), r"^\S+/b\.npy: expected a 2-D array"),
        (
            lambda d: _save(d / "b.npy", np.array([["x", "y", "z"]])),
            r"^\S+/b\.npy: expected a numeric array, but found dtype <U1\.$",
        ),
        (
            lambda d: _save(d / "b.npy", np.ones((3, 3), dtype=complex)),
            r"^\S+/b\.npy: expected a numeric array",
        ),
        (
            lambda d: _save(d / "b.npy", np.zeros(3, dtype=[("a", "f8")])),
            r"^\S+/b\.npy: expected a numeric array",
        ),
        (
            lambda d: _save(d / "b.npy", np.ones((0, 0))),
            r"^\S+/b\.npy: no feature columns \(shape \(0, 0\)\)\.$",
        ),
        (
            lambda d: (d / "b.npy").write_bytes(b"3,4,5\n"),
            r"^\S+/b\.npy: cannot read as a \.npy array \(.+\)\.$",
        ),
        (lambda d: (d / "b.npy").mkdir(), r"^\S+/b\.npy: cannot read as a \.npy array \(.+\)\.$"),
        (
            lambda d: (d / "b.npy").write_bytes((d / "a.npy").read_bytes()[:-8]),
            r"^\S+/b\.npy: expected 120 bytes of data for shape \(5, 3\) of dtype float64, but found "
            r"112: the file is truncated\.$",
        ),
    ],
    ids=[
        "empty",
        "columns",
        "1-d",
        "3-d",
        "strings",
        "complex",
        "structured",
        "no-columns",
        "text",
        "folder",
        "truncated",
    ],
)
def test_a_bad_shard_is_one_line_naming_it(tmp_path: Path, write, message: str) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "notes.csv").write_text("a,b\n1,2\n", encoding="utf-8")  # no .npy: ignored
    if "found none" not in message:
        np.save(folder / "a.npy", np.ones((5, 3)))
    write(folder)
    with pytest.raises(UserError, match=message) as info:
        load_data(DataConfig(source="npy", path=str(folder), test_fraction=0), 0)
    assert "\n" not in str(info.value)


def test_a_non_finite_value_in_a_shard_is_located_in_that_shard(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    bad = np.ones((4, 2))
    bad[2, 1] = np.inf
    np.save(folder / "0.npy", np.ones((3, 2)))
    np.save(folder / "1.npy", bad)
    with pytest.raises(UserError) as info:
        load_data(DataConfig(source="npy", path=str(folder), test_fraction=0), 0)
    assert str(info.value) == (
        f"{folder}: 1 value(s) are NaN or infinite; the first is in {folder / '1.npy'}, row 3 (counted "
        "from 1), column 2 (x[2, 1] in NumPy). Remove or impute them."
    )


def test_sequence_lengths_cut_the_rows_of_all_shards(tmp_path: Path) -> None:
    """data.lengths_path counts the rows of the shards concatenated (in one process)."""
    expected = _write_shards(tmp_path / "shards")
    np.savetxt(tmp_path / "lengths.txt", [30, 41, 29], fmt="%d")
    cfg = DataConfig(
        source="npy",
        path=str(tmp_path / "shards"),
        lengths_path=str(tmp_path / "lengths.txt"),
        test_fraction=0,
    )
    data = load_data(cfg, 0)
    np.testing.assert_array_equal(data.train.numpy(), expected)
    np.testing.assert_array_equal(data.train_lengths, [30, 41, 29])
    np.savetxt(tmp_path / "lengths.txt", [30, 41], fmt="%d")
    with pytest.raises(UserError, match=r"the sequence lengths sum to 71, but \S+shards has 100 rows"):
        load_data(cfg, 0)
