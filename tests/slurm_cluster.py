"""A real one-node Slurm cluster on 127.0.0.1 for the tests (scripts/slurm/local_cluster.sh).

Use it with ``from slurm_cluster import slurm_cluster  # noqa: F401`` and a ``slurm_cluster``
argument; ``slurm_cluster.apply(monkeypatch)`` points this process's Slurm clients (and submitit)
at it. The cluster is started once per test session (once per pytest-xdist worker: each worker
gets its own daemons, ports and directory) and stopped at the end; the packages are installed
first if the daemons are missing (root and apt-get needed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SCRIPT", "SlurmCluster", "slurm_cluster"]

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm" / "local_cluster.sh"
EXECUTABLES = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "sinfo", "squeue", "scancel")


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster: its directory, partition and CPU count, and the environment to reach it.

    ``env`` is this process's environment plus ``SLURM_CONF`` and a ``PATH`` whose first entry holds
    the cluster's ``sacct`` stand-in (no accounting here; submitit polls ``sacct`` for job states).
    """

    directory: Path
    partition: str
    cpus: int
    env: dict[str, str]

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Set ``SLURM_CONF`` and ``PATH`` in ``os.environ`` for one test (submitit reads them there)."""
        for key in ("SLURM_CONF", "PATH"):
            monkeypatch.setenv(key, self.env[key])

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against the cluster; fail the test with its output if it fails."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc


def _script(*args: str, timeout: float) -> None:
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{SCRIPT.name} {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    if any(shutil.which(name) is None for name in EXECUTABLES):
        _script("install", timeout=600)
    directory = tmp_path_factory.mktemp("slurm")
    try:
        _script("start", str(directory), timeout=120)
        info = dict(
            line.split("=", 1) for line in (directory / "info").read_text().splitlines() if "=" in line
        )
        env = dict(os.environ)
        env["SLURM_CONF"] = info["slurm_conf"]
        env["PATH"] = info["bin"] + os.pathsep + env.get("PATH", "")
        yield SlurmCluster(directory, info["partition"], int(info["cpus"]), env)
    finally:
        _script("stop", str(directory), timeout=120)
