"""Scores of a point estimate, against scikit-learn's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from ppl_gmm import evaluate
from ppl_gmm.data import Dataset
from ppl_gmm.evaluate import match_components, score
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions


@pytest.mark.parametrize("block", [None, 37], ids=["one-block", "blocks-of-37"])
@pytest.mark.parametrize("covariance", ["full", "tied", "diag", "spherical"])
def test_scores_match_scikit_learn(covariance: str, block: int | None, blobs, monkeypatch) -> None:
    if block is not None:
        monkeypatch.setattr(evaluate, "SCORE_ROWS", block)
    x, labels, _ = blobs
    train, test = x[:1000].numpy(), x[1000:].numpy()
    reference = SkGaussianMixture(4, covariance_type=covariance, random_state=0).fit(train)
    model = GaussianMixture.from_config(GMMOptions(k=4, covariance=covariance), x[:1000])
    expand = {
        "full": lambda c: c,
        "tied": lambda c: np.broadcast_to(c, (4, 3, 3)),
        "diag": lambda c: np.stack([np.diag(row) for row in c]),
        "spherical": lambda c: c[:, None, None] * np.eye(3),
    }
    covariances = expand[covariance](reference.covariances_)
    params = {
        "weights": torch.from_numpy(reference.weights_),
        "means": torch.from_numpy(reference.means_),
        "covariances": torch.from_numpy(np.ascontiguousarray(covariances)),
    }
    data = Dataset(
        "test", torch.from_numpy(train), torch.from_numpy(test), labels[:1000], labels[1000:], ("a", "b", "c")
    )
    result = score(model, params, data)
    np.testing.assert_allclose(result["train_log_likelihood"], reference.score(train), rtol=1e-12)
    np.testing.assert_allclose(result["test_log_likelihood"], reference.score(test), rtol=1e-12)
    np.testing.assert_allclose(result["bic"], reference.bic(train), rtol=1e-12)
    np.testing.assert_allclose(result["aic"], reference.aic(train), rtol=1e-12)
    predicted = reference.predict(train)
    assert result["ari"] == pytest.approx(adjusted_rand_score(labels[:1000], predicted))
    assert result["nmi"] == pytest.approx(normalized_mutual_info_score(labels[:1000], predicted))


def test_scores_without_labels_or_test_split(blobs) -> None:
    x = blobs[0]
    model = GaussianMixture.from_config(GMMOptions(k=1), x)
    params = {
        "weights": torch.ones(1, dtype=torch.float64),
        "means": x.mean(0, keepdim=True),
        "covariances": torch.cov(x.T, correction=0)[None],
    }
    result = score(model, params, Dataset("x", x, None, None, None, ("a", "b", "c")))
    assert result["test_log_likelihood"] is None and result["ari"] is None and result["nmi"] is None
    expected = torch.distributions.MultivariateNormal(params["means"][0], params["covariances"][0])
    assert result["train_log_likelihood"] == pytest.approx(float(expected.log_prob(x).mean()), rel=1e-12)


def test_match_components_undoes_a_permutation(rng) -> None:
    means = torch.from_numpy(rng.standard_normal((6, 2)) * 10)
    perm = rng.permutation(6)
    shuffled = means[perm] + 0.01
    found = match_components(means, shuffled)
    torch.testing.assert_close(shuffled[found], means + 0.01)
