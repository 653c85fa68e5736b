"""EM for the Poisson and Bernoulli mixtures against a NumPy EM written here from the textbook
updates, on scikit-learn's handwritten digits (counts, and binarized), from the same start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import gammaln, logsumexp

from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.backends.incremental_em import IncrementalEM, IncrementalEMOptions
from ppl_gmm.config import DataConfig, InitConfig
from ppl_gmm.data import load_data
from ppl_gmm.init import initialize
from ppl_gmm.models import MODELS

ITERATIONS = 40
FLOOR = 1e-10  # the models' floor on maximum-likelihood rates and probabilities


def _numpy_log_joint(name: str, x: np.ndarray, weights: np.ndarray, theta: np.ndarray) -> np.ndarray:
    if name == "poisson_mixture":
        per_feature = x[:, None, :] * np.log(theta)[None] - theta[None] - gammaln(x + 1.0)[:, None, :]
    else:
        per_feature = x[:, None, :] * np.log(theta)[None] + (1 - x[:, None, :]) * np.log1p(-theta)[None]
    return np.log(weights)[None] + per_feature.sum(-1)


def _numpy_em(name: str, x: np.ndarray, weights: np.ndarray, theta: np.ndarray, prior: tuple | None):
    """ITERATIONS steps of EM (MAP-EM with a prior (α0, a0, b0)); returns θ and the per-point
    log-likelihood (+ log prior / N is left out: the same for both sides) after each M-step."""
    for _ in range(ITERATIONS):
        log_joint = _numpy_log_joint(name, x, weights, theta)
        resp = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
        nk = resp.sum(0) + 10 * np.finfo(float).eps
        sums = resp.T @ x
        if prior is None:
            weights = nk / nk.sum()
            theta = np.clip(sums / nk[:, None], FLOOR, None if name == "poisson_mixture" else 1 - FLOOR)
        else:
            alpha0, a0, b0 = prior
            weights = (nk + alpha0 - 1) / (nk + alpha0 - 1).sum()
            if name == "poisson_mixture":
                theta = (sums + a0 - 1) / (nk[:, None] + b0)
            else:
                theta = (sums + a0 - 1) / (nk[:, None] + a0 + b0 - 2)
    log_likelihood = logsumexp(_numpy_log_joint(name, x, weights, theta), axis=1).mean()
    return weights, theta, log_likelihood


@pytest.mark.parametrize("prior", ["none", "conjugate"])
@pytest.mark.parametrize(
    ("name", "source"), [("poisson_mixture", "digits"), ("bernoulli_mixture", "digits_binary")]
)
def test_em_agrees_with_a_numpy_em(name: str, source: str, prior: str) -> None:
    cls = MODELS.get(name)
    data = load_data(DataConfig(source=source, test_fraction=0.0), 0, check=cls.check_data)
    x = data.train
    model = cls.from_config(cls.options(k=6, prior=prior), x)
    init = initialize(model, x, InitConfig(), seed=1)
    reports: list = []
    fit = EM().fit(model, x, init, EMOptions(max_iter=ITERATIONS, tol=0.0), reports.append)
    assert fit.n_steps == ITERATIONS
    pivot = model.pivot
    weights, theta, log_likelihood = _numpy_em(
        name, x.numpy(), init["weights"].numpy(), init[pivot].numpy(), getattr(model, "prior", None)
    )
    ours = float(model.log_likelihood(x, fit.params).mean())
    assert abs(ours - log_likelihood) < 1e-8 * max(1.0, abs(log_likelihood))
    # what EM reports at its last step (the base measure added once per fit) is the same number
    assert abs(reports[-1].log_likelihood - log_likelihood) < 1e-8 * max(1.0, abs(log_likelihood))
    np.testing.assert_allclose(fit.params["weights"].numpy(), weights, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit.params[pivot].numpy(), theta, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["poisson_mixture", "bernoulli_mixture"])
def test_incremental_em_reaches_batch_em(name: str) -> None:
    """The generic statistics arithmetic of incremental EM reaches batch EM's fixed point."""
    cls = MODELS.get(name)
    source = "digits" if name == "poisson_mixture" else "digits_binary"
    x = load_data(DataConfig(source=source, test_fraction=0.0), 0).train
    model = cls.from_config(cls.options(k=4), x)
    init = initialize(model, x, InitConfig(), seed=2)
    batch = EM().fit(model, x, init, EMOptions(max_iter=2000, tol=1e-12), lambda info: None)
    objectives: list[float] = []
    incremental = IncrementalEM().fit(
        model,
        x,
        init,
        IncrementalEMOptions(blocks=5, max_epochs=400, tol=1e-12),
        lambda i: objectives.append(i.objective),
    )
    assert all(b >= a - 1e-9 for a, b in zip(objectives, objectives[1:], strict=False))  # the bound rises
    # right after the first full E-step the bound touches the log-likelihood
    assert abs(objectives[0] - float(model.log_likelihood(x, init).mean())) < 1e-10
    for param, value in batch.params.items():
        torch.testing.assert_close(incremental.params[param], value, rtol=1e-4, atol=1e-5)


def test_bernoulli_em_in_float32_from_a_float64_start_stays_finite() -> None:
    """Probabilities floored at 1e-10 in float64 round to 0 or 1 in float32; EM must not take
    their logits there (seen: every float32 fit of binarized digits from k-means++ failed)."""
    cls = MODELS.get("bernoulli_mixture")
    x = load_data(DataConfig(source="digits_binary", test_fraction=0.0), 0).train
    model = cls.from_config(cls.options(k=10), x)
    init = initialize(model, x, InitConfig(), seed=0)
    assert float(init["probs"].max()) > 1.0 - 1e-7  # some start at the float64 floor
    narrow = {name: value.float() for name, value in init.items()}
    fit = EM().fit(model, x.float(), narrow, EMOptions(max_iter=20, tol=0.0), lambda info: None)
    ours = float(model.log_likelihood(x, {name: v.double() for name, v in fit.params.items()}).mean())
    wide = EM().fit(model, x, init, EMOptions(max_iter=20, tol=0.0), lambda info: None)
    # the same fit up to the floors (float32: its epsilon, float64: 1e-10) and rounding
    assert abs(ours - float(model.log_likelihood(x, wide.params).mean())) < 1e-2
