"""The figures: colours follow matched components, one axes per objective kind, no step 0 on a log
time axis, smoothing only of noisy traces; and the printed table fits a terminal."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from ppl_gmm.compare import TABLE_WIDTH, format_table, load_table
from ppl_gmm.config import load_config
from ppl_gmm.experiment import run
from ppl_gmm.figures import (
    Experiment,
    backend_color,
    ema,
    is_noisy,
    matched_colors,
    objective_kind,
    trace_figure,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_matched_colors_follow_a_hand_made_permutation() -> None:
    rng = np.random.default_rng(0)
    reference = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    perm = np.array([2, 0, 3, 1])  # other[j] is reference[perm[j]]
    other = reference[perm] + rng.normal(scale=0.1, size=reference.shape)
    assert matched_colors(reference, other).tolist() == perm.tolist()
    # one more fitted component than the truth: it gets a colour of its own
    extra = np.vstack([other, [[50.0, 50.0]]])
    assert matched_colors(reference, extra).tolist() == [*perm.tolist(), 4]
    # one fewer: the rest keep their truth's colours
    assert matched_colors(reference, other[:3]).tolist() == perm[:3].tolist()


def test_objective_kind_prefers_the_summarys_target() -> None:
    assert objective_kind({"backend": "em", "target": "log_likelihood"}, "conjugate") == "log_likelihood"
    assert objective_kind({"backend": "svi", "elbo": -3.2}, "conjugate") == "elbo"
    assert objective_kind({"backend": "mcmc", "target": None}, "conjugate") == "log_posterior"
    assert objective_kind({"backend": "em", "elbo": None}, "conjugate") == "log_posterior"
    assert objective_kind({"backend": "em", "elbo": None}, "none") == "log_likelihood"


def test_only_noisy_traces_are_smoothed_and_the_average_follows_the_level() -> None:
    rng = np.random.default_rng(1)
    climb = -1.0 / np.arange(1, 200)
    noisy = -3.0 + rng.normal(scale=0.05, size=400)
    assert not is_noisy(climb)
    assert is_noisy(noisy)
    smooth = ema(noisy, span=50)
    assert abs(smooth[-100:].mean() + 3.0) < 0.02
    assert smooth[-100:].std() < noisy[-100:].std() / 3


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Experiment:
    """A short real run of compare.yaml: em and map target the log posterior, svi and vb the ELBO."""
    cfg = load_config(
        CONFIGS / "compare.yaml",
        [
            "data.n=300",
            "backends.em.max_iter=20",
            "backends.map.steps=30",
            "backends.svi.steps=60",
            "backends.vb.max_iter=20",
        ],
    )
    path = run(cfg, tmp_path_factory.mktemp("runs")).path
    table, _ = load_table([path])
    return Experiment.read(path, table[table["status"] == "completed"])


def test_trace_figure_has_one_row_per_objective_kind_and_no_step_zero_on_log_axes(
    experiment: Experiment,
) -> None:
    figure = trace_figure(experiment)
    assert figure is not None
    try:
        axes = figure.axes
        titles = [ax.get_title() for ax in axes]
        # log posterior (em, map), ELBO (svi, vb), exact log-likelihood: by step and by wall time
        assert len(axes) == 6
        assert sum("log posterior" in t for t in titles) == 2 and sum("ELBO" in t for t in titles) == 2
        assert sum("exact train log-likelihood" in t for t in titles) == 2
        assert not any("log posterior" in t and "ELBO" in t for t in titles)
        for ax in axes:
            assert ax.get_xscale() == "log"
            data = [line for line in ax.get_lines() if line.get_transform().contains_branch(ax.transData)]
            xs = np.concatenate([np.asarray(line.get_xdata(), dtype=float) for line in data])
            assert xs.size and (xs > 0).all()
        # svi's noisy ELBO: a light raw line under a strong moving average, in the same colour
        elbo = next(ax for ax in axes if ax.get_title().startswith("ELBO") and "by step" in ax.get_title())
        svi = [line for line in elbo.get_lines() if line.get_color() == backend_color("svi")]
        assert len(svi) == 2
        assert any((line.get_alpha() or 1.0) < 0.5 for line in svi)
    finally:
        plt.close(figure)


def test_printed_table_fits_a_terminal() -> None:
    rows = [
        {
            "experiment": "poisson-vb-vs-svi-vs-mcmc-20261203-102514-b74a83",
            "backend": name,
            "status": status,
            "n_steps": 123456,
            "fit_seconds": 1234.56789,
            "target": "log_posterior",
            "target_value": -123456.789012,
            "seconds_to_within_1e-3": 0.000123456,
            "train_log_likelihood": -123456.789012,
            "test_log_likelihood": -123456.789012,
            "ari": 0.987654321,
            "bic": 1.23456789e7,
            "elbo": -123456.789012,
        }
        for name, status in (("incremental_em", "interrupted"), ("em", "completed"))
    ]
    table = pd.DataFrame(rows)
    text = format_table(table)
    assert max(len(line) for line in text.splitlines()) <= TABLE_WIDTH
    assert "incremental_em" in text and "interrupted" in text and "log post." in text
    wide = format_table(table, [*table.columns, "bic", "elbo"], width=60)
    assert max(len(line) for line in wide.splitlines()) <= 60
