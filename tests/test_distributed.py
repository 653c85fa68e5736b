"""Sharded runs: real ranks on 127.0.0.1 over gloo, launched by torchrun or with Slurm's
environment as srun sets it, against a run in one process; a rank that dies or stalls fails the
run instead of hanging it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SEED
from safetensors.torch import load_file
from slurm_cluster import SlurmCluster

from ppl_gmm import distributed
from ppl_gmm.config import load_config
from ppl_gmm.data import load_data
from ppl_gmm.errors import UserError
from ppl_gmm.experiment import prepare, run
from ppl_gmm.models.gmm import make_synthetic


def test_world_from_env_reads_torchrun_then_srun() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}
    assert distributed.world_from_env(torchrun) == distributed.World(3, 4, 1)
    srun = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "3"}
    assert distributed.world_from_env(srun) == distributed.World(2, 3, 0)
    # a batch script's own process (no srun step) is one process, whatever --ntasks says
    assert distributed.world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == distributed.World()
    assert distributed.world_from_env({}) == distributed.World()


@pytest.mark.parametrize("n", [0, 1, 7, 20_000])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_shard_ranges_cut_the_rows_into_contiguous_shares(n: int, size: int) -> None:
    ranges = [distributed.shard_range(n, rank, size) for rank in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_backends_that_cannot_be_sharded_are_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(distributed, "_WORLD", distributed.World(0, 2, 0))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"backends": {"em": {}, "svi": {"steps": 2}}}), encoding="utf-8")
    with pytest.raises(
        UserError, match=r"^backends\.svi: expected only em or online_em in a sharded run \(2 ranks\)"
    ):
        prepare(load_config(str(config), []))


def test_commands_other_than_run_are_refused_under_a_launcher(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    called = []
    assert distributed.launch(lambda argv: called.append(argv) or 0, ["compare", "runs"]) == 2
    assert not called and capsys.readouterr().err.startswith("error: expected `ppl-gmm run`")


# ---- real ranks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20k × 4 float64 rows of 3 components in a .npy file, and a config fitting them by EM."""
    folder = tmp_path_factory.mktemp("sharded")
    x, _, _ = make_synthetic(20_000, 4, 3, 4.0, np.random.default_rng(SEED))
    np.save(folder / "x.npy", x)
    cfg = {
        "experiment": "sharded",
        "seed": 3,
        "dtype": "float64",
        "threads": 1,
        "data": {"source": "npy", "path": str(folder / "x.npy"), "test_fraction": 0.2, "standardize": True},
        "model": {"name": "gmm", "k": 3, "covariance": "full"},
        "init": {"method": "kmeans", "kmeans_iter": 5},  # k-means++ seeding, then Lloyd
        "backends": {"em": {"max_iter": 25, "tol": 0.0}},
    }
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _free_port(low: int = 29500, high: int = 49500) -> int:
    """A port in [low, high) that nothing listens on now."""
    rng = np.random.default_rng()
    while True:
        port = int(rng.integers(low, high))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _env(**extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    clean.pop("WORLD_SIZE", None)
    return {**clean, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_torchrun_ranks_fit_what_one_process_fits(sharded_config: Path, tmp_path: Path) -> None:
    """Two ranks (seeding, EM and scoring sharded) give one process's initial and fitted
    parameters and scores, and one complete experiment directory of the same layout."""
    _torchrun_fits_what_one_process_fits(sharded_config, tmp_path)


def test_torchrun_ranks_on_a_directory_of_shards_fit_what_one_process_fits(
    sharded_config: Path, tmp_path: Path
) -> None:
    """The same rows as three .npy shards of unequal sizes, whose boundaries are not the ranks':
    two ranks fit what one process fits on the directory, and hash the train split as one
    process hashes the rows given as one file."""
    x = np.load(yaml.safe_load(sharded_config.read_text())["data"]["path"])
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, rows in zip(
        ("part-0.npy", "part-1.npy", "part-2.npy"), np.split(x, [6001, 15001]), strict=True
    ):
        np.save(shards / name, rows)  # rank 0's train rows end inside part-1, near row 10,000
    cfg = yaml.safe_load(sharded_config.read_text())
    # raw rows: standardized ones hash the moments' last bits, which sums over ranks round otherwise
    cfg["data"].update(path=str(shards), standardize=False)
    config = tmp_path / "shards.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    sharded, alone = _torchrun_fits_what_one_process_fits(config, tmp_path)
    one_file = load_data(load_config(str(sharded_config), ["data.standardize=false"]).data, cfg["seed"])
    digests = {json.loads((p / "data.json").read_text())["sha256"] for p in (sharded, alone)}
    assert digests == {one_file.describe()["sha256"]}


def _torchrun_fits_what_one_process_fits(config: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Runs ``config`` on two ranks under torchrun and in one process, checks that they agree,
    and returns the two experiment directories."""
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(_free_port()), "-m", "ppl_gmm", "run", str(config)]
    done = subprocess.run(
        [*command, "--runs-dir", str(runs), "--quiet"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [sharded] = list(runs.iterdir())
    assert done.stdout.strip().splitlines()[-1] == str(sharded)
    alone = run(load_config(str(config), []), tmp_path / "alone").path

    def listing(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    assert listing(sharded) == listing(alone)
    for name in ("init.safetensors", "em/params.safetensors", "sample.safetensors"):
        theirs, ours = load_file(str(alone / name)), load_file(str(sharded / name))
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-10, msg=f"{name}: {key}")
    ours_json, theirs_json = (json.loads((p / "em" / "summary.json").read_text()) for p in (sharded, alone))
    assert ours_json["status"] == "completed" and ours_json["n_steps"] == theirs_json["n_steps"] == 25
    for key in ("train_log_likelihood", "test_log_likelihood", "bic", "aic", "icl", "n_params"):
        assert ours_json[key] == pytest.approx(theirs_json[key], rel=1e-12, abs=1e-12), key
    ours_data, theirs_data = (json.loads((p / "data.json").read_text()) for p in (sharded, alone))
    for key in ("n_train", "n_test", "dim"):
        assert ours_data[key] == theirs_data[key]
    assert (ours_data["standardization"] is None) == (theirs_data["standardization"] is None)
    if theirs_data["standardization"] is not None:
        np.testing.assert_allclose(
            ours_data["standardization"]["scale"], theirs_data["standardization"]["scale"], rtol=1e-13
        )
    return sharded, alone


def _slurm_ranks(
    config: Path, runs: Path, size: int, *overrides: str, **extra: str
) -> list[subprocess.Popen[str]]:
    """``size`` ranks started as ``srun -n size python -m ppl_gmm run`` starts them: Slurm's
    variables, no MASTER_ADDR / MASTER_PORT (derived from the job id)."""
    job = str(_free_port() - distributed.DEFAULT_PORT)
    argv = [
        sys.executable,
        "-m",
        "ppl_gmm",
        "run",
        str(config),
        "--runs-dir",
        str(runs),
        "--quiet",
        *overrides,
    ]
    return [
        subprocess.Popen(
            argv,
            env=_env(
                SLURM_JOB_ID=job,
                SLURM_PROCID=str(rank),
                SLURM_NTASKS=str(size),
                SLURM_STEP_NUM_TASKS=str(size),
                SLURM_LOCALID=str(rank),
                **extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(size)
    ]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "stalls"])
def test_a_rank_lost_mid_fit_fails_the_run(sharded_config: Path, tmp_path: Path, how: signal.Signals) -> None:
    """Rank 1 killed (or stopped, past the process group's timeout) while EM runs: rank 0 exits
    with 1 within seconds and records em as failed; nothing hangs."""
    runs = tmp_path / "runs"
    ranks = _slurm_ranks(sharded_config, runs, 2, "backends.em.max_iter=1000000", PPL_GMM_DIST_TIMEOUT="3")
    try:
        deadline = time.monotonic() + 60
        while not list(runs.glob("*/em")):  # rank 0 makes the backend's folder as its fit starts
            assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].communicate()[1]
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(ranks[1].pid, how)
        lost = time.monotonic()
        _, err = ranks[0].communicate(timeout=60)
        assert time.monotonic() - lost < 30
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()
    assert ranks[0].returncode == 1, err[-3000:]
    [experiment] = list(runs.iterdir())
    summary = json.loads((experiment / "em" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("another rank of the sharded run (2 ranks) died or stopped answering")
    assert (experiment / "comparison.csv").is_file()


def test_srun_ranks_on_a_slurm_cluster_fit_what_one_process_fits(
    slurm_cluster: SlurmCluster, sharded_config: Path, tmp_path: Path
) -> None:
    """`srun -n 2 python -m ppl_gmm run` on a real one-node Slurm: the ranks find each other from
    Slurm's variables alone and fit what one process fits."""
    runs = tmp_path / "runs"
    command = [
        "srun",
        "-n",
        "2",
        f"--partition={slurm_cluster.partition}",
        "--time=5",
        "--kill-on-bad-exit=1",
    ]
    command += [
        sys.executable,
        "-m",
        "ppl_gmm",
        "run",
        str(sharded_config),
        "--runs-dir",
        str(runs),
        "--quiet",
    ]
    env = {**slurm_cluster.env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    [sharded] = list(runs.iterdir())
    assert done.stdout.strip().splitlines()[-1] == str(sharded)  # rank 0 alone prints
    alone = run(load_config(str(sharded_config), []), tmp_path / "alone").path
    for name in ("init.safetensors", "em/params.safetensors"):
        theirs, ours = load_file(str(alone / name)), load_file(str(sharded / name))
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-10, msg=f"{name}: {key}")
