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
    read = _npy_rows(path)
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
    assert _npy_rows(fortran) is None
