"""`ppl-gmm sweep --launcher slurm` on a real one-node Slurm cluster (tests/slurm_cluster.py):
a job array through submitit, the aggregate, and a cancelled job reported failed, not waited on."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from slurm_cluster import SlurmCluster
from test_sweep import SMALL, _config

from ppl_gmm.cli import main


def test_a_sweep_of_three_values_by_five_seeds_on_slurm(
    slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    slurm_cluster.apply(monkeypatch)
    runs = tmp_path / "runs"
    code = main(
        ["sweep", str(_config(tmp_path, SMALL)), "--grid", "model.k=2,3,4", "--seeds", "0..4"]
        + ["--launcher", "slurm", "--jobs", "2", "--partition", slurm_cluster.partition, "--time-min", "5"]
        + ["--points-per-job", "5", "--runs-dir", str(runs), "--quiet"]
    )
    assert code == 0, capsys.readouterr().err
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = pd.read_csv(path / "manifest.csv", dtype={"job_id": str})
    assert len(manifest) == 15 and (manifest["state"] == "finished").all()
    # one job array of three tasks, five points each, their logs kept
    arrays = {job_id.split("_")[0] for job_id in manifest["job_id"]}
    assert len(arrays) == 1 and manifest["job_id"].nunique() == 3
    assert (manifest.groupby("job_id")["point"].count() == 5).all()
    assert len(list((path / "slurm").glob("*/*_log.out"))) == 3
    table = pd.read_csv(path / "aggregate.csv")
    assert list(table["model.k"]) == [2, 3, 4] and (table["n_seeds"] == 5).all()
    for _, row in manifest.iterrows():
        config = yaml.safe_load((path / row["experiment"] / "config.yaml").read_text())
        assert (config["model"]["k"], config["seed"]) == (row["model.k"], row["seed"])


def test_a_cancelled_job_is_reported_failed_within_a_minute(
    slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:
    """One point is slow (a long NUTS run); cancelling its job makes the sweep record it failed
    and finish, with the other point's experiment kept."""
    slurm_cluster.apply(monkeypatch)
    runs = tmp_path / "runs"
    config = {**SMALL, "model": {"name": "gmm", "k": 3, "prior": "conjugate"}}
    config["backends"] = {"mcmc": {"warmup_steps": 5}}
    cancelled: dict[str, float] = {}

    def cancel_the_slow_job() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            manifest = next(runs.glob("*/manifest.csv"), None)
            if manifest is not None:
                rows = pd.read_csv(manifest, dtype={"job_id": str}, keep_default_na=False)
                slow = rows[(rows["backends.mcmc.num_samples"] == 100000) & (rows["job_id"] != "")]
                finished = rows["state"] == "finished"
                if len(slow) and finished.any():
                    time.sleep(2)  # inside its run by now
                    subprocess.run(["scancel", slow["job_id"].iloc[0]], env=slurm_cluster.env, check=True)
                    cancelled["at"] = time.monotonic()
                    return
            time.sleep(0.3)

    watcher = threading.Thread(target=cancel_the_slow_job, daemon=True)
    watcher.start()
    code = main(
        ["sweep", str(_config(tmp_path, config)), "--grid", "backends.mcmc.num_samples=5,100000"]
        + ["--launcher", "slurm", "--jobs", "2", "--partition", slurm_cluster.partition, "--time-min", "5"]
        + ["--runs-dir", str(runs), "--quiet"]
    )
    ended = time.monotonic()
    watcher.join(5)
    assert "at" in cancelled, "the slow job never ran"
    assert code == 1
    assert ended - cancelled["at"] < 60
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = pd.read_csv(path / "manifest.csv", keep_default_na=False).set_index(
        "backends.mcmc.num_samples"
    )
    assert manifest.loc[5, "state"] == "finished"
    assert manifest.loc[100000, "state"] == "failed"
    assert "CANCELLED" in manifest.loc[100000, "error"]
