"""The model declared in Pyro and the pieces EM uses are the same model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pyro import poutine
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from torch.distributions import transform_to

from ppl_gmm.models import MODELS
from ppl_gmm.models._gmm_em import unvech
from ppl_gmm.models.gmm import GaussianMixture, GMMHyperparameters, GMMOptions

CASES = list(itertools.product(["full", "tied", "diag", "spherical"], ["none", "conjugate"]))


def _model(x: torch.Tensor, covariance: str, prior: str, k: int = 3) -> GaussianMixture:
    return GaussianMixture.from_config(GMMOptions(k=k, covariance=covariance, prior=prior), x)


def _params(model: GaussianMixture, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    resp = torch.softmax(2 * torch.randn(x.shape[0], model.k, generator=gen, dtype=x.dtype), dim=1)
    return dict(model.m_step(x, resp, reg_covar=0.0))


def _enumerated_trace(model: GaussianMixture, x: torch.Tensor, sites: dict[str, torch.Tensor]):
    conditioned = poutine.condition(model.model, data=sites)
    trace = poutine.trace(poutine.enum(conditioned, first_available_dim=-2)).get_trace(x)
    trace.compute_log_prob()
    return trace


@pytest.mark.parametrize(("covariance", "prior"), CASES)
def test_log_joint_equals_pyro_enumerated_trace(covariance: str, prior: str, blobs) -> None:
    x = blobs[0][:200]
    model = _model(x, covariance, prior)
    params = _params(model, x, 1)
    trace = _enumerated_trace(model, x, model.to_sites(params))
    pyro_log_joint = (trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"]).T
    assert pyro_log_joint.shape == (200, model.k)
    torch.testing.assert_close(model.log_joint(x, params), pyro_log_joint, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(("covariance", "prior"), CASES)
def test_log_prior_equals_pyro_global_sites(covariance: str, prior: str, blobs) -> None:
    x = blobs[0][:200]
    model = _model(x, covariance, prior)
    params = _params(model, x, 2)
    trace = _enumerated_trace(model, x, model.to_sites(params))
    pyro_prior = sum(trace.nodes[s]["log_prob"].sum() for s in ("weights", "precision", "locs"))
    torch.testing.assert_close(model.log_prior(params), pyro_prior.to(torch.float64), rtol=1e-12, atol=1e-10)
    if prior == "none":
        assert float(pyro_prior) == 0.0
    else:
        assert float(pyro_prior) != 0.0


@pytest.mark.parametrize(("covariance", "prior"), CASES)
def test_m_step_is_stationary_for_the_pyro_model(covariance: str, prior: str, blobs) -> None:
    """The closed-form M-step maximizes Σ r log p(x, z | θ) + log p(θ) as Pyro computes it:
    the gradient in unconstrained coordinates vanishes there, and nearby points score lower."""
    x = blobs[0][:300]
    model = _model(x, covariance, prior)
    gen = torch.Generator().manual_seed(3)
    resp = torch.softmax(torch.randn(x.shape[0], model.k, generator=gen, dtype=x.dtype), dim=1)
    sites = model.to_sites(model.m_step(x, resp, reg_covar=0.0))
    support_trace = poutine.trace(poutine.condition(model.model, data=sites)).get_trace(x)
    transforms = {s: transform_to(support_trace.nodes[s]["fn"].support) for s in sites}
    free = {s: transforms[s].inv(v).detach().requires_grad_() for s, v in sites.items()}

    def objective(values: dict[str, torch.Tensor]) -> torch.Tensor:
        constrained = {s: transforms[s](v) for s, v in values.items()}
        trace = _enumerated_trace(model, x, constrained)
        log_joint = (trace.nodes["z"]["log_prob"] + trace.nodes["x"]["log_prob"]).T
        return (resp * log_joint).sum() + sum(trace.nodes[s]["log_prob"].sum() for s in sites)

    best = objective(free)
    grads = torch.autograd.grad(best, list(free.values()))
    for name, grad in zip(free, grads, strict=True):
        assert grad.abs().max() < 1e-8, name
    for trial in range(3):
        nudged = {
            s: v.detach() + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for s, v in free.items()
        }
        assert objective(nudged) < best, trial


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_n_params_matches_scikit_learn(covariance: str, blobs) -> None:
    x = blobs[0]
    model = _model(x, covariance, "none", k=4)
    reference = SkGaussianMixture(4, covariance_type=covariance, max_iter=1, random_state=0)
    reference.means_ = np.zeros((4, x.shape[1]))
    reference.covariances_ = {
        "full": np.zeros((4, 3, 3)),
        "tied": np.zeros((3, 3)),
        "diag": np.zeros((4, 3)),
        "spherical": np.zeros(4),
    }[covariance]
    assert model.n_params() == reference._n_parameters()


def test_conjugate_defaults_follow_scikit_learn(blobs) -> None:
    x = blobs[0]
    model = _model(x, "full", "conjugate")
    prior = model.prior
    assert prior is not None
    np.testing.assert_allclose(prior.covariance_prior.numpy(), np.cov(x.numpy().T), rtol=1e-12)
    np.testing.assert_allclose(prior.mean_prior.numpy(), x.numpy().mean(0), rtol=1e-12)
    assert prior.degrees_of_freedom == x.shape[1]
    assert prior.mean_precision == 1.0
    diag = _model(x, "diag", "conjugate").prior
    np.testing.assert_allclose(diag.covariance_prior.numpy(), np.var(x.numpy(), axis=0, ddof=1))


def test_explicit_hyperparameters_are_used(blobs) -> None:
    x = blobs[0]
    cfg = GMMOptions(
        k=2,
        covariance="spherical",
        prior="conjugate",
        hyperparameters=GMMHyperparameters(
            weight_concentration=2.0,
            mean_precision=0.5,
            mean_prior=[1.0, 2.0, 3.0],
            degrees_of_freedom=7.0,
            covariance_prior=0.25,
        ),
    )
    prior = GaussianMixture.from_config(cfg, x).prior
    assert (prior.weight_concentration, prior.mean_precision, prior.degrees_of_freedom) == (2.0, 0.5, 7.0)
    assert prior.mean_prior.tolist() == [1.0, 2.0, 3.0]
    assert float(prior.covariance_prior) == 0.25


def test_sites_round_trip(blobs) -> None:
    x = blobs[0][:300]
    for covariance in ("full", "tied", "diag", "spherical"):
        model = _model(x, covariance, "none")
        params = _params(model, x, 4)
        back = model.from_sites(model.to_sites(params))
        for name in params:
            torch.testing.assert_close(back[name], params[name], rtol=1e-10, atol=1e-12)


def test_an_unknown_model_name_lists_the_known_ones() -> None:
    from ppl_gmm.errors import UserError

    with pytest.raises(
        UserError, match="model.name: unknown model 'hmm'. Known models: .*gmm.*poisson_mixture"
    ):
        MODELS.get("hmm", field="model.name")


def _stick_breaking_model(x: torch.Tensor, covariance: str, k: int = 3) -> GaussianMixture:
    hyper = GMMHyperparameters(weight_prior="dirichlet_process")
    return GaussianMixture.from_config(
        GMMOptions(k=k, covariance=covariance, prior="conjugate", hyperparameters=hyper), x
    )


def _ml_params(model: GaussianMixture, x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Random parameters; the stick-breaking prior has no M-step (its mode is on the boundary)."""
    gen = torch.Generator().manual_seed(seed)
    resp = torch.softmax(2 * torch.randn(x.shape[0], model.k, generator=gen, dtype=x.dtype), dim=1)
    return dict(model.m_step(x, resp, reg_covar=0.0, use_prior=False))


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_stick_breaking_log_joint_equals_pyro_enumerated_trace(covariance: str, blobs) -> None:
    """Uniform z plus the stick_mass factor is log π_k + log N(x_n | θ_k), with the K sticks'
    weights summing to less than one as scikit-learn's truncation leaves them."""
    x = blobs[0][:200]
    model = _stick_breaking_model(x, covariance)
    params = _ml_params(model, x, 5)
    sites = model.to_sites(params)
    sites["sticks"] = torch.tensor([0.3, 0.6, 0.5], dtype=x.dtype)  # leaves 0.14 of the mass off
    weights = torch.tensor([0.3, 0.7 * 0.6, 0.7 * 0.4 * 0.5], dtype=x.dtype)
    trace = _enumerated_trace(model, x, sites)
    pyro_log_joint = sum(trace.nodes[s]["log_prob"] for s in ("z", "stick_mass", "x")).T
    assert pyro_log_joint.shape == (200, model.k)
    ours = model.log_joint(x, {**params, "weights": weights})
    torch.testing.assert_close(ours, pyro_log_joint, rtol=1e-12, atol=1e-10)


def test_stick_breaking_log_prior_equals_pyro_global_sites(blobs) -> None:
    x = blobs[0][:200]
    model = _stick_breaking_model(x, "full")
    params = _ml_params(model, x, 6)
    trace = _enumerated_trace(model, x, model.to_sites(params))
    assert "weights" not in trace.nodes
    pyro_prior = sum(trace.nodes[s]["log_prob"].sum() for s in ("sticks", "precision", "locs"))
    torch.testing.assert_close(model.log_prior(params), pyro_prior, rtol=1e-12, atol=1e-10)


def test_sticks_round_trip_and_break_the_weights(blobs) -> None:
    x = blobs[0][:300]
    model = _stick_breaking_model(x, "diag", k=4)
    params = _ml_params(model, x, 7)
    sticks = model.to_sites(params)["sticks"]
    weights = params["weights"].numpy()
    expected = [weights[k] / (1 - weights[:k].sum()) for k in range(4)]
    np.testing.assert_allclose(sticks[:3].numpy(), expected[:3], rtol=1e-12)
    assert 0 < float(sticks[3]) < 1  # the last stick takes all that is left: clamped inside (0, 1)
    back = model.from_sites(model.to_sites(params))
    for name in params:
        torch.testing.assert_close(back[name], params[name], rtol=1e-10, atol=1e-12)


def test_weight_concentration_defaults_per_weight_prior(blobs) -> None:
    x = blobs[0]
    assert _model(x, "full", "conjugate", k=5).prior.weight_concentration == 1.0
    prior = _stick_breaking_model(x, "full", k=5).prior
    assert prior.weight_concentration == pytest.approx(1 / 5) and prior.stick_breaking


@pytest.mark.parametrize("d", range(1, 8))
def test_design_holds_every_product_once(d: int) -> None:
    """A point's quadratic features, laid back out as a matrix, are x x^T (each pair once, odd
    and even D), followed by 1 and x; a buffer reused by blocks of several sizes, in any order,
    gives the same."""
    rng = np.random.default_rng(d)
    x = torch.from_numpy(rng.normal(size=(7, d)))
    shift = torch.from_numpy(rng.normal(size=d))
    centered = (x - shift).numpy()
    f = d * (d + 1) // 2
    model = GaussianMixture(2, d, "full", None)
    buffer = model.design_buffer(torch.empty(0, dtype=torch.float64), 9)
    buffer.flat.fill_(float("nan"))
    for rows in (x[:2], x, x, x[:3] * 5, x):  # another size first, the same twice, another between
        design = model.design(rows, shift, buffer)
        assert design.shape == (f + 1 + d, rows.shape[0])
    outer = unvech(design[:f].T, d).numpy()
    np.testing.assert_allclose(outer, centered[:, :, None] * centered[:, None, :], rtol=1e-15)
    np.testing.assert_array_equal(design[f].numpy(), np.ones(7))
    np.testing.assert_allclose(design[f + 1 :].numpy(), centered.T, rtol=1e-15)
    fresh = model.design(x, shift)  # without a buffer
    np.testing.assert_array_equal(fresh.numpy(), design.numpy())
    between = model.design(x[:3] * 5, shift, buffer)
    np.testing.assert_array_equal(between[f].numpy(), np.ones(3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
# in float32, k = 12 takes the other orientation of the statistics GEMM (gmm.weighted_moments)
@pytest.mark.parametrize("k", [3, 6, 12])
@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_block_statistics_equal_direct_sums(covariance: str, k: int, dtype: torch.dtype) -> None:
    """nk, Σ r (x - shift) and the second moments from a block's design, against numpy's float64
    sums of the same responsibilities."""
    rng = np.random.default_rng(k)
    x = rng.normal(size=(500, 4)) * [1.0, 2.0, 0.5, 3.0] + 4.0
    resp = rng.dirichlet(np.ones(k), size=500)
    shift = x[:100].mean(0)
    model = GaussianMixture(k, 4, covariance, None)
    center = torch.from_numpy(shift).to(dtype)
    design = model.design(torch.from_numpy(x).to(dtype), center)
    stats = model.new_stats(center)
    model.accumulate(stats, design, torch.from_numpy(resp.T.copy()).to(dtype))
    # statistics made by arithmetic (online EM's blends) are new tensors, added to the same way
    blended = {name: 0.5 * value + 0.5 * value for name, value in model.new_stats(center).items()}
    model.accumulate(blended, design, torch.from_numpy(resp.T.copy()).to(dtype))
    for name, value in stats.items():
        torch.testing.assert_close(value, blended[name], rtol=1e-12, atol=1e-12 * 500)
    stats = model.moments(stats)
    centered = x - shift
    outer = centered[:, :, None] * centered[:, None, :]
    second = {
        "full": np.einsum("nk,nij->kij", resp, outer),
        "tied": outer.sum(0),
        "diag": resp.T @ centered**2,
        "spherical": resp.T @ centered**2,
    }[covariance]
    ours = stats.second if covariance in ("diag", "spherical") else unvech(stats.second, 4)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(stats.nk.double().numpy(), resp.sum(0), rtol=rtol)
    np.testing.assert_allclose(stats.sums.double().numpy(), resp.T @ centered, rtol=rtol, atol=rtol * 500)
    np.testing.assert_allclose(ours.double().numpy(), second, rtol=rtol, atol=rtol * 500)
