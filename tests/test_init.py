"""Initialization: k-means++ seeding and Lloyd's iterations against scikit-learn, and the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from ppl_gmm.config import InitConfig
from ppl_gmm.errors import UserError
from ppl_gmm.init import initialize, kmeans_plusplus, lloyd
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions


def test_lloyd_matches_scikit_learn_from_the_same_centers(blobs) -> None:
    x = blobs[0]
    start = x[[0, 1, 2, 3, 4]].clone()
    centers, labels = lloyd(x, start, max_iter=300)
    reference = KMeans(5, init=start.numpy(), n_init=1, algorithm="lloyd", tol=0.0, max_iter=300)
    reference.fit(x.numpy())
    np.testing.assert_allclose(centers.numpy(), reference.cluster_centers_, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(labels.numpy(), reference.labels_)


def test_kmeans_plusplus_seeds_distinct_points_spread_over_clusters(blobs) -> None:
    x, labels, _ = blobs
    index = kmeans_plusplus(x, 4, torch.Generator().manual_seed(0))
    assert len(set(index.tolist())) == 4
    # well-separated clusters: D² seeding puts one seed in each
    assert sorted(labels[index.numpy()].tolist()) == [0, 1, 2, 3]
    again = kmeans_plusplus(x, 4, torch.Generator().manual_seed(0))
    assert torch.equal(index, again)


def test_kmeans_plusplus_needs_k_distinct_points() -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(UserError, match="model.k"):
        kmeans_plusplus(x, 3, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["kmeans", "kmeans++", "random_from_data"])
@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_initial_parameters_are_valid_and_seeded(method: str, covariance: str, blobs) -> None:
    x = blobs[0]
    model = GaussianMixture.from_config(GMMOptions(k=4, covariance=covariance), x)
    cfg = InitConfig(method=method)
    params = initialize(model, x, cfg, seed=11)
    assert params["weights"].shape == (4,) and params["means"].shape == (4, 3)
    torch.testing.assert_close(params["weights"].sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.linalg.cholesky(params["covariances"])  # positive definite
    torch.testing.assert_close(model.check_params(params, "test")["covariances"], params["covariances"])
    again = initialize(model, x, cfg, seed=11)
    other = initialize(model, x, cfg, seed=11, restart=1)
    assert all(torch.equal(params[name], again[name]) for name in params)
    assert not torch.equal(params["means"], other["means"])


def test_kmeans_init_equals_hard_assignment_statistics(blobs) -> None:
    x = blobs[0]
    model = GaussianMixture.from_config(GMMOptions(k=4), x)
    params = initialize(model, x, InitConfig(method="kmeans", reg_covar=0.0), seed=3)
    labels = torch.argmin(torch.cdist(x, params["means"]), dim=1)
    for k in range(4):
        members = x[labels == k].numpy()
        np.testing.assert_allclose(params["means"][k].numpy(), members.mean(0), atol=1e-10)
        np.testing.assert_allclose(params["covariances"][k].numpy(), np.cov(members.T, bias=True), atol=1e-10)
        assert abs(float(params["weights"][k]) - len(members) / len(x)) < 1e-12


def test_seeding_on_a_row_subset_uses_only_those_rows(blobs) -> None:
    """With more rows than init.max_rows, k-means sees a seeded random subset: its statistics are
    those of that subset's hard assignments, not of all rows."""
    x = blobs[0]
    model = GaussianMixture.from_config(GMMOptions(k=4), x)
    cfg = InitConfig(method="kmeans", reg_covar=0.0, max_rows=300)
    params = initialize(model, x, cfg, seed=3)
    assert torch.equal(params["means"], initialize(model, x, cfg, seed=3)["means"])
    labels = torch.argmin(torch.cdist(x, params["means"]), dim=1)
    counts = torch.bincount(labels, minlength=4)
    assert counts.sum() == len(x) > 300
    weights = params["weights"] * 300  # counts within the subset: whole numbers summing to 300
    torch.testing.assert_close(weights, weights.round(), rtol=0, atol=1e-9)
    assert not torch.equal(weights.round(), counts.to(weights))
