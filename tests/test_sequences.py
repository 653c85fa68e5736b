"""Sequences as data: a CSV sequence column or .npy lengths cut the rows into sequences, which the
split keeps whole; bad input is one line naming the field, the file and the row."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.preprocessing import StandardScaler

from ppl_gmm.cli import main
from ppl_gmm.config import DataConfig
from ppl_gmm.data import Dataset, check_sequence_lengths, load_data
from ppl_gmm.errors import UserError

LENGTHS = [3, 1, 5, 2, 4, 6, 2, 3, 1, 4, 5, 2]


def _frame(lengths: Sequence[int] = LENGTHS) -> pd.DataFrame:
    """One row per observation: ``seq`` the sequence's number, ``pos`` the row's place in it,
    ``run`` the sequence's name (names not in sorted order), ``kind`` a label from the row."""
    seq = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    names = [f"r{(7 * s) % len(lengths)}" for s in range(len(lengths))]
    return pd.DataFrame(
        {
            "seq": seq.astype(float),
            "run": [names[s] for s in seq],
            "pos": pos.astype(float),
            "kind": np.where(pos % 3 == 0, "start", "rest"),
            "noise": np.random.default_rng(3).normal(size=seq.size),
        }
    )


def _csv(tmp_path: Path, frame: pd.DataFrame, name: str = "seqs.csv") -> str:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def _csv_config(path: str, **fields: object) -> DataConfig:
    return DataConfig(source="csv", path=path, sequence_column="run", **fields)


def _chunks(x: torch.Tensor, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(x.numpy(), np.cumsum(lengths)[:-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_keeps_sequences_whole_and_in_order(tmp_path: Path, seed: int) -> None:
    frame = _frame()
    cfg = _csv_config(_csv(tmp_path, frame), label_column="kind", test_fraction=0.3)
    data = load_data(cfg, seed)
    assert data.feature_names == ("seq", "pos", "noise")
    assert data.train_lengths.dtype == np.int64 and data.test_lengths.dtype == np.int64
    assert data.test_lengths.size == round(0.3 * len(LENGTHS))
    seen: dict[str, list[int]] = {}
    for split, x, lengths in [
        ("train", data.train, data.train_lengths),
        ("test", data.test, data.test_lengths),
    ]:
        assert sum(lengths) == x.shape[0]
        for chunk, n in zip(_chunks(x, lengths), lengths, strict=True):
            number = int(chunk[0, 0])
            assert np.all(chunk[:, 0] == number), "a chunk mixes sequences"
            original = frame[frame["seq"] == number][["seq", "pos", "noise"]].to_numpy()
            np.testing.assert_array_equal(chunk, original)  # whole, rows in file order
            assert n == LENGTHS[number]
            seen.setdefault(split, []).append(number)
    assert sorted(seen["train"] + seen["test"]) == list(range(len(LENGTHS)))
    assert seen["train"] == sorted(seen["train"]) and seen["test"] == sorted(seen["test"])
    # labels follow the rows: factorized sorted, "rest" is 0 and "start" (pos % 3 == 0) is 1
    np.testing.assert_array_equal(data.train_labels, data.train.numpy()[:, 1] % 3 == 0)
    np.testing.assert_array_equal(data.test_labels, data.test.numpy()[:, 1] % 3 == 0)
    info = data.describe()
    assert (info["n_sequences_train"], info["n_sequences_test"]) == (len(seen["train"]), len(seen["test"]))
    assert info["min_length"] == min(LENGTHS[s] for s in seen["train"])
    assert info["max_length"] == max(LENGTHS[s] for s in seen["train"])


def test_one_row_sequences_split_as_independent_points(tmp_path: Path) -> None:
    """Sequences of one row each are drawn by the same seeded permutation as points."""
    path = _csv(tmp_path, _frame([1] * 40).drop(columns="kind"))
    points = load_data(DataConfig(source="csv", path=path, label_column="run", test_fraction=0.25), 5)
    cut = load_data(_csv_config(path, test_fraction=0.25), 5)
    assert torch.equal(points.train, cut.train) and torch.equal(points.test, cut.test)
    assert cut.train_lengths.tolist() == [1] * 30 and cut.test_lengths.tolist() == [1] * 10


def test_test_fraction_counts_sequences(tmp_path: Path) -> None:
    path = _csv(tmp_path, _frame([4, 4, 4]).drop(columns="kind"))
    assert load_data(_csv_config(path, test_fraction=0.01), 0).test_lengths.tolist() == [4]
    no_split = load_data(_csv_config(path, test_fraction=0), 0)
    assert no_split.test is None and no_split.test_lengths is None
    assert no_split.train_lengths.tolist() == [4, 4, 4] and no_split.describe()["n_sequences_test"] == 0
    with pytest.raises(UserError, match=r"has 3 sequences, which leaves 0 for training; at least 1 is"):
        load_data(_csv_config(path, test_fraction=0.9), 0)


def test_csv_and_npy_lengths_give_the_same_dataset(tmp_path: Path) -> None:
    frame = _frame()
    x = frame[["seq", "pos", "noise"]].to_numpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "lengths.npy", np.array(LENGTHS))
    (tmp_path / "lengths.txt").write_text("".join(f"{n}\n" for n in LENGTHS), encoding="utf-8")
    for standardize in (False, True):
        common = {"test_fraction": 0.25, "standardize": standardize}
        via_csv = load_data(_csv_config(_csv(tmp_path, frame.drop(columns="kind")), **common), 7)
        for lengths_file in ("lengths.npy", "lengths.txt"):
            npy = DataConfig(
                source="npy",
                path=str(tmp_path / "x.npy"),
                lengths_path=str(tmp_path / lengths_file),
                **common,
            )
            via_npy = load_data(npy, 7)
            assert torch.equal(via_csv.train, via_npy.train) and torch.equal(via_csv.test, via_npy.test)
            np.testing.assert_array_equal(via_csv.train_lengths, via_npy.train_lengths)
            np.testing.assert_array_equal(via_csv.test_lengths, via_npy.test_lengths)
            assert via_csv.describe()["sha256"] == via_npy.describe()["sha256"]
    scaled = load_data(npy.model_copy(update={"test_fraction": 0.2}), 3)
    raw = load_data(npy.model_copy(update={"test_fraction": 0.2, "standardize": False}), 3)
    scaler = StandardScaler().fit(raw.train.numpy())  # the train rows' statistics
    np.testing.assert_allclose(scaled.train.numpy(), scaler.transform(raw.train.numpy()), atol=1e-12)
    np.testing.assert_allclose(scaled.test.numpy(), scaler.transform(raw.test.numpy()), atol=1e-12)


def test_hash_covers_the_cut_only_when_there_are_sequences(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(6, 2))
    np.save(tmp_path / "x.npy", x)
    digests = []
    for cut in (None, [3, 3], [2, 4], [6]):
        lengths = None
        if cut is not None:
            lengths = str(tmp_path / f"cut{len(digests)}.npy")
            np.save(lengths, np.array(cut))
        data = load_data(
            DataConfig(source="npy", path=str(tmp_path / "x.npy"), lengths_path=lengths, test_fraction=0), 0
        )
        digests.append(data.describe()["sha256"])
    assert len(set(digests)) == 4
    assert digests[0] == hashlib.sha256(x.tobytes()).hexdigest()  # as before sequences existed


def test_independent_points_are_unchanged(tmp_path: Path) -> None:
    frame = _frame().drop(columns="kind")
    data = load_data(
        DataConfig(source="csv", path=_csv(tmp_path, frame), label_column="run", test_fraction=0), 0
    )
    assert data.train_lengths is None and data.test_lengths is None
    info = data.describe()
    assert all(
        info[key] is None for key in ("n_sequences_train", "n_sequences_test", "min_length", "max_length")
    )
    expected = frame[["seq", "pos", "noise"]].to_numpy()
    np.testing.assert_array_equal(data.train.numpy(), expected)
    assert info["sha256"] == hashlib.sha256(expected.tobytes()).hexdigest()
    positional = Dataset("x", data.train, None, None, None, ("a",))  # the fields' order is kept
    assert positional.train_lengths is None and positional.describe()["n_sequences_train"] is None


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_memory_mapped_npy_with_lengths_is_not_copied(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(1).normal(size=(4096, 3)))
    np.save(tmp_path / "lengths.npy", np.full(16, 256))
    cfg = DataConfig(
        source="npy", path=str(path), lengths_path=str(tmp_path / "lengths.npy"), test_fraction=0
    )
    for standardize, mapped in ((False, True), (True, False)):  # standardized rows are a new array
        data = load_data(cfg.model_copy(update={"standardize": standardize}), 0)
        pointer = data.train.data_ptr()
        assert any(lo <= pointer < hi for lo, hi in _mapped_ranges(path)) == mapped
        assert data.train_lengths.tolist() == [256] * 16


def test_check_sequence_lengths() -> None:
    check_sequence_lengths(np.array([2, 5, 3]), 2, "transitions need 2 rows")
    with pytest.raises(
        UserError,
        match=r"^data: 2 of the 4 train sequences have fewer than 2 rows \(the shortest has 1\); transitions",
    ):
        check_sequence_lengths(np.array([2, 1, 3, 1]), 2, "transitions need 2 rows")


# ---- bad input: one line naming the field, the file and the row ------------------------------------

GOOD_CSV = "run,a\nx,1\nx,2\ny,3\ny,4\n"


def _write(tmp_path: Path, name: str, content: str | np.ndarray) -> str:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        np.save(path, content)
    return str(path)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"sequence_column": "trial"},
            r"^data\.sequence_column: \S+seqs\.csv has no column 'trial'; its columns are run, a\.$",
        ),
        (
            {"sequence_column": "run", "label_column": "run"},
            r"^data\.sequence_column: 'run' is also data\.label_column",
        ),
        (
            {"lengths_path": "lengths.npy"},
            r"^data\.lengths_path: expected null with data\.source 'csv' .*data\.sequence_column",
        ),
    ],
)
def test_bad_csv_sequence_fields(tmp_path: Path, fields: dict[str, str], expected: str) -> None:
    path = _write(tmp_path, "seqs.csv", GOOD_CSV)
    with pytest.raises(UserError, match=expected):
        load_data(DataConfig(source="csv", path=path, **fields), 0)


@pytest.mark.parametrize(
    ("text", "value", "row"),
    [
        ("run,a\nx,1\nx,2\ny,3\nx,4\ny,5\n", "'x'", 4),
        ("run,a\n1,1\n2,2\n2,3\n3,4\n1,5\n", "1", 5),
    ],
)
def test_non_contiguous_sequence_names_value_and_row(tmp_path: Path, text: str, value: str, row: int) -> None:
    path = _write(tmp_path, "seqs.csv", text)
    with pytest.raises(UserError) as info:
        load_data(DataConfig(source="csv", path=path, sequence_column="run"), 0)
    message = str(info.value)
    assert f"sequence {value} reappears in row {row} (counted from 1 below the header line)" in message, (
        message
    )
    assert text.splitlines()[row].split(",")[0] == value.strip("'")  # the row a user finds in the file


def test_missing_sequence_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "seqs.csv", "run,a\nx,1\n,2\ny,3\n")
    with pytest.raises(
        UserError, match=r"column 'run' has 1 missing sequence value\(s\), the first in row 2 "
    ):
        load_data(DataConfig(source="csv", path=path, sequence_column="run"), 0)


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (
            DataConfig(source="npy", sequence_column="run"),
            r"^data\.sequence_column: expected null with data\.source 'npy' .*data\.lengths_path",
        ),
        (
            DataConfig(source="iris", sequence_column="run"),
            r"^data\.sequence_column: expected null with data\.source 'iris'",
        ),
        (
            DataConfig(source="synthetic", lengths_path="l.npy"),
            r"^data\.lengths_path: expected null with data\.source 'synthetic'",
        ),
    ],
)
def test_sequence_fields_need_their_source(cfg: DataConfig, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        load_data(cfg, 0)


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        (None, r"^data\.lengths_path: file not found: \S+lengths\.npy\.$"),
        (
            np.array([[2, 2], [1, 1]]),
            r"expected a 1-D array of integers .* holds shape \(2, 2\) of dtype int64",
        ),
        (np.array([3.0, 3.0]), r"expected a 1-D array of integers .* dtype float64"),
        (
            np.array([3, 0, 3]),
            r"lengths\.npy: every sequence length must be at least 1, but entry 2 \(counted from 1\) is 0\.$",
        ),
        (np.array([7, -1]), r"entry 2 \(counted from 1\) is -1"),
        (np.array([2, 2]), r"lengths\.npy: the sequence lengths sum to 4, but \S+x\.npy has 6 rows"),
        (np.array([2**62, 2**62, 2**62]), r"sum to 13835058055282163712, but \S+x\.npy has 6 rows"),
        ("2\nthree\n1\n", r"lengths\.npy: line 2 is 'three', not an integer"),
    ],
)
def test_bad_lengths(tmp_path: Path, lengths: str | np.ndarray | None, expected: str) -> None:
    x = _write(tmp_path, "x.npy", np.ones((6, 2)))
    path = str(tmp_path / "lengths.npy")
    if lengths is not None:  # a text file under a .npy name is read as text: the content decides
        _write(tmp_path, "lengths.npy", lengths)
    with pytest.raises(UserError, match=expected):
        load_data(DataConfig(source="npy", path=x, lengths_path=path), 0)


def _cli_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, overrides: list[str]) -> str:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump({"experiment": "tiny", "backends": {"em": {"max_iter": 3}}}), encoding="utf-8"
    )
    rc = main(["run", str(config), *overrides, "--runs-dir", "runs", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err, (rc, out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    return err.strip()


def test_cli_non_contiguous_sequence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    path = _write(tmp_path, "seqs.csv", "run,a\nx,1\nx,2\ny,3\nx,4\ny,5\n")
    line = _cli_error(
        tmp_path, monkeypatch, capsys, ["data.source=csv", f"data.path={path}", "data.sequence_column=run"]
    )
    assert line.startswith(f"error: {path}: column 'run': sequence 'x' reappears in row 4"), line


def test_cli_lengths_do_not_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    x = _write(tmp_path, "x.npy", np.ones((6, 2)))
    lengths = _write(tmp_path, "lengths.txt", "2\n3\n")
    line = _cli_error(
        tmp_path, monkeypatch, capsys, ["data.source=npy", f"data.path={x}", f"data.lengths_path={lengths}"]
    )
    assert (
        line == f"error: {lengths}: the sequence lengths sum to 5, but {x} has 6 rows; they must be equal."
    ), line
