"""The local Slurm cluster is real: srun runs tasks, submitit gets results, errors and cancellations."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
from slurm_cluster import SlurmCluster
from submitit.core.utils import FailedJobError, UncompletedJobError

TORCH_ALL_REDUCE = """
import os, torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["MASTER_PORT"],
                        rank=rank, world_size=world)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(rank, world, t.item(), flush=True)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _executor(cluster: SlurmCluster, folder: Path) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=cluster.partition, timeout_min=5, nodes=1, tasks_per_node=1, cpus_per_task=1
    )
    return executor


def _wait_done(job: submitit.Job[Any], timeout_s: float) -> None:
    """Wait for submitit to see the job finished; cancel it and fail rather than hang."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job.job_id], check=False)
            pytest.fail(f"submitit still sees job {job.job_id} as {job.state} after {timeout_s} s")
        time.sleep(0.2)


def _wait_for_state(job: submitit.Job[Any], state: str, timeout_s: float) -> None:
    """Wait until the cluster (through the sacct stand-in) reports the job's state as ``state``."""
    deadline = time.monotonic() + timeout_s
    while (found := job.get_info(mode="force").get("State", "UNKNOWN")) != state:
        assert time.monotonic() < deadline, f"Expected job {job.job_id} {state}, but found {found}"
        time.sleep(0.2)


def test_srun_runs_two_tasks(slurm_cluster: SlurmCluster) -> None:
    assert slurm_cluster.cpus >= 2, f"Expected a node with at least 2 CPUs, but found {slurm_cluster.cpus}."
    srun = ["srun", f"--partition={slurm_cluster.partition}", "--ntasks=2", "--time=1"]
    proc = slurm_cluster.run(*srun, "bash", "-c", 'echo "$SLURM_PROCID/$SLURM_NTASKS"')
    assert sorted(proc.stdout.split()) == ["0/2", "1/2"]


def test_srun_runs_torch_gloo_ranks(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "all_reduce.py"
    script.write_text(TORCH_ALL_REDUCE)
    env = dict(slurm_cluster.env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    srun = ["srun", f"--partition={slurm_cluster.partition}", "--ntasks=2", "--time=2"]
    proc = subprocess.run(
        [*srun, sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, proc.stderr
    # each rank holds rank + 1; the sum over ranks 0 and 1 is 1 + 2
    assert sorted(proc.stdout.splitlines()) == ["0 2 3.0", "1 2 3.0"]


def test_submitit_returns_a_result(
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slurm_cluster.apply(monkeypatch)

    def power(base: int, exponent: int) -> int:  # local, so that cloudpickle sends it by value
        return base**exponent

    job = _executor(slurm_cluster, tmp_path).submit(power, 3, 7)
    _wait_done(job, timeout_s=60)
    assert job.result() == 2187
    _wait_for_state(job, "COMPLETED", timeout_s=10)


def test_submitit_job_array(
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slurm_cluster.apply(monkeypatch)

    def task_and_square(x: int) -> tuple[int, int]:
        return int(submitit.JobEnvironment().array_task_id), x * x

    jobs = _executor(slurm_cluster, tmp_path).map_array(task_and_square, [3, 5, 7, 11])
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1, "Expected one array job"
    for job in jobs:
        _wait_done(job, timeout_s=60)
    assert [job.result() for job in jobs] == [(0, 9), (1, 25), (2, 49), (3, 121)]


def test_submitit_surfaces_a_raised_error(
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slurm_cluster.apply(monkeypatch)

    def fail(message: str) -> None:
        raise ValueError(message)

    job = _executor(slurm_cluster, tmp_path).submit(fail, "a raised error crosses the cluster")
    _wait_done(job, timeout_s=30)
    with pytest.raises(FailedJobError, match="ValueError: a raised error crosses the cluster"):
        job.result()


def test_submitit_reports_a_cancelled_job(
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slurm_cluster.apply(monkeypatch)
    job = _executor(slurm_cluster, tmp_path).submit(time.sleep, 600)
    _wait_for_state(job, "RUNNING", timeout_s=30)
    slurm_cluster.run("scancel", job.job_id)
    # without the sacct stand-in the state reads UNKNOWN and result() waits forever
    _wait_done(job, timeout_s=60)
    assert job.state.startswith("CANCELLED")
    # result() then waits this long for a result file that a slow shared filesystem may still be
    # writing (15 s by default); the folder here is local
    job._results_timeout_s = 1
    with pytest.raises(UncompletedJobError, match="has not produced any output"):
        job.result()
