"""Variational answers judged against each other and against the MCMC reference; choosing K."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ppl_gmm.backends.svi import SVIBackend, SVIBackendOptions
from ppl_gmm.backends.vb import VB, VBOptions
from ppl_gmm.cli import main
from ppl_gmm.config import InitConfig
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_svi_with_an_mvn_guide_reaches_the_cavi_elbo() -> None:
    x = torch.from_numpy(make_synthetic(200, 2, 2, 6.0, np.random.default_rng(3))[0])
    model = GaussianMixture.from_config(GMMOptions(k=2, covariance="full", prior="conjugate"), x)
    init = initialize(model, x, InitConfig(), seed=0)
    vb = VB().fit(model, x, init, VBOptions(reg_covar=0.0, tol=1e-10), lambda s: None)
    svi = SVIBackend().fit(
        model,
        x,
        init,
        SVIBackendOptions(steps=800, lr=0.02, guide="mvn", elbo_particles=200, mean_samples=10),
        lambda s: None,
    )
    assert abs(vb.elbo - svi.elbo) < 1e-2, (vb.elbo, svi.elbo)


def test_select_with_vb_picks_three_components_by_bic_and_elbo(capsys, tmp_path) -> None:
    args = ["select", str(CONFIGS / "select.yaml"), "--k", "1..5", "--backend", "vb", "--quiet"]
    assert main([*args, "--runs-dir", str(tmp_path)]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    table = pd.read_csv(path / "selection.csv")
    assert int(table.loc[table["bic"].idxmin(), "k"]) == 3
    assert int(table.loc[table["elbo"].idxmax(), "k"]) == 3
    assert table["effective_k"].notna().all()
    assert (table.loc[table["k"] >= 3, "effective_k"] == 3).all()


def test_compare_reports_each_posterior_against_mcmc(capsys, tmp_path) -> None:
    overrides = [
        "backends.mcmc.num_samples=100",
        "backends.mcmc.warmup_steps=100",
        "backends.svi.steps=400",
        "backends.svi.elbo_particles=5",
        "--quiet",
    ]
    assert (
        main(["run", str(CONFIGS / "vb_vs_svi_vs_mcmc.yaml"), "--runs-dir", str(tmp_path), *overrides]) == 0
    )
    experiment = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["compare", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert "posterior against MCMC" in out
    table = pd.read_csv(experiment / "comparison.csv").set_index("backend")
    columns = [
        f"posterior_{group}_{stat}_error_vs_mcmc"
        for group in ("weights", "means", "covariances")
        for stat in ("mean", "std")
    ]
    for backend in ("svi", "vb"):
        errors = table.loc[backend, columns].astype(float)
        assert errors.notna().all(), backend
        # well-separated data: both approximations sit close to the reference posterior
        assert errors["posterior_means_mean_error_vs_mcmc"] < 0.1, errors
    assert table.loc[["em", "mcmc"], columns].isna().all().all()
