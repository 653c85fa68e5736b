"""Random configs and random data files, hostile ones included, through `ppl-gmm run`: it either
succeeds (exit 0, or 1 with the failed backends recorded) or refuses with exit 2 and one
`error:` line, leaving nothing behind; never a traceback, never a hang.

Half the examples are benign (valid values, readable files; degenerate data still refused or
failed cleanly), half hostile (each field, file and section may be junk). Iteration counts stay
small: a valid request for a million steps is honoured, not refused, and would not end in time.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ppl_gmm.backends import BACKENDS
from ppl_gmm.cli import main

SECONDS = 20.0  # per example

# values that no field accepts, or only some do
JUNK = st.sampled_from(
    [None, -1, -(10**30), 10**30, 1e308, ".nan", ".inf", float("nan"), "abc", "ünï©ødé", "", []]
    + [{}, [1, [2]], {"a": {"b": []}}, True, b"\x00\xff".decode("latin-1")]
)
FLOATS = st.sampled_from([0.0, 1e-300, 1e-6, 1e-3, 0.5, 1.0, 10.0, 1e6, 1e300])


class Field(NamedTuple):
    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any] = JUNK  # out of range, or of the wrong kind
    junk: bool = True  # False for amounts of work, where a huge number is a valid, endless request


def _value(draw: st.DrawFn, field: Field, hostile: bool) -> Any:
    """A valid value; when hostile, one time in four something else."""
    if hostile and draw(st.integers(0, 3)) == 0:
        return draw(st.one_of(field.invalid, JUNK) if field.junk else field.invalid)
    return draw(field.valid)


def _section(
    draw: st.DrawFn, fields: dict[str, Field], hostile: bool, required: tuple[str, ...] = ()
) -> dict:
    """Some of ``fields`` (always the ``required`` ones); when hostile, maybe an unknown one."""
    optional = sorted(set(fields) - set(required))
    chosen = draw(st.lists(st.sampled_from(optional), max_size=4, unique=True)) if optional else []
    section = {key: _value(draw, fields[key], hostile) for key in [*required, *chosen]}
    if hostile and draw(st.integers(0, 5)) == 0:
        section[draw(st.sampled_from(["nope", "ü", "k "]))] = draw(JUNK)
    return section


SVI_LIKE = {
    "steps": Field(st.integers(0, 3), st.just(-1), junk=False),
    "lr": Field(st.sampled_from([1e-3, 0.05, 1.0, 1e3]), st.sampled_from([0.0, -1.0])),
    "optimizer": Field(st.sampled_from(["adam", "clipped_adam"]), st.just("sgd")),
    "tol": Field(FLOATS, st.just(-1.0)),
    "patience": Field(st.integers(1, 3), st.sampled_from([0, 10**30])),
    "num_particles": Field(st.integers(1, 2), st.just(0), junk=False),
    "eval_every": Field(st.integers(1, 3), st.sampled_from([0, 10**30])),
    "batch_size": Field(st.sampled_from([None, 1, 7, 10**30]), st.just(0)),
    "save_assignments": Field(st.booleans()),
}
# each backend's options, amounts of work first
OPTIONS: dict[str, dict[str, Field]] = {
    "em": {
        "max_iter": Field(st.integers(0, 6), st.just(-1), junk=False),
        "tol": Field(FLOATS, st.just(-1.0)),
        "reg_covar": Field(FLOATS, st.just(-1.0)),
        "block_rows": Field(st.sampled_from([None, 1, 7, 4096]), st.sampled_from([0, 10**30])),
        "threads": Field(st.sampled_from([None, 1, 2]), st.just(0)),
    },
    "map": SVI_LIKE,
    "svi": {
        "steps": SVI_LIKE["steps"],
        "mean_samples": Field(st.integers(1, 3), st.just(0), junk=False),
        "elbo_particles": Field(st.integers(1, 2), st.just(0), junk=False),
        **SVI_LIKE,
        "guide": Field(st.sampled_from(["normal", "lowrank", "mvn"]), st.just("delta")),
        "rank": Field(st.none(), st.sampled_from([0, 1, 2, 10**30])),  # for lowrank only
        "init_scale": Field(st.sampled_from([1e-3, 0.05, 1.0]), st.just(0.0)),
        "local": Field(st.sampled_from(["enumerate", "mean_field"])),
        "point_estimate": Field(st.sampled_from(["posterior_mean", "posterior_median"])),
    },
    "vb": {
        "max_iter": Field(st.integers(0, 6), st.just(-1), junk=False),
        "posterior_samples": Field(st.integers(2, 3), st.just(1), junk=False),
        "tol": Field(FLOATS),
        "reg_covar": Field(FLOATS),
        "prune_threshold": Field(st.sampled_from([0.0, 0.01, 0.5]), st.just(1.0)),
    },
    "mcmc": {
        "num_samples": Field(st.integers(1, 3), st.just(0), junk=False),
        "warmup_steps": Field(st.integers(0, 3), st.just(-1), junk=False),
        "max_tree_depth": Field(st.integers(1, 3), st.just(0), junk=False),
        "num_chains": Field(st.integers(1, 2), st.just(0), junk=False),
        "target_accept_prob": Field(st.sampled_from([0.5, 0.8, 0.99]), st.just(1.0)),
    },
    "online_em": {
        "epochs": Field(st.integers(1, 2), st.just(0), junk=False),
        "batch_size": Field(st.sampled_from([1, 7, 100, 10**30]), st.just(0)),
        "step_power": Field(st.sampled_from([0.51, 0.6, 1.0]), st.just(0.5)),
        "step_offset": Field(st.sampled_from([0.0, 2.0]), st.just(-1.0)),
        "reg_covar": Field(FLOATS),
        "shuffle": Field(st.booleans()),
        "eval_every": Field(st.integers(1, 3), st.just(0)),
    },
    "incremental_em": {
        "max_epochs": Field(st.integers(1, 2), st.just(0), junk=False),
        "blocks": Field(st.sampled_from([1, 3, 10**30]), st.just(0)),
        "tol": Field(FLOATS),
        "reg_covar": Field(FLOATS),
    },
}
# how many of the first options to give always: the amounts of work, whose defaults take long
ALWAYS = {"em": 1, "map": 1, "svi": 3, "vb": 2, "mcmc": 3, "online_em": 1, "incremental_em": 1}


@st.composite
def _backends(draw: st.DrawFn, hostile: bool) -> Any:
    names = draw(st.lists(st.sampled_from(BACKENDS.names()), min_size=1, max_size=3, unique=True))
    backends: dict[str, Any] = {}
    for name in names:
        required = tuple(list(OPTIONS[name])[: ALWAYS[name]])
        backends[name] = _section(draw, OPTIONS[name], hostile, required)
    if hostile and draw(st.integers(0, 4)) == 0:
        return draw(st.sampled_from([{}, {"nope": {}}, ["em"], "em", {"em": "fast"}, {"em": [1]}]))
    return backends


# ---- data files ------------------------------------------------------------------------------

MAGNITUDES = [1e-300, 1e-6, 1.0, 1e6, 1e150, 1e300]


@st.composite
def _matrix(draw: st.DrawFn, hostile: bool) -> np.ndarray:
    n = draw(st.integers(0, 60) if hostile else st.integers(6, 60))
    d = draw(st.integers(0, 4) if hostile else st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(n, d)) * np.array([draw(st.sampled_from(MAGNITUDES)) for _ in range(d)])
    kinds = ["plain", "duplicates", "clusters"] + (["constant", "nan", "inf"] if hostile else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "duplicates" and n:
        x[: n // 2 + 1] = x[0]
    elif kind == "constant" and d:
        x[:, 0] = 3.0
    elif kind in ("nan", "inf") and x.size:
        x.flat[draw(st.integers(0, x.size - 1))] = np.nan if kind == "nan" else -np.inf
    elif kind == "clusters" and d:
        x += 8.0 * rng.integers(0, 3, size=(n, 1))
    return x


def _csv_text(x: np.ndarray, header: list[str]) -> str:
    return "\n".join([",".join(header)] + [",".join(repr(float(v)) for v in row) for row in x]) + "\n"


@st.composite
def _csv_bytes(draw: st.DrawFn, hostile: bool, labelled: bool) -> bytes:
    x = draw(_matrix(hostile))
    header = [f"x{j}" for j in range(x.shape[1])]
    kinds = ["labels" if labelled else "table"]
    if hostile:
        kinds += ["table", "labels", "ragged", "empty", "header", "one-row", "binary", "latin-1", "text"]
        kinds += ["strings"]
    kind = draw(st.sampled_from(kinds))
    if kind == "labels":
        rows = _csv_text(x, header).splitlines()
        labels = [draw(st.sampled_from(["a", "b", "" if hostile else "c"])) for _ in rows[1:]]
        return (
            "\n".join([rows[0] + ",label"] + [f"{r},{c}" for r, c in zip(rows[1:], labels, strict=True)])
            + "\n"
        ).encode()
    if kind == "ragged":
        return (_csv_text(x, header) + "1,2,3,4,5,6\n").encode()
    if kind == "empty":
        return b""
    if kind == "header":
        return (",".join(header) + "\n").encode()
    if kind == "one-row":
        return _csv_text(x[:1], header).encode()
    if kind == "binary":
        return draw(st.binary(min_size=1, max_size=300))
    if kind == "latin-1":
        return _csv_text(x, ["café", *header[1:]]).encode("latin-1")
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", errors="surrogatepass")
    if kind == "strings":
        return (_csv_text(x, header) + ",".join(["word"] * len(header)) + "\n").encode()
    return _csv_text(x, header).encode()


@st.composite
def _npy_bytes(draw: st.DrawFn, hostile: bool) -> bytes:
    x = draw(_matrix(hostile))
    kinds = ["float", "int", "bool", "float32", "big-endian", "fortran", "1-d"]
    if hostile:
        kinds += ["3-d", "0-d", "complex", "strings", "object", "structured", "truncated", "junk"]
    kind = draw(st.sampled_from(kinds))
    if kind == "junk":
        return draw(st.binary(max_size=300))
    finite = np.nan_to_num(x, posinf=0.0, neginf=0.0)
    array: Any = {
        "int": finite.clip(-1e9, 1e9).astype(np.int64),
        "bool": x > 0,
        "float32": finite.clip(-1e30, 1e30).astype(np.float32),
        "big-endian": x.astype(">f8"),
        "fortran": np.asfortranarray(x),
        "1-d": x.ravel(),
        "3-d": x.reshape(*x.shape, 1),
        "0-d": np.float64(1.5),
        "complex": x.astype(complex),
        "strings": x.astype(str),
        "object": np.array([{"a": 1}, None, [1, 2]], dtype=object),
        "structured": np.zeros(x.shape[0], dtype=[("a", "f8"), ("b", "f8")]),
    }.get(kind, x)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=kind == "object")
    data = buffer.getvalue()
    return data[: len(data) // 2] if kind == "truncated" else data


# ---- configs ---------------------------------------------------------------------------------

HYPERPARAMETERS = {
    "weight_prior": Field(st.sampled_from(["dirichlet", "dirichlet_process"]), st.just("stick")),
    "weight_concentration": Field(st.sampled_from([1e-3, 0.5, 1.0, 10.0]), st.sampled_from([0.0, 1e300])),
    "mean_precision": Field(st.sampled_from([1e-3, 1.0, 100.0]), st.sampled_from([0.0, 1e300])),
    "mean_prior": Field(st.none(), st.sampled_from([[], [0.0, 1.0], [1e300, 1e300], [0.0, 0.0, 0.0]])),
    "degrees_of_freedom": Field(st.sampled_from([2.0, 5.0, 50.0]), st.sampled_from([0.5, 1e300])),
    "covariance_prior": Field(
        st.sampled_from([None, 1.0, 0.1]),
        st.sampled_from([1e-300, 1e300, [1.0, 2.0], [[1.0, 0.0], [0.0, 1.0]], [[1, 2], [3]], [[[1]]], -1.0]),
    ),
}


@st.composite
def _case(draw: st.DrawFn) -> tuple[bool, Any, dict[str, bytes], list[str]]:
    """Whether it is hostile, a config (a mapping, or raw bytes), the data files it names, and
    KEY=VALUE overrides."""
    hostile = draw(st.booleans())
    files: dict[str, bytes] = {}
    source = draw(st.sampled_from(["synthetic", "csv", "npy", "iris", "old_faithful"]))
    data: dict[str, Any] = {"source": source}
    if hostile and draw(st.integers(0, 9)) == 0:
        data["source"] = draw(st.sampled_from(["nope", 7, "CSV"]))
    if source == "synthetic":
        data["n"] = _value(draw, Field(st.integers(2, 300), st.sampled_from([0, 10**11, 10**30])), hostile)
        fields = {
            "dim": Field(st.integers(1, 4), st.sampled_from([0, 10**5, 10**30])),
            "k": Field(st.integers(1, 4), st.sampled_from([0, 10**30])),
            "separation": Field(st.sampled_from([1e-300, 1.0, 4.0, 1e6]), st.sampled_from([0.0, 1e300])),
        }
        data.update(_section(draw, fields, hostile))
    elif source in ("csv", "npy"):
        labelled = source == "csv" and draw(st.booleans())
        if labelled:
            data["label_column"] = "label"
        files[f"data.{source}"] = draw(
            _csv_bytes(hostile, labelled) if source == "csv" else _npy_bytes(hostile)
        )
        data["path"] = _value(
            draw, Field(st.just(f"data.{source}"), st.sampled_from(["missing.csv", "."])), hostile
        )
    data.update(
        _section(
            draw,
            {
                "label_column": Field(st.just(data.get("label_column")), st.sampled_from(["nope", "x0"])),
                "standardize": Field(st.booleans(), st.just("yes")),
                "test_fraction": Field(
                    st.sampled_from([0.0, 0.2, 0.5]),
                    st.sampled_from([0.99, 1.0, -0.1]),
                ),
            },
            hostile,
        )
    )
    model = _section(
        draw,
        {
            "k": Field(st.integers(1, 4), st.sampled_from([0, 10**30])),
            "covariance": Field(st.sampled_from(["full", "diag", "tied", "spherical"]), st.just("banana")),
            "prior": Field(st.sampled_from(["none", "conjugate"]), st.just("flat")),
            "name": Field(st.just("gmm"), st.just("nope")),
        },
        hostile,
    )
    if draw(st.booleans()):
        model["hyperparameters"] = _section(draw, HYPERPARAMETERS, hostile)
    init = _section(
        draw,
        {
            "method": Field(st.sampled_from(["kmeans", "kmeans++", "random_from_data"]), st.just("from_run")),
            "n_init": Field(st.integers(1, 2), st.sampled_from([0, 1001, 10**30])),
            "kmeans_iter": Field(st.integers(1, 5), st.sampled_from([0, 10**30])),
            "reg_covar": Field(FLOATS, st.just(-1.0)),
            "run": Field(st.none(), st.just("nowhere")),
        },
        hostile,
    )
    backends = draw(_backends(hostile))
    if not hostile and set(backends) & {"svi", "vb", "mcmc"}:  # these need a proper prior
        model["prior"] = "conjugate"
    config: dict[str, Any] = {"experiment": "fuzz", "data": data, "model": model, "init": init}
    config["backends"] = backends
    config.update(
        _section(
            draw,
            {
                "experiment": Field(st.sampled_from(["fuzz", "fuzz.1"]), st.sampled_from(["a/b", "ü", "."])),
                "seed": Field(st.integers(0, 2**63 - 1), st.sampled_from([-1, 2**64])),
                "dtype": Field(st.sampled_from(["float64", "float32"]), st.just("float16")),
                "device": Field(st.sampled_from(["cpu", "auto"]), st.just("tpu")),
            },
            hostile,
        )
    )
    raw: Any = config
    overrides: list[str] = []
    if hostile:
        if draw(st.integers(0, 9)) == 0:
            raw = draw(
                st.sampled_from(
                    [b"", b"\xff\xfe\x00junk", b"- a\n- b\n", b"a: [\n", b"3\n", b"data: {n: 10\n"]
                )
            )
        choices = ["model.k=2", "model.k=abc", "data.n=5", "seed=-1", "=3", "x", "a..b=1", "model.k.x=1"]
        overrides = draw(st.lists(st.sampled_from(choices), max_size=2))
    return hostile, raw, files, overrides


def _run(argv: list[str]) -> tuple[Any, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc: Any = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _write_case(root: Path, raw: Any, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).write_bytes(content)
    if isinstance(raw, dict):
        raw = copy.deepcopy(raw)  # the example may be replayed while shrinking
        data = raw["data"]
        if isinstance(data.get("path"), str):
            data["path"] = str(root / data["path"])
        raw = yaml.safe_dump(raw, allow_unicode=True).encode("utf-8")
    (root / "config.yaml").write_bytes(raw)
    return root / "config.yaml"


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(case=_case())
def test_run_succeeds_or_refuses_cleanly(case: tuple[bool, Any, dict[str, bytes], list[str]]) -> None:
    hostile, raw, files, overrides = case
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        config = _write_case(root, raw, files)
        runs = root / "runs"
        started = time.perf_counter()
        rc, out, err = _run(["run", str(config), *overrides, "--runs-dir", str(runs), "--quiet"])
        elapsed = time.perf_counter() - started
        event(f"{'hostile' if hostile else 'benign'}: exit {rc}")
        assert elapsed < SECONDS, elapsed
        assert "Traceback" not in out + err, err
        assert rc in (0, 1, 2), (rc, err)
        if rc == 2:
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), err
            assert out == ""
            assert not runs.exists() or not any(runs.iterdir()), "a refused run left files"
            return
        experiment = Path(out.splitlines()[-1])
        assert experiment.parent == runs and experiment.is_dir()
        statuses = [
            json.loads(path.read_text(encoding="utf-8"))["status"]
            for path in experiment.glob("*/summary.json")
        ]
        assert statuses and set(statuses) <= {"completed", "failed"}
        assert rc == (1 if "failed" in statuses else 0), statuses


# Found by the examples above, and fixed: what each now gives
REGRESSIONS = {
    # numpy's and Pyro's generators take 32-bit seeds; the config allows 63 bits
    "seed-over-32-bits": ({"seed": 2**40, "backends": {"map": {"steps": 2}}}, 0, ""),
    "ragged-covariance-prior": (
        {"model": {"prior": "conjugate", "hyperparameters": {"covariance_prior": [[1.0, 2.0], [3.0]]}}},
        2,
        "error: model.hyperparameters.covariance_prior: expected",
    ),
    "extreme-hyperparameters": (
        {"model": {"prior": "conjugate", "hyperparameters": {"mean_prior": [1e300, 1e300]}}},
        2,
        "error: model.hyperparameters: the prior's log density",
    ),
    "n-beyond-numpy": ({"data": {"n": 10**30}}, 2, "error: data.n: "),
    "true-k-beyond-numpy": ({"data": {"k": 10**20}}, 2, "error: data.k: "),
    "endless-restarts": ({"init": {"n_init": 10**12}}, 2, "error: init.n_init: "),
    # float32 lost the tied scatter to rounding, and Pyro's Wishart refused its unequal triangles
    "vb-tied-float32": (
        {
            "seed": 2,
            "dtype": "float32",
            "data": {"source": "old_faithful"},
            "model": {"covariance": "tied", "prior": "conjugate"},
            "backends": {"vb": {"max_iter": 5, "posterior_samples": 5}},
        },
        0,
        "",
    ),
    "block-rows-beyond-torch": (
        {"backends": {"em": {"block_rows": 10**30}}},
        2,
        "error: backends.em.block_rows: ",
    ),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_regressions(case: str) -> None:
    config, expected, start = REGRESSIONS[case]
    config = {"data": {"n": 60}, "backends": {"em": {"max_iter": 2}}, **copy.deepcopy(config)}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        rc, _, err = _run(
            ["run", str(_write_case(root, config, {})), "--runs-dir", str(root / "runs"), "--quiet"]
        )
        assert rc == expected, err
        assert err.startswith(start) and "Traceback" not in err, err


# Found by the examples above, in ppl_gmm/data.py, and fixed there.
DATA_EDGE_CASES = {
    "npy-without-features": (
        lambda root: np.save(root / "data.npy", np.zeros((5, 0))),
        {"data": {"source": "npy", "path": "data.npy"}, "model": {"k": 1}},
    ),
    "standardize-near-the-float64-limit": (  # the train variance of x itself would overflow
        lambda root: np.save(root / "data.npy", np.random.default_rng(0).normal(size=(40, 2)) * 1e300),
        {"data": {"source": "npy", "path": "data.npy", "standardize": True}, "model": {"k": 2}},
    ),
    "csv-without-test-split": (  # pandas' read-only array must not reach torch.from_numpy
        lambda root: (root / "data.csv").write_text("a\n" + "".join(f"{i % 7}.5\n" for i in range(20))),
        {"data": {"source": "csv", "path": "data.csv", "test_fraction": 0.0}, "model": {"k": 2}},
    ),
}


@pytest.mark.parametrize("case", list(DATA_EDGE_CASES))
def test_data_edge_cases(case: str) -> None:
    write, config = DATA_EDGE_CASES[case]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write(root)
        config = {**copy.deepcopy(config), "backends": {"em": {"max_iter": 2}}}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch's "not writable", numpy's overflow
            rc, _, err = _run(
                ["run", str(_write_case(root, config, {})), "--runs-dir", str(root / "runs"), "--quiet"]
            )
        if case == "npy-without-features":
            assert rc == 2 and err.startswith("error: ") and "no feature columns" in err, (rc, err)
        else:
            assert rc == 0, err
