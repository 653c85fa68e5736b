"""Online EM (Cappé & Moulines) and incremental EM (Neal & Hinton): the free energy from
statistics against a direct computation, the never-decreasing bound, agreement with batch EM."""

from __future__ import annotations

import numpy as np
import pydantic
import pyro
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ppl_gmm.backends import FitError
from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.backends.incremental_em import IncrementalEM, IncrementalEMOptions
from ppl_gmm.backends.online_em import OnlineEM, OnlineEMOptions, step_size
from ppl_gmm.backends.partial_em import e_step_rows
from ppl_gmm.config import InitConfig
from ppl_gmm.errors import UserError
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic

COVARIANCES = ["full", "tied", "diag", "spherical"]


def _setup(x, k=3, covariance="full", prior="none", seed=0):
    model = GaussianMixture.from_config(GMMOptions(k=k, covariance=covariance, prior=prior), x)
    return model, initialize(model, x, InitConfig(reg_covar=1e-3), seed=seed)


def _fit(backend, model, x, init, options):
    steps = []
    result = backend.fit(model, x, init, options, steps.append)
    return result, steps


def _mean_log_likelihood(model, x, params) -> float:
    return float(model.log_likelihood(x.double(), {k: v.double() for k, v in params.items()}).mean())


@pytest.fixture(scope="module")
def twenty_thousand() -> torch.Tensor:
    x, _, _ = make_synthetic(20000, 4, 3, 4.0, np.random.default_rng(11))
    return torch.from_numpy(x)


# ---- the free energy from statistics -------------------------------------------------------


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_expected_log_joint_equals_the_direct_sum(covariance: str) -> None:
    """For any responsibilities r, not only the posterior, Σ r log p(x, z | θ) from statistics."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 3, generator=generator, dtype=torch.float64) * 2.0 + 5.0
    model, params = _setup(x, k=4, covariance=covariance)
    resp = torch.softmax(3.0 * torch.randn(300, 4, generator=generator, dtype=torch.float64), dim=1)
    shift = x[:50].mean(0)
    stats = model.new_stats(shift)
    model.accumulate(stats, model.design(x, shift), resp.T.contiguous())
    ours = model.expected_log_joint(stats, model.prepare(params, shift))
    direct = (resp * model.log_joint(x, params)).sum()
    torch.testing.assert_close(ours, direct, rtol=1e-11, atol=0.0)


@pytest.mark.parametrize("covariance", COVARIANCES)
def test_e_step_entropy_and_log_likelihood_are_the_posterior_s(covariance: str) -> None:
    """At the posterior, Q + H = log p(x | θ): the bound touches the log-likelihood."""
    x = torch.from_numpy(make_synthetic(5000, 3, 3, 2.0, np.random.default_rng(4))[0])
    model, params = _setup(x, covariance=covariance)
    shift = x.mean(0)
    stats = model.new_stats(shift)
    result = e_step_rows(model, x, model.prepare(params, shift), shift, stats)  # two chunks
    log_joint = model.log_joint(x, params)
    log_resp = torch.log_softmax(log_joint, dim=1)
    np.testing.assert_allclose(result.entropy, float(-(log_resp.exp() * log_resp).sum()), rtol=1e-11)
    log_likelihood = float(torch.logsumexp(log_joint, dim=1).sum())
    np.testing.assert_allclose(result.log_likelihood, log_likelihood, rtol=1e-13)
    bound = float(model.expected_log_joint(stats, model.prepare(params, shift))) + result.entropy
    np.testing.assert_allclose(bound, log_likelihood, rtol=1e-11)


# ---- incremental EM --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(40, 300),
    dim=st.integers(1, 3),
    k=st.integers(1, 4),
    blocks=st.integers(2, 6),
    covariance=st.sampled_from(COVARIANCES),
    prior=st.sampled_from(["none", "conjugate"]),
)
def test_incremental_bound_never_decreases(seed, n, dim, k, blocks, covariance, prior) -> None:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 10.0, size=dim)
    x = torch.from_numpy(rng.standard_normal((n, dim)) * scale + rng.integers(0, 3, (n, 1)) * scale)
    model, init = _setup(x, k=k, covariance=covariance, prior=prior, seed=seed)
    # reg_covar 0 keeps the M-step exact; a start with a nearly empty component would then collapse
    assume(float(init["weights"].min()) * n >= 2 * (dim + 1))
    options = IncrementalEMOptions(blocks=blocks, max_epochs=6, tol=0.0, reg_covar=0.0)
    result, steps = _fit(IncrementalEM(), model, x, init, options)
    assert result.n_steps == steps[-1].step == 6 * blocks and not result.converged
    bound = np.array([s.objective for s in steps])
    assert np.isfinite(bound).all()
    drops = np.diff(bound)
    assert drops.min() >= -1e-10 * np.abs(bound).max(), drops.min()
    at_epoch_ends = [s for s in steps if s.log_likelihood is not None]
    assert [s.step for s in at_epoch_ends] == list(range(0, 6 * blocks + 1, blocks))
    if prior == "none":  # a bound on the log-likelihood, touching it after the first full E-step
        assert steps[0].objective == pytest.approx(steps[0].log_likelihood, rel=1e-12)
        for s in at_epoch_ends:
            assert s.objective <= s.log_likelihood + 1e-12 * abs(s.log_likelihood)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_incremental_em_reaches_batch_em_s_optimum(blobs, covariance: str) -> None:
    x = blobs[0]
    model, init = _setup(x, k=4, covariance=covariance, seed=2)
    batch, _ = _fit(EM(), model, x, init, EMOptions(tol=1e-12, max_iter=2000))
    options = IncrementalEMOptions(blocks=7, tol=1e-12, max_epochs=2000)
    incremental, steps = _fit(IncrementalEM(), model, x, init, options)
    assert batch.converged and incremental.converged
    ours = _mean_log_likelihood(model, x, incremental.params)
    assert abs(ours - _mean_log_likelihood(model, x, batch.params)) < 1e-6
    assert steps[-1].log_likelihood == pytest.approx(ours, abs=1e-12)
    torch.testing.assert_close(incremental.params["means"], batch.params["means"], atol=1e-4, rtol=0)


# ---- online EM -------------------------------------------------------------------------------


def test_step_sizes_follow_the_schedule() -> None:
    assert step_size(1, 0.6, 2.0) == 1.0
    assert step_size(2, 0.6, 2.0) == pytest.approx(4.0**-0.6)
    assert step_size(10, 1.0, 0.0) == pytest.approx(0.1)


@pytest.mark.parametrize("prior", ["none", "conjugate"])
def test_online_em_blends_batch_statistics_with_the_schedule(prior: str) -> None:
    """Replays the recursion by hand, unshuffled: s_1 = (N/B) stats_1 at θ_0 and
    s_t = (1 - γ_t) s_{t-1} + γ_t (N/B_t) stats_t at θ_{t-1}, γ_t = (t + t0)^-κ."""
    x = torch.from_numpy(make_synthetic(1100, 2, 3, 3.0, np.random.default_rng(5))[0])
    model, init = _setup(x, prior=prior)
    options = OnlineEMOptions(batch_size=300, shuffle=False, step_power=0.7, step_offset=1.5)
    result, steps = _fit(OnlineEM(), model, x, init, options)

    params, stats, objectives = init, None, []
    shift = x[:300].mean(0)
    for t, rows in enumerate(x.split(300), start=1):
        log_joint = model.log_joint(rows, params)
        objectives.append(float(torch.logsumexp(log_joint, 1).mean() + model.log_prior(params) / 1100))
        batch = model.new_stats(shift)
        model.accumulate(batch, model.design(rows, shift), torch.softmax(log_joint, 1).T.contiguous())
        scaled = {name: value * 1100 / rows.shape[0] for name, value in batch.items()}
        gamma = (t + 1.5) ** -0.7
        stats = (
            scaled
            if stats is None
            else {name: (1 - gamma) * s + gamma * scaled[name] for name, s in stats.items()}
        )
        params = model.m_step_stats(stats, shift, 1e-6)

    assert [s.step for s in steps] == [1, 2, 3, 4] and result.n_steps == 4 and result.converged
    np.testing.assert_allclose([s.objective for s in steps], objectives, rtol=1e-12)
    for name, value in params.items():
        torch.testing.assert_close(result.params[name], value, rtol=1e-10, atol=1e-12)
    assert result.point_estimate == ("map" if prior == "conjugate" else "mle")


@pytest.mark.parametrize(
    ("covariance", "dtype"),
    [("full", torch.float64), ("tied", torch.float32), ("diag", torch.float32), ("spherical", torch.float64)],
)
def test_one_online_epoch_gets_within_1e_3_of_batch_em(twenty_thousand, covariance, dtype) -> None:
    x = twenty_thousand.to(dtype)
    model, init = _setup(twenty_thousand, covariance=covariance)
    batch, _ = _fit(EM(), model, x, init, EMOptions(tol=1e-9))
    online, steps = _fit(OnlineEM(), model, x, init, OnlineEMOptions(eval_every=2))
    assert online.converged and online.n_steps == 5 and [s.step for s in steps] == [1, 2, 3, 4, 5]
    assert [s.log_likelihood is not None for s in steps] == [False, True, False, True, True]
    target = _mean_log_likelihood(model, twenty_thousand, batch.params)
    reached = _mean_log_likelihood(model, twenty_thousand, online.params)
    assert target - 1e-3 < reached <= target + 1e-6
    assert steps[-1].log_likelihood == pytest.approx(reached, abs=1e-5 if dtype == torch.float32 else 1e-12)


def test_online_em_is_reproducible_under_the_seed(twenty_thousand) -> None:
    model, init = _setup(twenty_thousand)

    def fit(seed: int, **options) -> dict[str, torch.Tensor]:
        pyro.set_rng_seed(seed)
        return _fit(OnlineEM(), model, twenty_thousand, init, OnlineEMOptions(**options))[0].params

    first, again, other = fit(1), fit(1), fit(2)
    for name in first:
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
    assert not torch.equal(first["means"], other["means"])  # the order comes from the seed
    assert torch.equal(fit(1, shuffle=False)["means"], fit(2, shuffle=False)["means"])


# ---- all covariance types, priors and dtypes --------------------------------------------------


@pytest.mark.parametrize("covariance", COVARIANCES)
@pytest.mark.parametrize("prior", ["none", "conjugate"])
def test_both_fit_every_covariance_prior_and_dtype(blobs, covariance: str, prior: str) -> None:
    x = blobs[0]
    model, init = _setup(x, k=4, covariance=covariance, prior=prior)
    reached = {}
    for dtype in (torch.float64, torch.float32):
        for backend, options in (
            (OnlineEM(), OnlineEMOptions(batch_size=300, epochs=3)),
            (IncrementalEM(), IncrementalEMOptions(max_epochs=30, tol=1e-7)),
        ):
            pyro.set_rng_seed(0)  # the same order of mini-batches for both dtypes
            result, steps = _fit(backend, model, x.to(dtype), init, options)
            assert all(value.dtype == dtype for value in result.params.values())
            objective = np.array([s.objective for s in steps])
            assert np.isfinite(objective).all()
            if backend.name == "incremental_em":  # float32: rounding of the statistics only
                slack = 1e-10 if dtype == torch.float64 else 1e-7
                assert np.diff(objective).min() >= -slack * np.abs(objective).max()
            reached[backend.name, dtype] = _mean_log_likelihood(model, x, result.params)
    for name in ("online_em", "incremental_em"):
        assert reached[name, torch.float32] == pytest.approx(reached[name, torch.float64], abs=1e-4)


# ---- a component that loses all its points ------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "options", "step", "fix"),
    [
        (OnlineEM(), OnlineEMOptions(batch_size=100), 1, "batch_size"),
        (IncrementalEM(), IncrementalEMOptions(blocks=3), 0, "model.k"),  # after the first full pass
    ],
    ids=["online_em", "incremental_em"],
)
def test_an_empty_component_fails_the_fit_with_a_fix(blobs, backend, options, step: int, fix: str) -> None:
    """Their statistics remember past E-steps, which a re-seeded θ would contradict: they stop
    with a FitError that names the fix, rather than fit the component from rounding noise."""
    x = blobs[0]
    model, init = _setup(x, k=3)
    init = {**init, "means": init["means"].clone()}
    init["means"][2] = 1e3  # so far from every point that it gets none of them
    with pytest.raises(FitError, match=rf"^step {step}: component 2 lost all its points.*{fix}.*re-seeds"):
        _fit(backend, model, x, init, options)


# ---- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field", "value"),
    [
        (OnlineEMOptions, "step_power", 0.3),
        (OnlineEMOptions, "step_power", 0.5),
        (OnlineEMOptions, "step_power", 1.5),
        (OnlineEMOptions, "batch_size", 0),
        (OnlineEMOptions, "epochs", 0),
        (OnlineEMOptions, "step_offset", -1.0),
        (OnlineEMOptions, "eval_every", 0),
        (OnlineEMOptions, "max_iter", 10),
        (IncrementalEMOptions, "blocks", 0),
        (IncrementalEMOptions, "max_epochs", 0),
        (IncrementalEMOptions, "tol", -1.0),
    ],
)
def test_bad_options_are_refused(options, field: str, value: float) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        options(**{field: value})


@pytest.mark.parametrize("backend", [OnlineEM(), IncrementalEM()])
def test_stick_breaking_weights_are_refused(blobs, backend) -> None:
    x = blobs[0]
    model = GaussianMixture.from_config(
        GMMOptions(k=3, prior="conjugate", hyperparameters={"weight_prior": "dirichlet_process"}), x
    )
    with pytest.raises(UserError, match="dirichlet_process"):
        backend.check(model, backend.options())
