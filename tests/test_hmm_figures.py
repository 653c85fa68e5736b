"""compare's figures for a hidden Markov model: the transition matrices and the Viterbi state paths,
each backend's states matched to the simulated truth's (checked against a matching computed here,
by SciPy's Hungarian algorithm on the means, and against the data loaded again from the config);
a mixture draws neither figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import linear_sum_assignment

import ppl_gmm
from ppl_gmm.compare import compare, load_table
from ppl_gmm.config import load_config
from ppl_gmm.experiment import prepare
from ppl_gmm.figures import Experiment, states_figure, transitions_figure
from ppl_gmm.models.hmm import GaussianHMM

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BACKENDS = {"em": {"max_iter": 30, "save_assignments": True}, "map": {"steps": 3}}


@pytest.fixture(scope="module")
def hmm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    # seed 1: the fitted states are a 3-cycle of the truth's, so a permutation applied on one axis
    # only, or inverted, shows
    return ppl_gmm.run(
        CONFIGS / "hmm_synthetic.yaml", runs_dir=runs, quiet=True, seed=1, backends=BACKENDS
    ).path


def _experiment(path: Path) -> Experiment:
    table, _ = load_table([path])
    return Experiment.read(path, table[table["status"] == "completed"])


def _params(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}


def _matching(truth: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> np.ndarray:
    """perm: the fitted state perm[r] pairs with the truth's state r."""
    cost = ((truth["means"].numpy()[:, None, :] - params["means"].numpy()[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm


def test_compare_draws_both_figures_for_a_hidden_markov_model(hmm_run: Path, tmp_path: Path) -> None:
    names = {p.name for p in compare([hmm_run], tmp_path).figures}
    assert {f"{hmm_run.name}-{kind}.png" for kind in ("components", "transitions", "states")} <= names


def test_transition_heat_maps_are_each_estimate_permuted_on_both_axes(hmm_run: Path) -> None:
    figure = transitions_figure(_experiment(hmm_run))
    assert figure is not None
    maps = [ax for ax in figure.axes if ax.images]
    truth = _params(hmm_run / "truth.safetensors")
    expected = [truth["transitions"].numpy()]
    for backend in BACKENDS:
        params = _params(hmm_run / backend / "params.safetensors")
        perm = _matching(truth, params)
        assert (perm != np.arange(3)).all() and (perm[perm] != np.arange(3)).any()  # a 3-cycle
        expected.append(params["transitions"].numpy()[np.ix_(perm, perm)])
    assert len(maps) == len(expected) == 3
    assert [ax.get_title().split("\n")[0] for ax in maps] == ["truth (simulated)", "em (MAP)", "map (MAP)"]
    for ax, matrix in zip(maps, expected, strict=True):
        np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), matrix, rtol=0, atol=1e-12)
        assert ax.images[0].get_clim() == (0.0, 1.0)
        shown = [float(t.get_text()) for t in ax.texts]
        np.testing.assert_allclose(shown, matrix.ravel(), atol=0.005 + 1e-12)
    assert maps[0].get_ylabel() == "from state" and maps[0].get_xlabel() == "to state"
    plt.close(figure)


def test_state_strips_are_the_viterbi_paths_of_the_bound_model_under_the_matching(hmm_run: Path) -> None:
    figure = states_figure(_experiment(hmm_run))
    assert figure is not None
    strips = [ax for ax in figure.axes if ax.images]
    plan = prepare(load_config(hmm_run / "config.yaml"))  # the train sequences, loaded again
    lengths = plan.data.train_lengths
    assert lengths is not None and plan.data.train_labels is not None
    shown = lengths[: len(strips)]
    n = int(shown.sum())
    x = plan.data.train[:n].to(torch.float64)
    model = plan.model.bind(shown)
    truth = _params(hmm_run / "truth.safetensors")
    rows = [plan.data.train_labels[:n]]  # the truth is the reference: its states keep their numbers
    for backend in BACKENDS:
        params = _params(hmm_run / backend / "params.safetensors")
        inverse = np.argsort(_matching(truth, params))  # fitted state → the truth's state it matches
        rows.append(inverse[model.most_probable_states(x, params).numpy()])
    expected = np.stack(rows)
    assert len(strips) == 5 and len(set(lengths[:5].tolist())) == 1
    starts = np.cumsum(shown) - shown
    for ax, start, length in zip(strips, starts, shown, strict=True):
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == ["truth (simulated)", "em (MAP)", "map (MAP)"]
        drawn = np.asarray(ax.images[0].get_array())
        np.testing.assert_array_equal(drawn, expected[:, start : start + length])
    plt.close(figure)


def test_a_mixture_draws_no_transitions_and_no_states(tmp_path: Path) -> None:
    path = ppl_gmm.run(
        CONFIGS / "quickstart.yaml",
        runs_dir=tmp_path / "runs",
        quiet=True,
        data__n=300,
        backends={"em": {"max_iter": 5}},
    ).path
    names = {p.name for p in compare([path], tmp_path / "out").figures}
    assert f"{path.name}-components.png" in names
    assert not any(name.endswith(("-transitions.png", "-states.png")) for name in names)
    assert transitions_figure(_experiment(path)) is None and states_figure(_experiment(path)) is None


def test_sequences_of_unequal_lengths_get_their_strips(tmp_path: Path) -> None:
    """A CSV of sequences of unequal lengths: the run keeps the train lengths with its sample, so
    each strip is one train sequence, of its own length."""
    lengths = np.array([30, 12, 25, 7, 18, 40])
    model = GaussianHMM(2, 2, "full", None).bind(lengths)
    truth = model.sample_truth(np.random.default_rng(3), 5.0)
    x, _ = model.simulate(truth, int(lengths.sum()), np.random.default_rng(4))
    frame = pd.DataFrame(x.numpy(), columns=["a", "b"])
    frame.insert(0, "run", np.repeat([f"r{i}" for i in range(len(lengths))], lengths))
    frame.to_csv(tmp_path / "runs.csv", index=False)
    config = {
        "experiment": "unequal",
        "data": {"source": "csv", "path": str(tmp_path / "runs.csv"), "sequence_column": "run"}
        | {"test_fraction": 0.0},
        "model": {"name": "gaussian_hmm", "k": 2},
        "backends": {"em": {"max_iter": 50}},
    }
    path = ppl_gmm.run(config, runs_dir=tmp_path / "out", quiet=True).path
    figure = states_figure(_experiment(path))
    assert figure is not None
    strips = [ax for ax in figure.axes if ax.images]
    widths = [np.asarray(ax.images[0].get_array()).shape[1] for ax in strips]
    assert widths == lengths[:5].tolist()
    plt.close(figure)
