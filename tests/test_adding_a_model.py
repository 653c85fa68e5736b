"""The README's "Adding a model": a mixture of exponentials in its own package
(``examples/exponential_mixture``), installed with pip, found through the ``ppl_gmm.models``
entry point and fitted from a config by every backend, with nothing else written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "exponential_mixture"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed by pip into a folder of its own (put on PYTHONPATH)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
    )
    return target


def _run(installed: Path, overrides: list[str], tmp_path: Path) -> Path:
    """The README's command: the example's config, shortened by ``overrides``."""
    config = str(EXAMPLE / "exponential.yaml")
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppl_gmm",
            "run",
            config,
            *overrides,
            "--runs-dir",
            str(tmp_path / "runs"),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def test_a_model_in_its_own_package_runs_through_every_backend(installed: Path, tmp_path: Path) -> None:
    short = ["backends.svi.steps=20", "backends.svi.mean_samples=10", "backends.svi.elbo_particles=2"]
    short += ["backends.mcmc.num_samples=10", "backends.mcmc.warmup_steps=10"]
    experiment = _run(installed, short, tmp_path)
    backends = yaml.safe_load((EXAMPLE / "exponential.yaml").read_text())["backends"]
    summaries = {b: json.loads((experiment / b / "summary.json").read_text()) for b in backends}
    for backend, summary in summaries.items():
        assert summary["status"] == "completed", (backend, summary["error"])
        assert summary["model"] == "exponential_mixture"
        assert summary["n_params"] == 2 + 3 * 3  # K - 1 weights, K × D rates
    # closed-form MAP-EM and gradient MAP find the same mode; both recover the simulated rates
    assert abs(summaries["em"]["train_log_likelihood"] - summaries["map"]["train_log_likelihood"]) < 1e-5
    truth = load_file(str(experiment / "truth.safetensors"))["rates"]
    assert summaries["em"]["rates_error_vs_truth"] < 0.2 * float(truth.pow(2).mean().sqrt())


def test_the_package_s_model_equals_its_declaration(installed: Path) -> None:
    """The generic checks every built-in model passes, for the plugin (in a fresh interpreter)."""
    script = """
import numpy as np, torch
from ppl_gmm.models import MODELS, LatentModel
cls = MODELS.get("exponential_mixture")
sim = cls.for_simulation(cls.options(k=3), 4)
truth = sim.sample_truth(np.random.default_rng(0), 5.0)
x, _ = sim.simulate(truth, 400, np.random.default_rng(1))
model = cls.from_config(cls.options(k=3), x)
fast, declared = model.log_joint(x, truth), LatentModel.log_joint(model, x, truth)
torch.testing.assert_close(fast, declared, rtol=1e-12, atol=1e-10)
assert model.n_params() == 2 + 3 * 4
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
