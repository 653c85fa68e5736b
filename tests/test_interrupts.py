"""A real `ppl-gmm run` interrupted mid-fit keeps what finished; SIGKILL leaves finished files whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "compare.yaml"
LONG_SVI = [
    "backends.map.steps=40",
    "backends.svi.steps=1000000",
    "backends.svi.compile=false",  # steps from the first second (compiled steps would start later)
    "backends.svi.tol=0",  # no stopping rule: svi is still fitting when the signal comes
    "backends.svi.eval_every=5",
    "data.n=300",
]


def _start(tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ppl_gmm", "run", str(CONFIG), "--runs-dir", str(tmp_path), *LONG_SVI],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # a hung run dumps every thread's stack
        # a shell's background job ignores SIGINT, and so would its children: Python then never
        # installs its Ctrl-C handler. Restore the default, as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _finish(process: subprocess.Popen[str], timeout: float = 60.0) -> tuple[str, str]:
    """stdout and stderr once the process exits; a process still running after ``timeout`` is
    aborted (its threads' stacks then end stderr) and the test fails with them."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        try:
            _, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        pytest.fail(f"the run did not exit {timeout:.0f} s after the signal; its stderr ends:\n{err[-6000:]}")


def _wait_for_svi_steps(tmp_path: Path, process: subprocess.Popen[str], timeout: float = 120.0) -> Path:
    """Wait until the svi backend is fitting (map finished); returns the experiment directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        done = list(tmp_path.glob("*/map/summary.json"))
        if done and (done[0].parents[1] / "svi").is_dir():
            time.sleep(1.5)  # some svi steps
            return done[0].parents[1]
        time.sleep(0.2)
    process.kill()
    pytest.fail("the run never reached the svi backend")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_keeps_finished_backends_and_marks_the_running_one(sig, tmp_path) -> None:
    process = _start(tmp_path)
    experiment = _wait_for_svi_steps(tmp_path, process)
    process.send_signal(sig)
    out, err = _finish(process)
    assert process.returncode == 130, err
    assert out.strip().splitlines()[-1] == str(experiment)
    assert "Traceback" not in err
    for name in ("em", "map"):
        summary = json.loads((experiment / name / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert load_file(str(experiment / name / "params.safetensors"))["means"].shape == (3, 2)
    svi = json.loads((experiment / "svi" / "summary.json").read_text())
    assert svi["status"] == "interrupted" and svi["train_log_likelihood"] is None
    metrics = pd.read_csv(experiment / "svi" / "metrics.csv")
    assert len(metrics) > 1 and list(metrics.columns) == [
        "step",
        "wall_seconds",
        "objective",
        "log_likelihood",
    ]
    table = pd.read_csv(experiment / "comparison.csv")
    assert list(table["status"]) == ["completed", "completed", "interrupted"]


def test_sigkill_leaves_finished_backends_readable(tmp_path) -> None:
    process = _start(tmp_path)
    experiment = _wait_for_svi_steps(tmp_path, process)
    process.kill()
    _finish(process)
    for name in ("em", "map"):
        summary = json.loads((experiment / name / "summary.json").read_text())
        assert summary["status"] == "completed"
        load_file(str(experiment / name / "params.safetensors"))
        assert len(pd.read_csv(experiment / name / "metrics.csv")) > 1
    assert not list(experiment.rglob("*.tmp"))  # atomic writes leave no half-written file behind
