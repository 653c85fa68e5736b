"""The same config and seed give identical parameters and summaries (timings aside)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ppl_gmm.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "compare.yaml"
SHORT = [
    "data.n=300",
    "backends.map.steps=30",
    "backends.svi.steps=30",
    "backends.svi.mean_samples=50",
    "backends.svi.elbo_particles=5",
    "backends.vb.max_iter=30",
    "--quiet",
]
TIMING = {
    "fit_seconds",
    "fit_seconds_all_restarts",
    "elbo_seconds",
    "seconds_to_within_1e-3",
    "seconds_to_within_1e-4",
}


def _run(capsys, runs: Path, *extra: str) -> Path:
    assert main(["run", str(CONFIG), "--runs-dir", str(runs), *SHORT, *extra]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_same_seed_same_parameters(capsys, tmp_path) -> None:
    first, second = _run(capsys, tmp_path), _run(capsys, tmp_path)
    third = _run(capsys, tmp_path, "seed=1")
    assert first != second
    for backend in ("em", "map", "svi", "vb"):
        a = load_file(str(first / backend / "params.safetensors"))
        b = load_file(str(second / backend / "params.safetensors"))
        c = load_file(str(third / backend / "params.safetensors"))
        assert all(torch.equal(a[name], b[name]) for name in a), backend
        assert not torch.equal(a["means"], c["means"])
        sa = json.loads((first / backend / "summary.json").read_text())
        sb = json.loads((second / backend / "summary.json").read_text())
        assert {k: v for k, v in sa.items() if k not in TIMING} == {
            k: v for k, v in sb.items() if k not in TIMING
        }
    assert (first / "init.safetensors").read_bytes() == (second / "init.safetensors").read_bytes()


def test_same_seed_same_parameters_for_the_other_backends(capsys, tmp_path) -> None:
    """mcmc, online_em and incremental_em, with the run's record of how to repeat it: the versions,
    the resolved config and the data's hash."""
    config = tmp_path / "others.yaml"
    config.write_text(
        "data: {n: 200, dim: 2, k: 2}\nmodel: {k: 2, prior: conjugate}\nbackends:\n"
        "  mcmc: {num_samples: 6, warmup_steps: 6, max_tree_depth: 4}\n"
        "  online_em: {batch_size: 40, epochs: 2}\n"
        "  incremental_em: {blocks: 4, max_epochs: 3}\n",
        encoding="utf-8",
    )
    runs = []
    for _ in range(2):
        assert main(["run", str(config), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
        runs.append(Path(capsys.readouterr().out.strip().splitlines()[-1]))
    first, second = runs
    for backend in ("mcmc", "online_em", "incremental_em"):
        a = load_file(str(first / backend / "params.safetensors"))
        b = load_file(str(second / backend / "params.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), backend
        summary = json.loads((first / backend / "summary.json").read_text())
        assert summary["status"] == "completed" and {"torch", "pyro"} <= set(summary["versions"])
    assert (first / "data.json").read_text() == (second / "data.json").read_text()
    assert len(json.loads((first / "data.json").read_text())["sha256"]) == 64
    resolved = (first / "config.yaml").read_text()
    assert "max_tree_depth: 4" in resolved and "step_power" in resolved  # with the defaults filled in
