"""Robust clustering: Old Faithful with 14 gross outliers. The Student-t mixture's em keeps the
clean data's clusters, the Gaussian mixture's does not; compare draws the models side by side."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from sklearn.mixture import GaussianMixture

import ppl_gmm
from ppl_gmm.compare import compare, load_table, models_on_same_data
from ppl_gmm.data import BUILTIN
from ppl_gmm.figures import Experiment, models_figure

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {"gmm": "outliers_gmm.yaml", "student_t_mixture": "outliers_student_t.yaml"}


def test_the_shipped_outliers_follow_the_documented_rule() -> None:
    clean, _, names = BUILTIN["old_faithful"]()
    dirty, labels, dirty_names = BUILTIN["old_faithful_outliers"]()
    assert labels is None and dirty_names == names == ["eruptions", "waiting"]
    np.testing.assert_array_equal(dirty[: len(clean)], clean)
    # the rule of the file's header, written out again
    low, high = clean.min(0), clean.max(0)
    span, center = high - low, (low + high) / 2
    rng = np.random.default_rng(0)
    drawn: list[np.ndarray] = []
    while len(drawn) < 14:
        point = rng.uniform(center - 2 * span, center + 2 * span)
        if np.any(np.abs(point - center) > span):
            drawn.append(point)
    expected = np.column_stack([np.round(np.array(drawn)[:, 0], 3), np.round(np.array(drawn)[:, 1])])
    np.testing.assert_allclose(dirty[len(clean) :], expected, atol=1e-12)
    assert np.all(np.any(np.abs(dirty[len(clean) :] - center) > span, axis=1))  # none near the clusters


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], ppl_gmm.RunResult]:
    """em of both models on the clean and the contaminated data, the shipped configs otherwise:
    the same seed, standardization and k-means++ start rule."""
    runs = tmp_path_factory.mktemp("runs")
    return {
        (source, model): ppl_gmm.run(
            CONFIGS / config,
            runs_dir=runs / source,
            quiet=True,
            backends={"em": {"max_iter": 1000, "tol": 1e-6}},
            **{"data.source": source},
        )
        for source in ("old_faithful", "old_faithful_outliers")
        for model, config in MODELS.items()
    }


def _means(result: ppl_gmm.RunResult) -> np.ndarray:
    """The em fit's means in the data's own units (K, D)."""
    standardization = json.loads((result.path / "data.json").read_text())["standardization"]
    means = result.params["em"]["means"].numpy()
    return means * np.asarray(standardization["scale"]) + np.asarray(standardization["center"])


def _shift(reference: np.ndarray, other: np.ndarray, sd: np.ndarray) -> float:
    """The largest per-feature distance, in the clean data's sd, between matched means."""
    cost = (((reference[:, None] - other[None]) / sd) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(np.abs((reference[rows] - other[cols]) / sd).max())


def test_student_t_keeps_the_clusters_and_gmm_does_not(fits) -> None:
    clean = BUILTIN["old_faithful"]()[0]
    sd = clean.std(0)
    # the clean-data reference, checked against scikit-learn's EM from its own start
    sklearn = GaussianMixture(2, covariance_type="full", tol=1e-10, max_iter=1000, n_init=5, random_state=0)
    reference = sklearn.fit(clean).means_
    for model in MODELS:
        assert _shift(reference, _means(fits["old_faithful", model]), sd) < 0.05
    # A cluster's mean is known to about its sd / sqrt(n): 0.3-0.45 of the data's sd over
    # ~100-175 points, 0.03-0.045 sd. Robust means stay within 0.1 sd (2-3 such errors) of the
    # clean fit; a gmm mean dragged by more than 0.5 sd has left its cluster (wider than a
    # cluster's own sd).
    t_shift = _shift(
        _means(fits["old_faithful", "student_t_mixture"]),
        _means(fits["old_faithful_outliers", "student_t_mixture"]),
        sd,
    )
    gmm_shift = _shift(_means(fits["old_faithful", "gmm"]), _means(fits["old_faithful_outliers", "gmm"]), sd)
    assert t_shift < 0.1
    assert gmm_shift > 0.5
    # the gmm spends a component on the outliers: one covers ~the 14 of 286 points, the other both clusters
    weights = np.sort(fits["old_faithful_outliers", "gmm"].params["em"]["weights"].numpy())
    assert weights[0] < 0.1


def test_compare_draws_one_panel_per_model_on_the_same_data(fits, tmp_path) -> None:
    comparison = compare([fits["old_faithful_outliers", "gmm"].path.parent], tmp_path / "out")
    assert tmp_path / "out" / "old_faithful_outliers-models.png" in comparison.figures
    assert (tmp_path / "out" / "old_faithful_outliers-models.png").stat().st_size > 10_000
    experiments = {}
    for (source, model), result in fits.items():
        table, _ = load_table([result.path])
        experiments[source, model] = Experiment.read(result.path, table)
    # grouped by the data's hash: the clean and the contaminated data are two pairs
    groups = models_on_same_data(list(experiments.values()))
    assert {name: [e.path for e in group] for name, group in groups.items()} == {
        source: [fits[source, model].path for model in MODELS]
        for source in ("old_faithful", "old_faithful_outliers")
    }
    pair = [experiments["old_faithful_outliers", model] for model in MODELS]
    figure = models_figure(pair)
    assert figure is not None
    try:
        assert [ax.get_title().split(":")[0] for ax in figure.axes] == list(MODELS)
        assert figure.axes[0].get_xlabel() == "eruptions" and figure.axes[0].get_ylabel() == "waiting"
        assert "scale matrices" in figure.axes[1].get_title()
    finally:
        plt.close(figure)
    # one model alone is no comparison of models
    assert models_figure(pair[:1]) is None
    assert models_on_same_data([pair[0], experiments["old_faithful", "gmm"]]) == {}
