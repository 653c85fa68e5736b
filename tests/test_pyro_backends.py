"""MAP and SVI run the same Pyro model that EM uses, and agree with it where they should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, infer_discrete
from pyro.infer.autoguide import AutoDelta, init_to_value

from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.backends.map import MAP, MAPOptions
from ppl_gmm.backends.svi import SVIBackend, SVIBackendOptions
from ppl_gmm.config import InitConfig
from ppl_gmm.errors import UserError
from ppl_gmm.evaluate import match_components
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMHyperparameters, GMMOptions, make_synthetic


def _data(n: int, dim: int, k: int, separation: float, seed: int):
    x, labels, truth = make_synthetic(n, dim, k, separation, np.random.default_rng(seed))
    return torch.from_numpy(x), labels, truth


def _setup(x, covariance="full", prior="none", k=3, **hyper):
    model = GaussianMixture.from_config(
        GMMOptions(k=k, covariance=covariance, prior=prior, hyperparameters=GMMHyperparameters(**hyper)), x
    )
    return model, initialize(model, x, InitConfig(), seed=0)


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_delta_guide_at_em_parameters_gives_minus_n_times_em_log_likelihood(covariance: str) -> None:
    x, _, _ = _data(400, 2, 3, 3.0, 1)
    model, init = _setup(x, covariance)
    em = EM().fit(model, x, init, EMOptions(max_iter=30), lambda s: None)
    sites = model.to_sites(em.params)
    guide = AutoDelta(poutine.block(model.model, expose=list(sites)), init_loc_fn=init_to_value(values=sites))
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model.model, guide, x)
    expected = -x.shape[0] * float(model.log_likelihood(x, em.params).mean())
    assert loss == pytest.approx(expected, rel=1e-8)


def test_map_without_prior_reaches_em_log_likelihood() -> None:
    x, _, _ = _data(300, 2, 3, 3.0, 2)
    model, init = _setup(x, "full")
    em = EM().fit(model, x, init, EMOptions(tol=1e-10), lambda s: None)
    steps = []
    fit = MAP().fit(
        model, x, init, MAPOptions(steps=3000, lr=0.05, tol=1e-10, patience=20, compile=False), steps.append
    )
    assert fit.point_estimate == "mle"
    em_ll = float(model.log_likelihood(x, em.params).mean())
    map_ll = float(model.log_likelihood(x, fit.params).mean())
    assert abs(map_ll - em_ll) < 1e-4, (map_ll, em_ll)
    assert steps[0].step == 0 and steps[-1].step == fit.n_steps
    assert steps[-1].log_likelihood == pytest.approx(map_ll, abs=1e-12)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_map_by_gradient_agrees_with_map_em(covariance: str) -> None:
    x, _, _ = _data(300, 2, 3, 3.0, 3)
    model, init = _setup(x, covariance, "conjugate", weight_concentration=2.0)
    em = EM().fit(model, x, init, EMOptions(tol=1e-12, reg_covar=0.0, max_iter=2000), lambda s: None)
    fit = MAP().fit(
        model, x, init, MAPOptions(steps=4000, lr=0.05, tol=1e-12, patience=20, compile=False), lambda s: None
    )
    assert fit.point_estimate == "map"
    perm = match_components(em.params["means"], fit.params["means"])
    for name in ("weights", "means", "covariances"):
        np.testing.assert_allclose(fit.params[name][perm].numpy(), em.params[name].numpy(), atol=1e-4)


def test_map_jit_gives_the_same_steps() -> None:
    x, _, _ = _data(200, 2, 2, 4.0, 4)
    model, init = _setup(x, "full", "conjugate", k=2)
    plain, jitted = [], []
    before = {name: value.clone() for name, value in init.items()}
    MAP().fit(model, x, init, MAPOptions(steps=20, tol=0.0), plain.append)
    assert all(torch.equal(init[name], before[name]) for name in init)  # the start is not mutated
    MAP().fit(model, x, init, MAPOptions(steps=20, tol=0.0, jit=True), jitted.append)
    np.testing.assert_allclose([s.objective for s in jitted], [s.objective for s in plain], rtol=1e-6)
    assert jitted[-1].objective > jitted[0].objective


def _log_evidence_by_prior_sampling(model, x, draws: int, seed: int) -> float:
    """log p(X) = log E_prior[p(X | θ)], θ drawn from the conjugate prior (1-D, spherical)."""
    prior = model.prior
    gen = torch.Generator().manual_seed(seed)
    k = model.k
    weights = torch._standard_gamma(
        torch.full((draws, k), prior.weight_concentration, dtype=torch.float64), generator=gen
    )
    weights = weights / weights.sum(1, keepdim=True)
    shape = torch.full((draws, k), model.dim * prior.degrees_of_freedom / 2, dtype=torch.float64)
    precision = torch._standard_gamma(shape, generator=gen) / (model.dim * float(prior.covariance_prior) / 2)
    locs = prior.mean_prior + torch.randn(draws, k, generator=gen, dtype=torch.float64) / torch.sqrt(
        prior.mean_precision * precision
    )
    component = torch.distributions.Normal(locs[:, None, :], precision[:, None, :].rsqrt())
    log_lik = torch.logsumexp(weights.log()[:, None, :] + component.log_prob(x[None, :, :1]), dim=2).sum(1)
    return float(torch.logsumexp(log_lik, 0) - math.log(draws))


def test_svi_elbo_stays_below_the_log_evidence() -> None:
    x, _, _ = _data(12, 1, 2, 4.0, 5)
    model, init = _setup(x, "spherical", "conjugate", k=2)
    log_evidence = [_log_evidence_by_prior_sampling(model, x, 400_000, seed) for seed in (0, 1)]
    assert abs(log_evidence[0] - log_evidence[1]) < 0.05  # the estimate itself is stable
    fit = SVIBackend().fit(
        model,
        x,
        init,
        SVIBackendOptions(steps=600, lr=0.05, guide="mvn", elbo_particles=300),
        lambda s: None,
    )
    elbo = fit.elbo * x.shape[0]
    assert elbo < min(log_evidence)
    assert elbo > min(log_evidence) - 3.0  # a sensible fit, not a vacuous bound


def test_svi_posterior_mean_recovers_true_means() -> None:
    x, _, truth = _data(600, 2, 3, 7.0, 6)
    model, init = _setup(x, "full", "conjugate")
    fit = SVIBackend().fit(
        model, x, init, SVIBackendOptions(steps=600, lr=0.02, elbo_particles=10), lambda s: None
    )
    assert fit.point_estimate == "posterior_mean"
    true_means = torch.from_numpy(truth["means"])
    perm = match_components(true_means, fit.params["means"])
    assert (fit.params["means"][perm] - true_means).abs().max() < 0.25
    assert fit.elbo < float(model.log_likelihood(x, fit.params).mean())


def test_mean_field_assignments_give_a_looser_bound() -> None:
    x, _, _ = _data(200, 2, 3, 3.0, 7)
    model, init = _setup(x, "diag", "conjugate")
    options = dict(steps=800, lr=0.02, elbo_particles=200)
    exact = SVIBackend().fit(model, x, init, SVIBackendOptions(**options), lambda s: None)
    relaxed = SVIBackend().fit(
        model, x, init, SVIBackendOptions(local="mean_field", **options), lambda s: None
    )
    assert relaxed.elbo < exact.elbo + 0.005


def test_svi_needs_a_prior_and_names_the_fix() -> None:
    x, _, _ = _data(100, 2, 2, 4.0, 8)
    model, _ = _setup(x, "full", "none", k=2)
    with pytest.raises(UserError, match=r"backends\.svi: .*prior.*model\.prior: conjugate"):
        SVIBackend().check(model, SVIBackendOptions())


def test_hard_assignments_match_pyro_infer_discrete() -> None:
    x, _, _ = _data(300, 2, 3, 2.0, 9)
    model, init = _setup(x, "full")
    sites = model.to_sites(init)
    conditioned = poutine.condition(model.model, data=sites)
    decoded = infer_discrete(conditioned, first_available_dim=-2, temperature=0)
    trace = poutine.trace(decoded).get_trace(x)
    ours = torch.argmax(model.log_joint(x, init), dim=1)
    assert torch.equal(trace.nodes["z"]["value"], ours)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.prior=none", "backends.svi.guide=normal"], "backends.svi: SVI approximates a posterior"),
        (["backends.svi.guide=flow"], "backends.svi.guide: Input should be 'normal', 'lowrank' or 'mvn'"),
        (["backends.map.optimizer=sgd"], "backends.map.optimizer: Input should be 'adam' or 'clipped_adam'"),
        (["backends.svi.rank=2"], "backends.svi.rank: only the lowrank guide has a rank"),
    ],
)
def test_bad_pyro_backend_options_are_config_errors(overrides, needle, capsys, tmp_path) -> None:
    from pathlib import Path

    from ppl_gmm.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "compare.yaml"
    assert main(["run", str(config), "--runs-dir", str(tmp_path / "runs"), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {needle}")
    assert not (tmp_path / "runs").exists()


def test_mini_batch_losses_are_unbiased_for_the_full_loss() -> None:
    """A subsampled data plate scales its points up to all of them: averaged over many
    mini-batches, the loss at fixed parameters is the full-data loss."""
    x, _, _ = _data(400, 2, 3, 3.0, 10)
    model, init = _setup(x, "full", "conjugate")
    sites = model.to_sites(init)
    guide = AutoDelta(poutine.block(model.model, expose=list(sites)), init_loc_fn=init_to_value(values=sites))
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    full = elbo.loss(model.model, guide, x)
    losses = np.array([elbo.loss(model.model, guide, x, batch_size=50) for _ in range(400)])
    assert losses.std() > 0  # really subsampled
    assert abs(losses.mean() - full) < 4 * losses.std() / np.sqrt(len(losses))


@pytest.mark.parametrize("local", ["enumerate", "mean_field"])
def test_mini_batch_svi_and_map_approach_the_full_batch_answer(local: str) -> None:
    """With a constant learning rate mini-batch steps end in a noise ball around the optimum: they
    close much of the gap from the (k-means) start to EM's answer, not all of it."""
    x, _, _ = _data(2000, 2, 3, 5.0, 11)
    model, init = _setup(x, "full", "conjugate")
    em = EM().fit(model, x, init, EMOptions(tol=1e-10, reg_covar=0.0), lambda s: None)
    em_ll = float(model.log_likelihood(x, em.params).mean())
    start_gap = em_ll - float(model.log_likelihood(x, init).mean())
    fit = MAP().fit(model, x, init, MAPOptions(steps=600, lr=0.02, tol=0.0, batch_size=200), lambda s: None)
    svi = SVIBackend().fit(
        model,
        x,
        init,
        SVIBackendOptions(steps=300, lr=0.02, batch_size=200, local=local, elbo_particles=5, mean_samples=20),
        lambda s: None,
    )
    for params in (fit.params, svi.params):
        gap = abs(em_ll - float(model.log_likelihood(x, params).mean()))
        assert gap < 1e-2 and gap < 0.5 * start_gap, (gap, start_gap)


def test_jit_with_mini_batches_is_an_options_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="jit"):
        MAPOptions(jit=True, batch_size=10)
