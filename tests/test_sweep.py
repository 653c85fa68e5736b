"""`ppl-gmm sweep` on the local process pool: the grid × seeds product, one experiment per point,
the manifest, the aggregate over seeds (checked against the points' own summaries), --resume after
the sweep is killed, and one-line errors with nothing written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from ppl_gmm.cli import main
from ppl_gmm.sweep import parse_grid, parse_seeds

ROOT = Path(__file__).resolve().parents[1]

SMALL = {
    "experiment": "tiny",
    "data": {"source": "synthetic", "n": 300, "dim": 2, "k": 3, "separation": 2.5, "seed": 7},
    "model": {"name": "gmm", "k": 3},
    "init": {"method": "random_from_data"},
    "backends": {"em": {"max_iter": 200, "tol": 1e-8}},
}


def _config(tmp_path: Path, config: dict = SMALL) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sweep_dir(capsys) -> Path:
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_local_sweep_of_three_values_by_five_seeds(capsys, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    code = main(
        ["sweep", str(_config(tmp_path)), "--grid", "model.k=2,3,4", "--seeds", "0..4", "--jobs", "2"]
        + ["--runs-dir", str(runs), "--quiet"]
    )
    assert code == 0
    path = _sweep_dir(capsys)
    assert path.parent == runs
    manifest = pd.read_csv(path / "manifest.csv")
    assert len(manifest) == 15 and (manifest["state"] == "finished").all()
    assert sorted(zip(manifest["model.k"], manifest["seed"], strict=True)) == [
        (k, s) for k in (2, 3, 4) for s in range(5)
    ]
    # each point's experiment: its own K and seed, the sweep's data (data.seed fixed)
    hashes = set()
    summaries: dict[tuple[int, int], dict] = {}
    for _, row in manifest.iterrows():
        experiment = path / row["experiment"]
        config = yaml.safe_load((experiment / "config.yaml").read_text())
        assert (config["model"]["k"], config["seed"]) == (row["model.k"], row["seed"])
        hashes.add(json.loads((experiment / "data.json").read_text())["sha256"])
        summaries[(row["model.k"], row["seed"])] = json.loads(
            (experiment / "em" / "summary.json").read_text()
        )
    assert len(hashes) == 1
    # the aggregate, from the points' own summaries
    table = pd.read_csv(path / "aggregate.csv")
    assert list(table["model.k"]) == [2, 3, 4] and (table["n_seeds"] == 5).all()
    for _, row in table.iterrows():
        values = np.array([summaries[(row["model.k"], s)]["train_log_likelihood"] for s in range(5)])
        assert row["train_log_likelihood_mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert row["train_log_likelihood_sd"] == pytest.approx(values.std(ddof=1), rel=1e-9)
        if values.std() > 0:
            assert values.min() <= row["train_log_likelihood_ci_low"] < values.mean()
            assert values.mean() < row["train_log_likelihood_ci_high"] <= values.max()
        reached = np.mean(values >= values.max() - 1e-4)
        assert row["reached_best_rate"] == pytest.approx(reached)
        assert row["local_optimum_rate"] == pytest.approx(1 - reached)
    # more components fit the train data at least as well, on average
    assert table["train_log_likelihood_mean"].is_monotonic_increasing
    assert (path / "config.yaml").is_file() and (path / "runs.csv").is_file()
    assert json.loads((path / "sweep.json").read_text())["grid"] == {"model.k": ["2", "3", "4"]}
    for figure in ("sweep.png", "sweep-traces.png"):
        with Image.open(path / figure) as image:
            assert min(image.size) > 200
    # compare SWEEP_DIR aggregates again, elsewhere, to the same numbers
    capsys.readouterr()
    assert main(["compare", str(path), "--out", str(tmp_path / "again")]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]) == tmp_path / "again"
    again = pd.read_csv(tmp_path / "again" / "aggregate.csv")
    pd.testing.assert_frame_equal(again, table)


def _wait_for(condition, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; the sweep's output: {log.read_text()[-2000:]}")
        time.sleep(0.2)


def test_resume_after_a_kill_reruns_only_the_unfinished_points(capsys, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    slow = {**SMALL, "backends": {"em": {"max_iter": 200, "tol": 1e-8}, "map": {"steps": 40}}}
    command = [sys.executable, "-m", "ppl_gmm", "sweep", str(_config(tmp_path, slow))]
    command += ["--grid", "model.k=2,3", "--seeds", "0..2", "--jobs", "2", "--runs-dir", str(runs), "--quiet"]
    log = tmp_path / "sweep.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, start_new_session=True, stdout=output, stderr=output)
    try:
        manifest = lambda: next(runs.glob("*/manifest.csv"), None)  # noqa: E731

        def two_finished() -> bool:
            found = manifest()
            return found is not None and (pd.read_csv(found)["state"] == "finished").sum() >= 2

        _wait_for(two_finished, 120, log)
        os.killpg(process.pid, signal.SIGKILL)  # the sweep and its worker, no chance to record
        process.wait(30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    path = manifest().parent
    before = pd.read_csv(path / "manifest.csv")
    kept = {
        row["experiment"]: (path / row["experiment"] / "em" / "summary.json").stat().st_mtime_ns
        for _, row in before[before["state"] == "finished"].iterrows()
    }
    assert 2 <= len(kept) < 6
    assert main(["sweep", "--resume", str(path), "--jobs", "2", "--quiet"]) == 0
    assert _sweep_dir(capsys) == path
    after = pd.read_csv(path / "manifest.csv")
    assert (after["state"] == "finished").all()
    for name, stamp in kept.items():  # the finished points were not run again
        assert name in set(after["experiment"])
        assert (path / name / "em" / "summary.json").stat().st_mtime_ns == stamp
    assert pd.read_csv(path / "aggregate.csv")["n_seeds"].tolist() == [3] * 4  # K × (em, map)


def test_grid_and_seed_ranges_parse() -> None:
    assert parse_grid(["model.k=2,3", "init.method=kmeans, kmeans++"]) == {
        "model.k": ["2", "3"],
        "init.method": ["kmeans", "kmeans++"],
    }
    assert parse_seeds("3..5") == [3, 4, 5] and parse_seeds("7") == [7]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--grid", "model.k"], r"--grid: expected KEY=V1,V2"),
        (["--grid", "model.k=2,,3"], r"--grid: expected KEY=V1,V2"),
        (["--grid", "model.k=2,2"], r"repeats a value"),
        (["--grid", "seed=1,2"], r"seed is swept by --seeds"),
        (["--seeds", "4..2"], r"--seeds: expected a range"),
        (["--grid", "model.k=2,0"], r"point p001 \(model\.k=0, seed 0\): model\.k"),
        (["--grid", "model.covariance=full,round"], r"model\.covariance"),
        (["--grid", "backends.em.max_iters=5,6"], r"backends\.em\.max_iters: unknown field"),
        (["--jobs", "0"], r"--jobs: expected at least 1"),
        (["--cpus", "0"], r"--cpus \(launcher\.cpus\): .*at least 1|--cpus \(launcher\.cpus\): .*greater"),
        (["--points-per-job", "0"], r"--points-per-job \(launcher\.points_per_job\)"),
    ],
)
def test_bad_sweeps_are_one_line_errors_and_write_nothing(
    capsys, tmp_path: Path, arguments: list[str], message: str
) -> None:
    runs = tmp_path / "runs"
    code = main(["sweep", str(_config(tmp_path)), "--runs-dir", str(runs), "--quiet", *arguments])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not runs.exists() or not any(runs.iterdir())


def test_sigterm_stops_the_sweep_and_its_workers_and_marks_what_ran(tmp_path: Path) -> None:
    """SIGTERM to the sweep (as a batch system sends): it exits 130 within seconds, its running
    points are marked failed (interrupted), and no worker process outlives it."""
    runs = tmp_path / "runs"
    slow = {**SMALL, "model": {"name": "gmm", "k": 3, "prior": "conjugate"}}
    slow["backends"] = {"mcmc": {"num_samples": 100000, "warmup_steps": 5}}
    command = [sys.executable, "-m", "ppl_gmm", "sweep", str(_config(tmp_path, slow)), "--seeds", "0..3"]
    command += ["--jobs", "2", "--runs-dir", str(runs), "--quiet"]
    log = tmp_path / "sweep.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, start_new_session=True, stdout=output, stderr=output)
    try:
        manifest = lambda: next(runs.glob("*/manifest.csv"), None)  # noqa: E731

        def fitting() -> bool:  # both workers have started their points' backends
            found = manifest()
            return found is not None and len(list(found.parent.glob("*/mcmc"))) >= 2

        _wait_for(fitting, 120, log)
        workers = subprocess.run(
            ["pgrep", "-g", str(process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) >= 3  # the sweep, its fork server and two workers
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 130, log.read_text()[-2000:]
        _wait_for(lambda: subprocess.run(["pgrep", "-g", str(process.pid)]).returncode == 1, 20, log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    states = pd.read_csv(manifest(), keep_default_na=False)
    assert set(states["state"]) <= {"failed", "pending", "running"} and "running" not in set(states["state"])
    interrupted = states[states["state"] == "failed"]
    assert len(interrupted) >= 2 and (interrupted["error"] == "interrupted").all()
