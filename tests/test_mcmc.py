"""NUTS on the Pyro model against a brute-force grid posterior, and the mcmc backend end to end."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.ops.stats import effective_sample_size
from scipy.stats import norm

from ppl_gmm.backends.mcmc import MCMCBackend, MCMCOptions, convergence, run_nuts
from ppl_gmm.config import InitConfig
from ppl_gmm.errors import UserError
from ppl_gmm.evaluate import match_components, relabel
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic


def _model(x: torch.Tensor, k: int, covariance: str, prior: str = "conjugate") -> GaussianMixture:
    return GaussianMixture.from_config(GMMOptions(k=k, covariance=covariance, prior=prior), x)


def _grid_posterior_of_locs(
    x: np.ndarray, weights: np.ndarray, precision: np.ndarray, m0: float, beta0: float, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and sd of (μ1, μ2) given 1-D data x (N,), fixed weights and precisions (2,), written
    independently of the model code: prior N(m0, 1 / (β0 λ_k)) per mean times the mixture
    likelihood, normalized over the ordered region μ1 < μ2 of a square grid.

    Also returns the mass of the other region μ1 > μ2 (the label-switched mode) in the full grid.
    """
    mu1, mu2 = np.meshgrid(grid, grid, indexing="ij")
    sd = 1.0 / np.sqrt(precision)
    log_post = norm.logpdf(mu1, m0, sd[0] / math.sqrt(beta0)) + norm.logpdf(mu2, m0, sd[1] / math.sqrt(beta0))
    for point in x:
        log_post += np.logaddexp(
            np.log(weights[0]) + norm.logpdf(point, mu1, sd[0]),
            np.log(weights[1]) + norm.logpdf(point, mu2, sd[1]),
        )
    density = np.exp(log_post - log_post.max())
    edge = max(density[0].max(), density[-1].max(), density[:, 0].max(), density[:, -1].max())
    assert edge < 1e-12, "the grid must hold the whole posterior"
    ordered = mu1 < mu2
    switched = float(density[~ordered].sum() / density.sum())
    density = np.where(ordered, density, 0.0) / density[ordered].sum()
    mean = np.array([(density * mu1).sum(), (density * mu2).sum()])
    var = np.array([(density * (mu1 - mean[0]) ** 2).sum(), (density * (mu2 - mean[1]) ** 2).sum()])
    return mean, np.sqrt(var), switched


def test_nuts_matches_the_grid_posterior_of_two_means() -> None:
    # 1-D, two components; weights and precisions fixed by conditioning, so the posterior lives on
    # (μ1, μ2) and a fine grid integrates it exactly. Unequal weights matching unequal counts and 5σ
    # between the means make the label-switched mode negligible (checked below), so MCMC and the
    # ordered grid target the same distribution.
    rng = np.random.default_rng(11)
    weights, precision, true_means = np.array([0.3, 0.7]), np.array([1.0, 1.0]), np.array([-2.5, 2.5])
    labels = np.repeat([0, 1], [18, 42])
    x_np = true_means[labels] + rng.standard_normal(60) / np.sqrt(precision[labels])
    x = torch.from_numpy(x_np)[:, None]
    model = _model(x, 2, "spherical")
    assert model.prior is not None
    fixed = {"weights": torch.from_numpy(weights), "precision": torch.from_numpy(precision)}
    conditioned = poutine.condition(model.model, data=fixed)

    grid_mean, grid_sd, switched = _grid_posterior_of_locs(
        x_np,
        weights,
        precision,
        float(model.prior.mean_prior[0]),
        model.prior.mean_precision,
        np.linspace(-6.0, 6.0, 601),
    )
    assert switched < 1e-6

    start = {"locs": torch.tensor([[-1.0], [1.0]], dtype=torch.float64)}
    # jit only for speed: the traced potential is the same function (the backend test runs without)
    options = MCMCOptions(num_samples=500, warmup_steps=300, num_chains=2, jit_compile=True)
    chains = run_nuts(conditioned, x, start, options, model.max_plate_nesting)
    assert set(chains.samples) == {"locs"}
    locs = chains.samples["locs"][..., 0]  # (chains, draws, 2)
    assert locs.shape == (2, 500, 2)
    assert bool((locs[..., 0] < locs[..., 1]).all())  # never switched: the same region as the grid

    r_hat, ess_min = convergence({"locs": locs})
    assert r_hat is not None and r_hat < 1.01
    ess = effective_sample_size(locs, chain_dim=0, sample_dim=1).numpy()
    mcse = grid_sd / np.sqrt(ess)
    mcmc_mean = locs.mean((0, 1)).numpy()
    mcmc_sd = locs.std((0, 1)).numpy()
    assert ess_min == pytest.approx(ess.min())
    np.testing.assert_array_less(np.abs(mcmc_mean - grid_mean), 3 * mcse)
    # an sd estimate's own Monte-Carlo error is about sd / sqrt(2 ESS) for a near-Gaussian posterior
    np.testing.assert_array_less(np.abs(mcmc_sd - grid_sd), 4 * grid_sd / np.sqrt(2 * ess))
    assert chains.divergences == 0
    assert 0.5 < chains.accept_prob <= 1.0


def _separated(n: int = 200, seed: int = 1) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    x, _, truth = make_synthetic(n, 2, 2, 5.0, np.random.default_rng(seed))
    return torch.from_numpy(x), truth


def test_backend_posterior_mean_recovers_true_means() -> None:
    x, truth = _separated()
    model = _model(x, 2, "full")
    init = initialize(model, x, InitConfig(), seed=0)
    steps = []
    options = MCMCOptions(num_samples=100, warmup_steps=100, num_chains=2, jit_compile=True)
    fit = MCMCBackend().fit(model, x, init, options, steps.append)

    assert fit.point_estimate == "posterior_mean"
    assert fit.n_steps == 2 * (100 + 100) == MCMCBackend().total_steps(options)
    draws, posterior = fit.tensors["draws"], fit.tensors["posterior"]
    assert {name: tuple(value.shape) for name, value in draws.items()} == {
        "weights": (200, 2),
        "means": (200, 2, 2),
        "covariances": (200, 2, 2, 2),
    }
    assert all(value.dtype == torch.float64 for value in draws.values())
    assert torch.allclose(draws["weights"].sum(1), torch.ones(200, dtype=torch.float64))
    for draw_means in draws["means"]:  # relabelled: every draw already matches the pivot
        assert match_components(init["means"], draw_means).tolist() == [0, 1]
    torch.testing.assert_close(fit.params["means"], draws["means"].mean(0))
    torch.testing.assert_close(fit.params["covariances"], draws["covariances"].mean(0))
    torch.testing.assert_close(posterior["means.std"], draws["means"].std(0))

    # with a correct model, each true mean lies within 4 posterior sd of the posterior mean
    # (a 6e-5 chance per coordinate to fail); the Monte-Carlo error of 200 draws adds ~sd / 10
    true_means = torch.from_numpy(truth["means"])
    perm = match_components(true_means, fit.params["means"])
    error = (fit.params["means"][perm] - true_means).abs()
    assert bool((error < 4 * posterior["means.std"][perm]).all()), (error, posterior["means.std"])

    extras = fit.extras
    assert extras["num_chains"] == 2 and extras["num_samples"] == 100
    assert extras["r_hat_max"] is not None and 0.9 < extras["r_hat_max"] < 1.05
    assert fit.converged == (extras["r_hat_max"] < 1.01)
    assert extras["ess_min"] is not None and extras["ess_min"] > 50
    assert extras["divergences"] == 0 and 0.5 < extras["accept_prob"] <= 1.0

    assert [s.step for s in steps] == list(range(fit.n_steps + 1))
    assert all(math.isfinite(s.objective) and s.log_likelihood is not None for s in steps)
    assert all(a.wall_seconds <= b.wall_seconds for a, b in zip(steps, steps[1:], strict=False))
    assert steps[-1].wall_seconds <= fit.fit_seconds
    # the objective is the log joint per point: the log-likelihood plus the log prior over N
    params = {"weights": init["weights"], "means": init["means"], "covariances": init["covariances"]}
    log_prior = float(model.log_prior(params))
    assert steps[0].objective == pytest.approx(steps[0].log_likelihood + log_prior / x.shape[0], rel=1e-12)


def test_same_seed_gives_identical_draws() -> None:
    x, _ = _separated(80, seed=2)
    model = _model(x, 2, "diag")
    init = initialize(model, x, InitConfig(), seed=0)
    options = MCMCOptions(num_samples=10, warmup_steps=5, num_chains=2)

    def draws(seed: int) -> dict[str, torch.Tensor]:
        pyro.set_rng_seed(seed)
        return dict(MCMCBackend().fit(model, x, init, options, lambda s: None).tensors["draws"])

    first, again, other = draws(3), draws(3), draws(4)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["means"], other["means"])
    assert not torch.equal(first["means"][0], first["means"][-1])  # the chains move


def test_a_few_draws_give_no_diagnostics_rather_than_nan() -> None:
    x, _ = _separated(60, seed=3)
    model = _model(x, 2, "spherical")
    init = initialize(model, x, InitConfig(), seed=0)
    fit = MCMCBackend().fit(model, x, init, MCMCOptions(num_samples=2, warmup_steps=2), lambda s: None)
    assert fit.extras["r_hat_max"] is None and fit.extras["ess_min"] is None
    assert not fit.converged
    assert fit.tensors["draws"]["means"].shape == (2, 2, 2)
    assert all(bool(torch.isfinite(value).all()) for value in fit.params.values())


def test_relabel_undoes_label_switching() -> None:
    pivot = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]], dtype=torch.float64)
    draw = {
        "weights": torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64),
        "means": pivot + 0.1,
        "covariances": torch.diag_embed(
            torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
        ),
    }
    switched = {name: value[[2, 0, 1]] for name, value in draw.items()}
    back = relabel(GaussianMixture(3, 2, "full", None), {"means": pivot}, switched)
    for name, value in draw.items():
        torch.testing.assert_close(back[name], value)


def test_convergence_flags_chains_stuck_apart_and_skips_constants() -> None:
    gen = torch.Generator().manual_seed(0)
    mixed = torch.randn(2, 400, 3, generator=gen, dtype=torch.float64)
    apart = mixed + torch.tensor([0.0, 3.0], dtype=torch.float64)[:, None, None]
    zeros = torch.zeros(2, 400, 2, dtype=torch.float64)  # structural zeros, e.g. off-diagonals
    r_hat, ess = convergence({"a": mixed, "zeros": zeros})
    assert r_hat is not None and r_hat < 1.02 and ess is not None and ess > 400
    r_hat, _ = convergence({"a": apart, "zeros": zeros})
    assert r_hat is not None and r_hat > 1.5
    assert convergence({"a": mixed[:, :3]}) == (None, None)


def test_mcmc_needs_a_prior_and_names_the_fix() -> None:
    x, _ = _separated(50, seed=4)
    model = _model(x, 2, "full", prior="none")
    with pytest.raises(
        UserError, match=r"backends\.mcmc: .*model\.prior: none.*improper.*model\.prior: conjugate"
    ):
        MCMCBackend().check(model, MCMCOptions())
    MCMCBackend().check(_model(x, 2, "full"), MCMCOptions())
