"""Shared fixtures: fixed seeds, a clean Pyro param store, small data sets."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

from ppl_gmm.models.gmm import make_synthetic

# the `slurm_cluster` fixture: a real one-node Slurm, started on first use (tests/slurm_cluster.py)
pytest_plugins = ["slurm_cluster"]

SEED = 20261125


@pytest.fixture(autouse=True)
def _clean_state() -> None:
    pyro.clear_param_store()
    pyro.set_rng_seed(SEED)
    torch.set_num_threads(1)  # the tests' problems are small; threads only add overhead


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


@pytest.fixture
def blobs() -> tuple[torch.Tensor, np.ndarray, dict[str, np.ndarray]]:
    """1500 points in 3-D from 4 well-separated components, with labels and the truth."""
    x, labels, truth = make_synthetic(1500, 3, 4, 6.0, np.random.default_rng(SEED))
    return torch.from_numpy(x), labels, truth
