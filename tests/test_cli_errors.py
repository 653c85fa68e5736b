"""Bad usage, config and data through the command line: exit code 2, one `error:` line on stderr
that names the field or file, no traceback, nothing written. Plus the good path's layout."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ppl_gmm.cli import main

TINY = {"experiment": "tiny", "data": {"n": 200}, "backends": {"em": {"max_iter": 3}}}


def _run(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) in-process; argparse's usage errors exit by SystemExit, so take its code."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _write_yaml(path: Path, value: object) -> Path:
    path.write_text(yaml.safe_dump(value), encoding="utf-8")
    return path


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working folder; inputs go to inputs/, runs to runs/ (also the default)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inputs").mkdir()
    _write_yaml(tmp_path / "inputs" / "tiny.yaml", TINY)
    return tmp_path


def _expect_error(
    work: Path, argv: Sequence[str], names: Sequence[str], capsys: pytest.CaptureFixture[str]
) -> str:
    """Run argv (with --runs-dir runs) and check the bad-input contract; returns the line."""
    before = _snapshot(work)
    rc, out, err = _run([*argv, "--runs-dir", "runs"] if argv and argv[0] == "run" else argv, capsys)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error:"), line
    assert any(name in line for name in names), (names, line)
    assert out == "", out
    runs = work / "runs"
    assert not runs.exists() or not any(runs.iterdir()), sorted(_snapshot(runs))
    assert _snapshot(work) == before, "files were written"
    return line


def _csv(work: Path, name: str, text: str) -> str:
    path = work / "inputs" / name
    path.write_text(text, encoding="utf-8")
    return f"inputs/{name}"


def test_cuda_without_a_gpu(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    line = _expect_error(work, ["run", "inputs/tiny.yaml", "device=cuda", "--quiet"], ["device"], capsys)
    assert line.startswith("error: device: cuda") and "cpu or auto" in line, line


# ---------------------------------------------------------------------------------------------
# config fields, through KEY=VALUE overrides


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["seeed=1"], "seeed"),  # unknown top-level field
        (["model.kk=3"], "model.kk"),  # unknown nested field
        (["data.sourse=csv"], "data.sourse"),
        (["model.k=abc"], "model.k"),  # wrong type
        (["data.n=[1,2]"], "data.n"),
        (["model.k=0"], "model.k"),  # out of range
        (["model.k=-2"], "model.k"),
        (["data.test_fraction=1.5"], "data.test_fraction"),
        (["backends.foo={}"], "backends.foo"),  # unknown backend
        (["backends.em.max_iters=3"], "backends.em.max_iters"),  # unknown backend option
        (["backends.em.max_iter=-1"], "backends.em.max_iter"),
        (["backends.em=3"], "backends.em"),  # options that are not a mapping
        (["model.name=nomodel"], "model.name"),  # unknown model
        (["model.covariance=banana"], "model.covariance"),  # unknown covariance type
        (["model.prior=flat"], "model.prior"),
        (["data.source=nosuchsource"], "data.source"),  # unknown data source
        (["init.method=best"], "init.method"),
        (["device=tpu"], "device"),
        (["experiment=a/b"], "experiment"),
        (["model.k.x=1"], "model.k"),  # a scalar used as a section
        (["model.k=["], "model.k"),  # a value that is not valid YAML
        (["model.k={a: [}"], "model.k"),
        (["data.separation=.inf"], "data.separation"),  # non-finite numbers
        (["data.separation=1e200"], "data.separation"),  # overflows the synthetic draw
        (["init.reg_covar=.nan"], "init.reg_covar"),
        (
            ["model.prior=conjugate", "model.hyperparameters.mean_precision=.inf"],
            "model.hyperparameters.mean_precision",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_override(
    work: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], field: str
) -> None:
    line = _expect_error(work, ["run", "inputs/tiny.yaml", *overrides, "--quiet"], [field], capsys)
    assert line.startswith(f"error: {field}"), line


@pytest.mark.parametrize("item", ["model.k", "=3", "model..k=3", "model.k:3"])
def test_bad_key_value(work: Path, capsys: pytest.CaptureFixture[str], item: str) -> None:
    line = _expect_error(work, ["run", "inputs/tiny.yaml", item], [item], capsys)
    assert "KEY=VALUE" in line


# ---------------------------------------------------------------------------------------------
# config files


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({**TINY, "data": {"n": 200, "dimm": 2}}, "data.dimm"),  # misspelt nested field
        ({**TINY, "modle": {"k": 2}}, "modle"),  # misspelt top-level field
        ({**TINY, "backends": {"em": {"max_iter": 3}, "foo": {}}}, "backends.foo"),
        ({**TINY, "backends": {"em": {"max_itr": 3}}}, "backends.em.max_itr"),
        ({**TINY, "backends": {}}, "backends"),
        ({**TINY, "model": {"k": "three"}}, "model.k"),
        ({**TINY, "data": {"n": 200, "source": "nope"}}, "data.source"),
    ],
    ids=[
        "nested-typo",
        "top-typo",
        "unknown-backend",
        "unknown-option",
        "no-backend",
        "k-type",
        "source",
    ],
)
def test_bad_config_file(work: Path, capsys: pytest.CaptureFixture[str], config: dict, field: str) -> None:
    _write_yaml(work / "inputs" / "bad.yaml", config)
    line = _expect_error(work, ["run", "inputs/bad.yaml", "--quiet"], [field], capsys)
    assert line.startswith(f"error: {field}"), line


def test_missing_config_file(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _expect_error(work, ["run", "inputs/nope.yaml"], ["nope.yaml"], capsys)


def test_config_is_a_directory(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _expect_error(work, ["run", "inputs"], ["inputs"], capsys)


@pytest.mark.parametrize(
    "text",
    ["data: {n: 200\nmodel: [", "a: b: c\n", "key: 'unterminated\n", "\tdata: 1\n"],
    ids=["unclosed", "mapping-in-scalar", "quote", "tab"],
)
def test_config_not_yaml(work: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    (work / "inputs" / "broken.yaml").write_text(text, encoding="utf-8")
    line = _expect_error(work, ["run", "inputs/broken.yaml"], ["broken.yaml"], capsys)
    assert "YAML" in line


def test_config_not_utf8(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "inputs" / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    _expect_error(work, ["run", "inputs/binary.yaml"], ["binary.yaml"], capsys)


@pytest.mark.parametrize("text", ["- em\n- map\n", "3\n", "just a string\n"], ids=["list", "int", "str"])
def test_config_not_a_mapping(work: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    (work / "inputs" / "odd.yaml").write_text(text, encoding="utf-8")
    _expect_error(work, ["run", "inputs/odd.yaml"], ["config"], capsys)


# ---------------------------------------------------------------------------------------------
# data files


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("a,b,c\n1,2,x\n3,4,y\n5,6,z\n7,8,w\n9,1,v\n", ["csv", "'c'"]),  # non-numeric column
        ("a,b\n1,2\n3,\n5,6\n7,8\n9,1\n", ["csv"]),  # a missing value → NaN
        ("a,b\n1,2\n3,nan\n5,6\n7,8\n9,1\n", ["csv"]),  # NaN
        ("a,b\n1,2\n3,inf\n5,6\n7,8\n9,1\n", ["csv"]),  # inf
        ("a,b\n1,2\n3,-inf\n5,6\n7,8\n9,1\n", ["csv"]),
        ("a,b\n1,2\n", ["csv"]),  # a single data row
        ("a,b\n", ["csv"]),  # header only
        ("", ["csv"]),  # empty file
        ("a,b\n1,2,3,4\n5,6\n7,8\n", ["csv"]),  # ragged
        ("a,b\ntrue,1\nfalse,2\ntrue,3\nfalse,4\ntrue,5\n", ["csv", "'a'"]),  # boolean column
    ],
    ids=[
        "non-numeric",
        "missing",
        "nan",
        "inf",
        "-inf",
        "one-row",
        "header-only",
        "empty",
        "ragged",
        "bool",
    ],
)
def test_bad_csv(work: Path, capsys: pytest.CaptureFixture[str], text: str, names: list[str]) -> None:
    path = _csv(work, "data.csv", text)
    line = _expect_error(
        work, ["run", "inputs/tiny.yaml", "data.source=csv", f"data.path={path}"], names, capsys
    )
    assert "data.csv" in line, line


def test_csv_nan_names_row(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _csv(work, "data.csv", "a,b\n1,2\n3,nan\n5,inf\n7,8\n9,1\n")
    line = _expect_error(
        work,
        ["run", "inputs/tiny.yaml", "data.source=csv", f"data.path={path}"],
        ["data.csv"],
        capsys,
    )
    assert "NaN or infinite" in line and "2 value(s)" in line, line
    assert "column 'b', row 2 (counted from 1 below the header line)" in line, line


@pytest.mark.parametrize(
    ("model", "text"),
    [("poisson_mixture", "a,b\n1,2\n3,4\n5,-6\n7,8\n"), ("bernoulli_mixture", "a,b\n1,0\n0,1\n1,2\n0,0\n")],
)
def test_values_outside_the_model_support_name_the_row_from_one(
    work: Path, capsys: pytest.CaptureFixture[str], model: str, text: str
) -> None:
    path = _csv(work, "data.csv", text)
    argv = ["run", "inputs/tiny.yaml", "data.source=csv", f"data.path={path}", f"model.name={model}"]
    line = _expect_error(work, [*argv, "model.k=2", "data.test_fraction=0"], ["data.csv"], capsys)
    assert "but row 3 (counted from 1, a CSV header not counted)" in line, line


def test_csv_binary_garbage(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = bytes(np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8))
    (work / "inputs" / "garbage.csv").write_bytes(garbage)
    _expect_error(
        work,
        ["run", "inputs/tiny.yaml", "data.source=csv", "data.path=inputs/garbage.csv"],
        ["garbage.csv"],
        capsys,
    )


@pytest.mark.parametrize("source", ["csv", "npy"])
def test_missing_data_file(work: Path, capsys: pytest.CaptureFixture[str], source: str) -> None:
    line = _expect_error(
        work,
        ["run", "inputs/tiny.yaml", f"data.source={source}", f"data.path=inputs/nope.{source}"],
        ["data.path"],
        capsys,
    )
    assert f"nope.{source}" in line


@pytest.mark.parametrize("source", ["csv", "npy"])
def test_data_path_missing_in_config(work: Path, capsys: pytest.CaptureFixture[str], source: str) -> None:
    _expect_error(work, ["run", "inputs/tiny.yaml", f"data.source={source}"], ["data.path"], capsys)


@pytest.mark.parametrize("source", ["csv", "npy"])
def test_data_path_is_directory(work: Path, capsys: pytest.CaptureFixture[str], source: str) -> None:
    (work / "inputs" / "folder").mkdir()
    _expect_error(
        work,
        ["run", "inputs/tiny.yaml", f"data.source={source}", "data.path=inputs/folder"],
        ["data.path"],
        capsys,
    )


def test_label_column_missing(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _csv(work, "data.csv", "a,b\n1,2\n3,4\n5,6\n7,8\n9,1\n")
    _expect_error(
        work,
        ["run", "inputs/tiny.yaml", "data.source=csv", f"data.path={path}", "data.label_column=y"],
        ["data.label_column"],
        capsys,
    )


@pytest.mark.parametrize(
    ("array", "name"),
    [
        (np.array([{"a": 1}, None, 3], dtype=object), "object"),
        (np.zeros((10, 2, 2)), "3d"),
        (np.array(["a", "b", "c"]), "strings"),
        (np.array([[1.0, 2.0]]), "one-point"),
        (np.array([[1.0, np.nan], [2.0, 3.0], [4.0, 5.0]]), "nan"),
        (np.array([[1.0, np.inf], [2.0, 3.0], [4.0, 5.0]]), "inf"),
    ],
    ids=["object", "3d", "strings", "one-point", "nan", "inf"],
)
def test_bad_npy(work: Path, capsys: pytest.CaptureFixture[str], array: np.ndarray, name: str) -> None:
    np.save(work / "inputs" / f"{name}.npy", array, allow_pickle=True)
    _expect_error(
        work,
        ["run", "inputs/tiny.yaml", "data.source=npy", f"data.path=inputs/{name}.npy"],
        [f"{name}.npy"],
        capsys,
    )


def test_npy_not_an_npy(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "inputs" / "fake.npy").write_bytes(b"this is not a numpy file\n" * 10)
    _expect_error(
        work,
        ["run", "inputs/tiny.yaml", "data.source=npy", "data.path=inputs/fake.npy"],
        ["fake.npy"],
        capsys,
    )


def test_k_larger_than_train_points(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 5 rows, test_fraction 0.2: 1 test point, 4 train points < k = 5
    path = _csv(work, "small.csv", "a,b\n1,2\n3,4\n5,7\n7,8\n9,1\n")
    line = _expect_error(
        work,
        ["run", "inputs/tiny.yaml", "data.source=csv", f"data.path={path}", "model.k=5"],
        ["model.k"],
        capsys,
    )
    assert line.startswith("error: model.k"), line


def test_k_larger_than_distinct_points(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _csv(work, "same.csv", "a,b\n" + "1,2\n" * 10)
    _expect_error(
        work,
        ["run", "inputs/tiny.yaml", "data.source=csv", f"data.path={path}", "model.k=2"],
        ["model.k"],
        capsys,
    )


def test_too_few_train_points_after_split(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _csv(work, "two.csv", "a,b\n1,2\n3,4\n")
    _expect_error(
        work,
        [
            "run",
            "inputs/tiny.yaml",
            "data.source=csv",
            f"data.path={path}",
            "model.k=1",
            "data.test_fraction=0.5",
        ],
        ["data.test_fraction"],
        capsys,
    )


# ---------------------------------------------------------------------------------------------
# init.method=from_run


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-D quickstart run with k = 3, in its own folder."""
    root = tmp_path_factory.mktemp("earlier")
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    rc = main(
        [
            "run",
            str(config),
            "data.dim=3",
            "data.n=200",
            "backends.em.max_iter=3",
            "--runs-dir",
            str(root),
            "--quiet",
        ]
    )
    assert rc == 0
    (path,) = list(root.iterdir())
    assert (path / "em" / "params.safetensors").is_file()
    return path


@pytest.mark.parametrize("target", ["experiment", "backend"])
@pytest.mark.parametrize(
    ("overrides", "what"),
    [(["data.dim=2"], "dimension"), (["data.dim=3", "model.k=4"], "model.k")],
    ids=["other-dim", "other-k"],
)
def test_from_run_mismatch(
    work: Path,
    capsys: pytest.CaptureFixture[str],
    earlier_run: Path,
    overrides: list[str],
    what: str,
    target: str,
) -> None:
    run = earlier_run if target == "experiment" else earlier_run / "em"
    line = _expect_error(
        work,
        [
            "run",
            "inputs/tiny.yaml",
            "init.method=from_run",
            f"init.run={run}",
            *overrides,
            "--quiet",
        ],
        ["init.run"],
        capsys,
    )
    assert line.startswith("error: init.run"), line
    assert what in line, line


@pytest.mark.parametrize("run", [None, "inputs/nowhere", "inputs"], ids=["unset", "missing", "empty-dir"])
def test_from_run_bad_path(work: Path, capsys: pytest.CaptureFixture[str], run: str | None) -> None:
    extra = [] if run is None else [f"init.run={run}"]
    line = _expect_error(
        work, ["run", "inputs/tiny.yaml", "init.method=from_run", *extra], ["init.run"], capsys
    )
    assert line.startswith("error: init.run"), line


# ---------------------------------------------------------------------------------------------
# argparse usage errors


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no subcommand
        ["fit"],  # unknown subcommand
        ["--bogus"],  # unknown flag
        ["run"],  # missing CONFIG
        ["run", "inputs/tiny.yaml", "--bogus"],
        ["run", "inputs/tiny.yaml", "--runs-dir"],  # flag without its value
    ],
    ids=["none", "unknown-command", "unknown-flag", "no-config", "run-unknown-flag", "no-value"],
)
def test_usage_errors(work: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    before = _snapshot(work)
    rc, out, err = _run(argv, capsys)
    assert rc == 2, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert out == ""
    assert _snapshot(work) == before


# ---------------------------------------------------------------------------------------------
# the good path

LAYOUT = ["config.yaml", "data.json", "init.safetensors", "comparison.csv"]
BACKEND_FILES = ["summary.json", "metrics.csv", "params.safetensors"]


def test_valid_run_writes_the_layout(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(["run", "inputs/tiny.yaml", "--runs-dir", "runs", "--quiet"], capsys)
    assert rc == 0, err
    assert "Traceback" not in err
    path = Path(out.splitlines()[-1])
    assert path.is_dir()
    assert path.parent.resolve() == (work / "runs").resolve()
    assert path.name.startswith("tiny-")
    assert [p.name for p in (work / "runs").iterdir()] == [path.name]
    for name in LAYOUT:
        assert (path / name).is_file(), name
    for name in BACKEND_FILES:
        assert (path / "em" / name).is_file(), name
    summary = json.loads((path / "em" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["n_steps"] == 3
    described = json.loads((path / "data.json").read_text())
    assert {"source", "n_train", "n_test", "dim", "has_labels", "sha256"} <= set(described)
    assert described["n_train"] + described["n_test"] == 200


def test_valid_run_default_runs_dir(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(["run", "inputs/tiny.yaml", "--quiet"], capsys)
    assert rc == 0, err
    path = Path(out.splitlines()[-1])
    assert path.resolve().parent == (work / "runs").resolve()
    assert (path / "em" / "summary.json").is_file()


def test_valid_csv_run(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (30, 2)), rng.normal(6, 1, (30, 2))])
    rows = "\n".join(f"{a},{b},{'left' if i < 30 else 'right'}" for i, (a, b) in enumerate(x))
    path = _csv(work, "ok.csv", "a,b,label\n" + rows + "\n")
    rc, out, err = _run(
        [
            "run",
            "inputs/tiny.yaml",
            "data.source=csv",
            f"data.path={path}",
            "data.label_column=label",
            "model.k=2",
            "--runs-dir",
            "runs",
            "--quiet",
        ],
        capsys,
    )
    assert rc == 0, err
    exp = Path(out.splitlines()[-1])
    summary = json.loads((exp / "em" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["ari"] is not None and summary["nmi"] is not None
    assert json.loads((exp / "data.json").read_text())["dim"] == 2


def test_overrides_before_and_after_flags(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(
        [
            "run",
            "inputs/tiny.yaml",
            "data.n=150",
            "--quiet",
            "model.k=2",
            "--runs-dir",
            "runs",
            "seed=7",
        ],
        capsys,
    )
    assert rc == 0, err
    written = yaml.safe_load((Path(out.splitlines()[-1]) / "config.yaml").read_text())
    assert (written["data"]["n"], written["model"]["k"], written["seed"]) == (150, 2, 7)


def test_unknown_flag_after_overrides(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _expect_error(
        work, ["run", "inputs/tiny.yaml", "--quiet", "model.k=2", "--bogus"], ["--bogus"], capsys
    )
    assert "unrecognized" in line


def test_debug_shows_the_traceback(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PPL_GMM_DEBUG", "1")
    rc, out, err = _run(["run", "inputs/tiny.yaml", "model.k=0", "--runs-dir", "runs"], capsys)
    assert rc == 2 and out == ""
    assert "Traceback" in err and "UserError" in err
    assert err.splitlines()[-1].startswith("error: model.k"), err
    assert not (work / "runs").exists()


# ---- the count and binary models: their data, and options that belong to another model ---------

COUNTS = "a,b\n1,2\n3,0\n5,6\n7,8\n9,1\n"
BINARY = "a,b\n1,0\n0,0\n1,1\n0,1\n1,0\n"


@pytest.mark.parametrize(
    ("model", "text", "extra", "names"),
    [
        ("poisson_mixture", "a,b\n1,2\n3,-1\n5,6\n7,8\n9,1\n", [], ["data.csv", "counts"]),
        ("poisson_mixture", "a,b\n1,2\n3,0.5\n5,6\n7,8\n9,1\n", [], ["data.csv", "counts"]),
        ("bernoulli_mixture", "a,b\n1,0\n0,2\n1,1\n0,1\n1,0\n", [], ["data.csv", "binary"]),
        ("bernoulli_mixture", "a,b\n1,0\n0,-1\n1,1\n0,1\n1,0\n", [], ["data.csv", "binary"]),
        ("poisson_mixture", COUNTS, ["model.covariance=diag"], ["model.covariance"]),
        ("bernoulli_mixture", BINARY, ["model.hyperparameters.covariance_prior=1.0"], ["covariance_prior"]),
        ("poisson_mixture", COUNTS, ["backends.em.reg_covar=0.001"], ["backends.em.reg_covar"]),
        ("bernoulli_mixture", BINARY, ["init.reg_covar=0.001"], ["init.reg_covar"]),
        ("poisson_mixture", COUNTS, ["data.standardize=true"], ["data.standardize"]),
        (
            "poisson_mixture",
            COUNTS,
            ["model.prior=conjugate", "model.hyperparameters.rate_shape=0.5"],
            ["rate_shape"],
        ),
    ],
    ids=[
        "negative-count",
        "fractional-count",
        "two-in-binary",
        "negative-in-binary",
        "gaussian-covariance",
        "gaussian-hyperparameter",
        "gaussian-reg-covar",
        "gaussian-init-reg-covar",
        "standardized-counts",
        "map-em-without-a-mode",
    ],
)
def test_bad_input_for_count_and_binary_models(
    work: Path, capsys: pytest.CaptureFixture[str], model: str, text: str, extra: list[str], names: list[str]
) -> None:
    path = _csv(work, "data.csv", text)
    argv = [
        "run",
        "inputs/tiny.yaml",
        "data.source=csv",
        f"data.path={path}",
        "model.k=2",
        f"model.name={model}",
    ]
    line = _expect_error(work, [*argv, "data.test_fraction=0", *extra], names, capsys)
    assert re.search(r"\b(Try|Use|use|Set|remove|Binarize|Known fields)\b", line), line  # and the fix


def test_backend_options_are_checked_before_the_data_are_read(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in a backend option is reported even when the data file does not exist: the whole
    config is validated before any data are loaded."""
    argv = [
        "run",
        "inputs/tiny.yaml",
        "data.source=csv",
        "data.path=inputs/missing.csv",
        "backends.em.tool=1",
    ]
    line = _expect_error(work, argv, ["backends.em.tool"], capsys)
    assert "missing.csv" not in line
