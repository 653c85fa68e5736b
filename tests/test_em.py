"""Exact EM against scikit-learn, its monotone objective, and recovery of simulated truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from ppl_gmm.backends import FitError
from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.config import InitConfig
from ppl_gmm.evaluate import match_components
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic


def _fit(model, x, init, **options):
    steps = []
    result = EM().fit(model, x, init, EMOptions(**options), steps.append)
    return result, steps


def _native_precisions(covariances: np.ndarray, covariance: str) -> np.ndarray:
    precisions = np.linalg.inv(covariances)
    diagonal = np.diagonal(precisions, axis1=1, axis2=2)
    return {"full": precisions, "tied": precisions[0], "diag": diagonal, "spherical": diagonal.mean(1)}[
        covariance
    ]


# k = 10: more components than the data have clusters, some of them small
@pytest.mark.parametrize("k", [4, 10])
@pytest.mark.parametrize("lanes", [{}, {"block_rows": 700, "threads": 3}], ids=["one-block", "threaded"])
@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_em_matches_scikit_learn_from_the_same_start(covariance: str, lanes: dict, k: int) -> None:
    x_np, _, _ = make_synthetic(3000, 3, 4, 2.5, np.random.default_rng(7))
    x = torch.from_numpy(x_np)
    model = GaussianMixture.from_config(GMMOptions(k=k, covariance=covariance), x)
    init = initialize(model, x, InitConfig(method="kmeans++"), seed=5)
    threads_before = torch.get_num_threads()
    result, _ = _fit(model, x, init, max_iter=25, tol=0.0, reg_covar=1e-4, **lanes)
    assert torch.get_num_threads() == threads_before  # the lanes' single-threaded kernels are undone
    reference = SkGaussianMixture(
        k,
        covariance_type=covariance,
        tol=0.0,
        max_iter=25,
        reg_covar=1e-4,
        weights_init=init["weights"].numpy(),
        means_init=init["means"].numpy(),
        precisions_init=_native_precisions(init["covariances"].numpy(), covariance),
    )
    with pytest.warns(ConvergenceWarning):
        reference.fit(x_np)
    assert result.n_steps == reference.n_iter_ == 25
    ours = float(model.log_likelihood(x, result.params).mean())
    np.testing.assert_allclose(ours, reference.score(x_np), rtol=1e-8)
    np.testing.assert_allclose(result.params["means"].numpy(), reference.means_, atol=1e-6)
    np.testing.assert_allclose(result.params["weights"].numpy(), reference.weights_, atol=1e-8)
    np.testing.assert_allclose(
        model._type.native(result.params["covariances"]).numpy(), reference.covariances_, atol=1e-8
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(40, 300),
    dim=st.integers(1, 3),
    k=st.integers(1, 4),
    covariance=st.sampled_from(["full", "tied", "diag", "spherical"]),
    prior=st.sampled_from(["none", "conjugate"]),
)
# a component on 3 points in 3-D: its covariance is singular, and its log density was rounding noise
@example(seed=3, n=40, dim=3, k=3, covariance="full", prior="none")
def test_em_objective_never_decreases(seed, n, dim, k, covariance, prior) -> None:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 10.0, size=dim)
    x = torch.from_numpy(rng.standard_normal((n, dim)) * scale + rng.integers(0, 3, (n, 1)) * scale)
    model = GaussianMixture.from_config(GMMOptions(k=k, covariance=covariance, prior=prior), x)
    init = initialize(model, x, InitConfig(method="kmeans++", reg_covar=1e-3), seed=seed)
    steps: list = []
    # a re-seeded component may lower the objective: the steps whose parameters had one
    reseeded: list[int] = []
    reseed = model.reseed

    def watched_reseed(params, components, x):
        reseeded.extend([len(steps)] * len(components))
        return reseed(params, components, x)

    model.reseed = watched_reseed
    try:
        result = EM().fit(model, x, init, EMOptions(max_iter=40, tol=0.0, reg_covar=0.0), steps.append)
        assert result.extras == {"reseeds": len(reseeded), "reseed_steps": reseeded}
    except FitError:
        # without a prior or reg_covar a component can collapse onto a few points and its
        # covariance turn singular: EM stops with a FitError; the steps before must still climb
        assert prior == "none"
    objective = np.array([s.objective for s in steps])
    assert np.isfinite(objective).all()
    drops = np.diff(objective)
    climbs = np.array([step not in reseeded for step in range(1, len(steps))], dtype=bool)
    assert (drops[climbs] >= -1e-10 * np.abs(objective).max()).all(), drops.min()
    if prior == "none":
        np.testing.assert_array_equal(objective, [s.log_likelihood for s in steps])


def test_em_recovers_well_separated_truth(blobs) -> None:
    x, labels, truth = blobs
    model = GaussianMixture.from_config(GMMOptions(k=4, covariance="full"), x)
    init = initialize(model, x, InitConfig(method="kmeans++"), seed=0)
    result, _ = _fit(model, x, init)
    assert result.converged
    predicted = torch.argmax(model.log_joint(x, result.params), dim=1).numpy()
    assert adjusted_rand_score(labels, predicted) > 0.95
    perm = match_components(torch.from_numpy(truth["means"]), result.params["means"])
    counts = np.bincount(labels, minlength=4)
    standard_error = np.sqrt(np.diagonal(truth["covariances"], axis1=1, axis2=2) / counts[:, None])
    assert (np.abs(result.params["means"][perm].numpy() - truth["means"]) < 4 * standard_error).all()
    np.testing.assert_allclose(result.params["weights"][perm].numpy(), truth["weights"], atol=0.04)
    np.testing.assert_allclose(result.params["covariances"][perm].numpy(), truth["covariances"], atol=0.25)


def test_em_stops_when_the_change_is_below_tol(blobs) -> None:
    x = blobs[0]
    model = GaussianMixture.from_config(GMMOptions(k=4), x)
    init = initialize(model, x, InitConfig(), seed=1)
    result, steps = _fit(model, x, init, tol=1e-4)
    assert result.converged and result.n_steps == steps[-1].step
    assert abs(steps[-1].objective - steps[-2].objective) < 1e-4
    assert all(abs(b.objective - a.objective) >= 1e-4 for a, b in zip(steps[:-2], steps[1:-1], strict=True))
    short, _ = _fit(model, x, init, max_iter=1, tol=0.0)
    assert not short.converged and short.n_steps == 1


def test_map_em_is_pulled_towards_the_prior(blobs) -> None:
    """With a strong prior on the means, MAP-EM's means move from the ML ones towards m0."""
    x = blobs[0][:200]
    ml = GaussianMixture.from_config(GMMOptions(k=4), x)
    strong = GaussianMixture.from_config(
        GMMOptions(k=4, prior="conjugate", hyperparameters={"mean_precision": 1e4}), x
    )
    init = initialize(ml, x, InitConfig(), seed=2)
    ml_fit, _ = _fit(ml, x, init, max_iter=50)
    map_fit, steps = _fit(strong, x, init, max_iter=50)
    assert map_fit.point_estimate == "map" and ml_fit.point_estimate == "mle"
    m0 = strong.prior.mean_prior
    assert (map_fit.params["means"] - m0).norm(dim=1).max() < 0.5 * (ml_fit.params["means"] - m0).norm(
        dim=1
    ).min()
    assert steps[-1].objective != steps[-1].log_likelihood


# ---- empty components ------------------------------------------------------------------------


def _three_blobs() -> torch.Tensor:
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [8.0, 8.0], [0.0, 8.0]])
    return torch.from_numpy(np.concatenate([rng.normal(c, 1.0, (100, 2)) for c in centers]))


def _start_with_a_stray(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Two components between the blobs and one so far away that it gets no points at all."""
    means = torch.tensor([[4.0, 0.0], [4.0, 8.0], [500.0, 500.0]], dtype=dtype)
    return {
        "weights": torch.full((3,), 1 / 3, dtype=dtype),
        "means": means,
        "covariances": torch.eye(2, dtype=dtype).expand(3, 2, 2).clone(),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_em_reseeds_a_component_that_lost_all_its_points(covariance: str, dtype: torch.dtype) -> None:
    x = _three_blobs()
    model = GaussianMixture.from_config(GMMOptions(k=3, covariance=covariance), x)
    result, steps = _fit(model, x.to(dtype), _start_with_a_stray(dtype), max_iter=200)
    assert result.extras == {"reseeds": 1, "reseed_steps": [1]}
    assert result.converged and all(torch.isfinite(value).all() for value in result.params.values())
    if covariance != "tied":  # (its shared covariance leaves it in a local optimum from this start)
        # the re-seeded fit finds the three blobs, as EM from a good start does
        good = initialize(model, x, InitConfig(method="kmeans++"), seed=0)
        reference, _ = _fit(model, x, good, max_iter=200)
        ours = float(model.log_likelihood(x, {k: v.double() for k, v in result.params.items()}).mean())
        assert ours == pytest.approx(float(model.log_likelihood(x, reference.params).mean()), abs=1e-4)
    objective = np.array([s.objective for s in steps])
    assert (np.diff(objective)[1:] >= -1e-6 * np.abs(objective).max()).all()  # climbs after the re-seed


def test_map_em_lets_a_surplus_component_empty() -> None:
    """With a prior the M-step's mode exists without points (the prior's own): no re-seed, and the
    log posterior keeps climbing, as it must for model selection over K."""
    x = _three_blobs()
    model = GaussianMixture.from_config(GMMOptions(k=3, prior="conjugate"), x)
    result, steps = _fit(model, x, _start_with_a_stray(torch.float64), max_iter=100)
    assert result.extras == {"reseeds": 0, "reseed_steps": []}
    assert float(result.params["weights"].min()) < 1e-6  # the stray one never got any points
    assert all(torch.isfinite(value).all() for value in result.params.values())
    objective = np.array([s.objective for s in steps])
    assert (np.diff(objective) >= -1e-10 * np.abs(objective).max()).all()


@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_reseed_rule(covariance: str) -> None:
    """At the point the live components explain worst, with their pooled covariance and half the
    largest weight; the covariance type is kept."""
    x = _three_blobs()
    model = GaussianMixture.from_config(GMMOptions(k=3, covariance=covariance), x)
    params = dict(model.m_step(x[:200], torch.eye(3, dtype=x.dtype)[torch.arange(200) // 100], 1e-6))
    params["weights"] = torch.tensor([0.7, 0.3, 0.0], dtype=x.dtype)
    new = model.reseed(params, [2], x)
    live = {name: value[:2] for name, value in params.items()}
    worst = int(torch.argmin(model.log_likelihood(x, live)))
    assert torch.equal(new["means"][2], x[worst]) and torch.equal(new["means"][:2], params["means"][:2])
    assert 200 <= worst  # a point of the blob no live component covers
    pooled = 0.7 * params["covariances"][0] + 0.3 * params["covariances"][1]
    torch.testing.assert_close(new["covariances"][2], pooled)
    torch.testing.assert_close(new["weights"], torch.tensor([0.35, 0.3, 0.35], dtype=x.dtype))
    projected = model.check_params(new, "reseeded")
    torch.testing.assert_close(projected["covariances"], new["covariances"], rtol=0, atol=1e-12)


def test_em_fails_when_a_component_keeps_losing_its_points() -> None:
    x = _three_blobs()
    model = GaussianMixture.from_config(GMMOptions(k=3), x)

    def astray(params, components, x):
        """A re-seed that cannot help: the component lands far from every point again."""
        return {**params, "means": torch.where(torch.arange(3)[:, None] == 2, 500.0, params["means"])}

    model.reseed = astray
    with pytest.raises(FitError, match=r"component 2 lost all its points again after 3 re-seeds.*model\.k"):
        _fit(model, x, _start_with_a_stray(torch.float64), max_iter=50)
