"""ppl_gmm.Mixture against scikit-learn's GaussianMixture and scikit-learn's estimator checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats
from sklearn.base import clone
from sklearn.datasets import load_iris
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.utils.estimator_checks import estimator_checks_generator

import ppl_gmm
from ppl_gmm import Mixture

IRIS = load_iris().data
START_MEANS = IRIS[[0, 60, 120]]
START_WEIGHTS = np.array([0.2, 0.3, 0.5])
# initial covariances in scikit-learn's shape for each type
START_COVARIANCES = {
    "full": np.stack([np.cov(IRIS.T) * s for s in (1.0, 2.0, 3.0)]),
    "tied": np.cov(IRIS.T),
    "diag": np.stack([IRIS.var(0) * s for s in (1.0, 2.0, 3.0)]),
    "spherical": np.array([1.0, 2.0, 3.0]),
}


def _sklearn_from_start(covariance_type: str, **kwargs: object) -> GaussianMixture:
    cov = START_COVARIANCES[covariance_type]
    precisions = np.linalg.inv(cov) if covariance_type in ("full", "tied") else 1.0 / cov
    return GaussianMixture(
        3,
        covariance_type=covariance_type,
        weights_init=START_WEIGHTS,
        means_init=START_MEANS,
        precisions_init=precisions,
        **kwargs,  # type: ignore[arg-type]
    )


def _ours_from_start(covariance_type: str, **kwargs: object) -> Mixture:
    start = {
        "weights": START_WEIGHTS,
        "means": START_MEANS,
        "covariances": START_COVARIANCES[covariance_type],
    }
    return Mixture(3, covariance_type=covariance_type, init=start, random_state=0, **kwargs)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_em_equals_sklearn_from_the_same_start(covariance_type: str) -> None:
    """25 EM iterations from the same parameters (tol 0: both run them all): the same estimates,
    scores, responsibilities and criteria, each attribute in scikit-learn's shape."""
    reference = _sklearn_from_start(covariance_type, tol=0.0, max_iter=25)
    with pytest.warns(ConvergenceWarning):
        reference.fit(IRIS)
    ours = _ours_from_start(covariance_type, tol=0.0, max_iter=25)
    with pytest.warns(ConvergenceWarning, match="did not converge in 25 steps"):
        ours.fit(IRIS)
    assert ours.n_iter_ == reference.n_iter_ == 25 and not ours.converged_
    for name in ("weights_", "means_", "covariances_"):
        assert getattr(ours, name).shape == getattr(reference, name).shape
        np.testing.assert_allclose(getattr(ours, name), getattr(reference, name), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.score_samples(IRIS), reference.score_samples(IRIS), rtol=1e-10)
    np.testing.assert_allclose(ours.predict_proba(IRIS), reference.predict_proba(IRIS), rtol=0, atol=1e-10)
    assert ours.score(IRIS) == pytest.approx(reference.score(IRIS), rel=1e-10)
    assert ours.bic(IRIS) == pytest.approx(reference.bic(IRIS), rel=1e-10)
    assert ours.aic(IRIS) == pytest.approx(reference.aic(IRIS), rel=1e-10)
    np.testing.assert_array_equal(ours.predict(IRIS), reference.predict(IRIS))


def test_converged_lower_bound_equals_sklearn() -> None:
    reference = _sklearn_from_start("full", tol=1e-8, max_iter=500).fit(IRIS)
    ours = _ours_from_start("full", tol=1e-8, max_iter=500).fit(IRIS)
    assert ours.converged_ and reference.converged_
    assert ours.lower_bound_ == pytest.approx(reference.lower_bound_, rel=1e-10)
    assert ours.score(IRIS) == pytest.approx(reference.score(IRIS), rel=1e-7)


def test_predictions_are_consistent() -> None:
    est = Mixture(3, covariance_type="diag", random_state=1)
    labels = est.fit_predict(IRIS)
    resp = est.predict_proba(IRIS)
    assert resp.shape == (150, 3)
    np.testing.assert_allclose(resp.sum(1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(labels, resp.argmax(1))
    np.testing.assert_array_equal(labels, est.predict(IRIS))
    assert est.score(IRIS) == pytest.approx(est.score_samples(IRIS).mean())


def test_sample_follows_the_fitted_mixture() -> None:
    est = Mixture(3, random_state=3).fit(IRIS)
    x, y = est.sample(6000)
    assert x.shape == (6000, 4) and y.shape == (6000,) and y.dtype == np.int64
    counts = np.bincount(y, minlength=3)
    # multinomial counts against the fitted weights: a chi-square test at the 1e-3 level
    assert stats.chisquare(counts, 6000 * est.weights_).pvalue > 1e-3
    for k in range(3):  # each component's draws: its mean within 5 standard errors
        draws = x[y == k]
        stderr = np.sqrt(np.diag(est.covariances_[k]) / len(draws))
        assert np.all(np.abs(draws.mean(0) - est.means_[k]) < 5 * stderr)
    again, _ = est.sample(6000)
    np.testing.assert_array_equal(x, again)  # an int random_state: the same draws, as scikit-learn
    with pytest.raises(ValueError, match="n_samples"):
        est.sample(0)


def test_numpy_pandas_and_torch_inputs_give_the_same_fit() -> None:
    names = [f"f{j}" for j in range(4)]
    from_numpy = Mixture(2, random_state=0).fit(IRIS)
    from_frame = Mixture(2, random_state=0).fit(pd.DataFrame(IRIS, columns=names))
    from_tensor = Mixture(2, random_state=0).fit(torch.from_numpy(IRIS))
    for other in (from_frame, from_tensor):
        np.testing.assert_array_equal(other.means_, from_numpy.means_)
    assert from_numpy.n_features_in_ == 4 and not hasattr(from_numpy, "feature_names_in_")
    assert list(from_frame.feature_names_in_) == names
    np.testing.assert_array_equal(from_tensor.predict(torch.from_numpy(IRIS)), from_numpy.predict(IRIS))
    with pytest.raises(ValueError, match="features"):
        from_numpy.predict(IRIS[:, :3])


def test_other_models_have_their_own_tensors(rng: np.random.Generator) -> None:
    counts = np.concatenate([rng.poisson(2.0, size=(100, 3)), rng.poisson(9.0, size=(100, 3))]).astype(float)
    est = Mixture(2, model="poisson_mixture", random_state=0).fit(counts)
    assert est.rates_.shape == (2, 3) and est.weights_.shape == (2,)
    assert not hasattr(est, "covariances_")
    np.testing.assert_allclose(np.sort(est.rates_.mean(1)), [2.0, 9.0], rtol=0.15)
    with pytest.raises(ValueError, match="covariance_type: model 'poisson_mixture' has no covariance"):
        Mixture(2, model="poisson_mixture", covariance_type="diag").fit(counts)


def test_vb_lower_bound_is_its_elbo() -> None:
    est = Mixture(3, backend="vb", prior="conjugate", random_state=0).fit(IRIS)
    # the ELBO bounds the evidence, which is below the maximized likelihood
    assert est.lower_bound_ < Mixture(3, random_state=0).fit(IRIS).score(IRIS)
    assert est.converged_ and np.isfinite(est.lower_bound_)


def test_given_initial_parameters(tmp_path: Path) -> None:
    """A mapping and a safetensors file of the same tensors start the same fit; a bad mapping is
    refused naming the tensor."""
    from_mapping = _ours_from_start("full", max_iter=3, tol=0.0)
    start = {name: torch.as_tensor(value) for name, value in from_mapping.init.items()}
    save_file(start, str(tmp_path / "start.safetensors"))
    from_file = Mixture(3, init=tmp_path / "start.safetensors", random_state=0, max_iter=3, tol=0.0)
    with pytest.warns(ConvergenceWarning):
        from_mapping.fit(IRIS)
    with pytest.warns(ConvergenceWarning):
        from_file.fit(IRIS)
    np.testing.assert_array_equal(from_file.covariances_, from_mapping.covariances_)
    with pytest.raises(ValueError, match=r"^init: means has shape \(2, 4\), but model.k needs \(3, 4\)"):
        Mixture(3, init={**start, "means": IRIS[:2]}).fit(IRIS)
    with pytest.raises(ValueError, match="^init: has no tensor 'weights'"):
        Mixture(3, init={"means": START_MEANS}).fit(IRIS)


def test_options_are_validated_and_cloned() -> None:
    with pytest.raises(ValueError, match="backends.em.max_iters: unknown field.*Did you mean 'max_iter'"):
        Mixture(2, max_iters=5).fit(IRIS)
    with pytest.raises(ValueError, match="backends.em.tol"):
        Mixture(2, tol=-1.0).fit(IRIS)
    est = Mixture(2, max_iter=7, reg_covar=1e-3)
    assert est.get_params()["max_iter"] == 7
    copy = clone(est).set_params(max_iter=3, tol=0.0)
    assert copy.get_params()["max_iter"] == 3 and est.get_params()["max_iter"] == 7
    with pytest.warns(ConvergenceWarning):
        assert copy.fit(IRIS).n_iter_ == 3


def test_random_state() -> None:
    first = Mixture(3, init="random_from_data", random_state=5).fit(IRIS)
    second = Mixture(3, init="random_from_data", random_state=5).fit(IRIS)
    np.testing.assert_array_equal(first.means_, second.means_)
    with pytest.warns(ConvergenceWarning):
        fresh = {
            tuple(Mixture(3, init="random_from_data", max_iter=1, tol=0.0).fit(IRIS).means_[:, 0])
            for _ in range(3)
        }
    assert len(fresh) > 1  # None: a fresh seed each fit


def test_import_is_lazy() -> None:
    import subprocess
    import sys

    code = "import sys, ppl_gmm; print('torch' in sys.modules, 'pyro' in sys.modules, ppl_gmm.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False False") and "Mixture" in out
    assert ppl_gmm.Mixture is Mixture


def _sklearn_checks() -> list[object]:
    """scikit-learn's checks of Mixture (a fast fit: em, at most 20 iterations). Every check that
    applies to a density estimator runs and passes; left out is only check_array_api_input,
    which scikit-learn itself skips unless SCIPY_ARRAY_API is set (our fits are torch's, not the
    array API's)."""
    checks = estimator_checks_generator(Mixture(random_state=0, max_iter=20))
    return [
        pytest.param(check, id=_name(check)) for _, check in checks if _name(check) != "check_array_api_input"
    ]


def _name(check: object) -> str:
    return str(getattr(check, "func", check).__name__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("check", _sklearn_checks())
def test_sklearn_estimator_checks(check: object) -> None:
    check(Mixture(random_state=0, max_iter=20))  # type: ignore[operator]
