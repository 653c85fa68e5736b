"""The command line's face: a help that answers without loading torch, usage errors with examples,
--threads, and stderr that suits a terminal, a log file and --quiet alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ppl_gmm import cli
from ppl_gmm.backends import BACKENDS, StepInfo
from ppl_gmm.cli import main
from ppl_gmm.data import BUILTIN
from ppl_gmm.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
TINY = {"experiment": "tiny", "data": {"n": 200}, "backends": {"em": {"max_iter": 2}}}


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    return path


def test_help_is_for_users() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ppl_gmm", "--help"], capture_output=True, text=True, env=_env(), check=False
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = done.stdout
    for name in [*BACKENDS.names(), "run", "compare", "select", "README", "130"]:
        assert name in text, name
    assert "exit codes" in text and "Nothing below this module" not in text


def test_help_and_usage_errors_load_no_heavy_library() -> None:
    """--help of every command and a usage error are answered by the standard library alone."""
    script = """
import sys
from ppl_gmm.cli import main
for argv in [["--help"], ["run", "--help"], ["compare", "--help"], ["select", "--help"], ["run"]]:
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted({"torch", "pyro", "numpy", "pandas", "pydantic", "tqdm"} & set(sys.modules)))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]", done.stdout


def test_the_names_in_the_help_are_the_registered_ones() -> None:
    assert list(cli.BACKEND_NAMES) == BACKENDS.names()
    built_in = [name for name in MODELS.names() if MODELS.get(name).__module__.startswith("ppl_gmm.")]
    assert list(cli.MODEL_NAMES) == built_in
    assert set(cli.DATA_SOURCES) == {"synthetic", "csv", "npy", *BUILTIN}


@pytest.mark.parametrize(
    ("argv", "missing", "example"),
    [
        (["run"], "CONFIG", "ppl-gmm run configs/"),
        (["select", "configs/select.yaml"], "--k", "--k 1..8"),
        (["compare"], "PATH", "ppl-gmm compare runs/"),
        ([], "COMMAND", "ppl-gmm run configs/"),
    ],
    ids=["run", "select", "compare", "none"],
)
def test_a_missing_argument_is_named_with_an_example(
    argv: list[str], missing: str, example: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"error: missing {missing}; for example `"), line
    assert example in line and "KEY=VALUE" not in line, line


@pytest.mark.parametrize("command", ["run", "select"])
def test_threads_flag_sets_the_config_field(
    command: str, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    argv = [command, str(tiny), "--threads", "1", "--runs-dir", str(runs), "--quiet"]
    if command == "select":
        argv += ["--k", "2"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    configs = list(Path(out.splitlines()[-1]).rglob("config.yaml"))  # select: the sweep's and the run's
    assert len(configs) == (1 if command == "run" else 2)
    for config in configs:
        assert yaml.safe_load(config.read_text(encoding="utf-8"))["threads"] == 1


def test_quiet_hides_progress_but_not_warnings(tiny: Path, tmp_path: Path, capsys) -> None:
    runs = ["--runs-dir", str(tmp_path / "runs")]
    rc, _, err = _run(["run", str(tiny), "--quiet", *runs], capsys)
    assert rc == 0, err
    # em stops after max_iter = 2 steps without converging
    assert err.splitlines() == [
        "warning: em did not converge in 2 steps; raise backends.em.max_iter or loosen backends.em.tol."
    ]
    rc, _, err = _run(["run", str(tiny), *runs], capsys)
    assert rc == 0, err
    lines = err.splitlines()
    assert lines[0].startswith("em: 2 steps, ") and "final objective" in lines[0], lines
    assert lines[1].startswith("warning: em did not converge"), lines


def test_redirected_stderr_gets_lines_not_bars(tmp_path: Path) -> None:
    """stderr to a file, as in a batch job: no carriage-return updates, one line per fit."""
    config = tmp_path / "two.yaml"
    two = {**TINY, "backends": {"em": {"max_iter": 2}, "incremental_em": {"max_epochs": 1}}}
    config.write_text(yaml.safe_dump(two), encoding="utf-8")
    log = tmp_path / "stderr.txt"
    with log.open("w", encoding="utf-8") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "ppl_gmm", "run", str(config), "--runs-dir", str(tmp_path / "runs")],
            stdout=subprocess.PIPE,
            stderr=handle,
            text=True,
            env=_env(),
            check=False,
        )
    text = log.read_text(encoding="utf-8")
    assert done.returncode == 0, text
    assert "\r" not in text and len(text) < 1000, text
    ended = [line.split(":")[0] for line in text.splitlines() if "final objective" in line]
    assert ended == ["em", "incremental_em"], text


def test_log_lines_text(capsys: pytest.CaptureFixture[str]) -> None:
    lines = cli._Lines(every=0.0)
    lines.begin("svi", 1, 10)
    lines.step(StepInfo(1, 0.1, -2.25, None))
    lines.end()
    out, err = capsys.readouterr()
    step, end = err.splitlines()
    assert out == "" and step == "svi (restart 1): step 1/10, objective -2.25"
    assert end.startswith("svi (restart 1): 1 step, ") and end.endswith(" s, final objective -2.25")


def test_assign_command_writes_and_refuses_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "configs/quickstart.yaml", "data.n=200", "--quiet", "--runs-dir", str(tmp_path)]) == 0
    run = Path(capsys.readouterr().out.splitlines()[-1])
    np.save(tmp_path / "new.npy", np.zeros((4, 2)))
    out = tmp_path / "a.csv"
    assert main(["assign", str(run / "em"), str(tmp_path / "new.npy"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(out)
    table = pd.read_csv(out)
    assert len(table) == 4 and np.allclose(table.filter(regex=r"^p\d+$").sum(axis=1), 1.0)
    assert main(["assign", str(run / "em"), str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
