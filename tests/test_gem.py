"""Generalized EM (``em`` with a gradient M-step): monotone, the closed-form EM's fixed point where
there is one, and EM for a mixture declared only in Pyro."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from safetensors.torch import save_file
from torch import Tensor
from torch.distributions import constraints

import ppl_gmm
from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.backends.incremental_em import IncrementalEM, IncrementalEMOptions
from ppl_gmm.backends.online_em import OnlineEM, OnlineEMOptions
from ppl_gmm.config import InitConfig, ModelOptions
from ppl_gmm.errors import UserError
from ppl_gmm.init import initialize
from ppl_gmm.models import MODELS, ClosedFormEM, Flat, LatentModel
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic
from ppl_gmm.models.poisson import PoissonMixture, PoissonOptions


def _fit(
    model: LatentModel, x: Tensor, init: dict[str, Tensor], **options: object
) -> tuple[object, list[float]]:
    steps: list = []
    result = EM().fit(model, x, init, EMOptions(**options), steps.append)
    return result, [step.objective for step in steps]


def _gmm(seed: int, prior: str = "none") -> tuple[LatentModel, Tensor]:
    x = torch.from_numpy(make_synthetic(300, 2, 3, 3.0, np.random.default_rng(seed))[0])
    return GaussianMixture.from_config(GMMOptions(k=3, covariance="full", prior=prior), x), x


def _poisson(seed: int, prior: str = "none") -> tuple[LatentModel, Tensor]:
    rng = np.random.default_rng(seed)
    truth = PoissonMixture.for_simulation(PoissonOptions(k=3), 4).sample_truth(rng, 4.0)
    simulator = PoissonMixture.for_simulation(PoissonOptions(k=3), 4)
    x, _ = simulator.simulate(truth, 300, rng)
    return PoissonMixture.from_config(PoissonOptions(k=3, prior=prior), x), x


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("prior", ["none", "conjugate"])
@pytest.mark.parametrize("make", [_gmm, _poisson], ids=["gmm", "poisson"])
def test_gem_never_decreases_the_objective(make, prior: str, optimizer: str) -> None:
    for seed in (0, 1):
        model, x = make(seed, prior)
        init = initialize(model, x, InitConfig(method="random_from_data"), seed=seed)
        _, objective = _fit(
            model, x, init, m_step="gradient", m_step_optimizer=optimizer, max_iter=8, tol=0.0
        )
        assert len(objective) > 2
        # the log-likelihood (+ log prior) per point, up to the float64 rounding of its sum
        assert np.all(np.diff(objective) >= -1e-12), (seed, np.diff(objective))
        assert objective[-1] > objective[0] + 1e-3  # it climbed


@pytest.mark.parametrize("make", [_gmm, _poisson], ids=["gmm", "poisson"])
def test_gem_reaches_the_closed_form_fixed_point(make) -> None:
    model, x = make(3)
    init = initialize(model, x, InitConfig(method="kmeans++"), seed=2)
    exact = {"reg_covar": 0.0} if isinstance(model, GaussianMixture) else {}
    closed, closed_objective = _fit(model, x, init, m_step="closed_form", max_iter=1000, tol=1e-12, **exact)
    gem, gem_objective = _fit(model, x, init, m_step="gradient", max_iter=1000, tol=1e-12)
    assert closed.converged and gem.converged
    assert abs(gem_objective[-1] - closed_objective[-1]) < 1e-6
    # the same fixed point: the log-likelihood of each point, not only their mean
    assert torch.allclose(
        model.log_likelihood(x, gem.params), model.log_likelihood(x, closed.params), atol=1e-4
    )


class LogNormalOptions(ModelOptions):
    name: Literal["test_lognormal_mixture"] = "test_lognormal_mixture"


class LogNormalMixture(LatentModel):
    """Positive data, each feature log-normal given the component: declared only in Pyro (no
    closed-form EM is given, though log x would have one)."""

    name = "test_lognormal_mixture"
    options = LogNormalOptions
    component_axes = {"weights": (0,), "locs": (0,), "scales": (0,)}
    pivot = "locs"
    standardizable = False

    def __init__(self, k: int, dim: int) -> None:
        self.k, self.dim = k, dim

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> LatentModel:
        model = cls(cfg.k, int(x.shape[1]))
        model.example = x[:1].clone() if bool((x[:1] > 0).all()) else None
        return model

    @property
    def has_prior(self) -> bool:
        return False

    @config_enumerate
    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Tensor:
        n = x.shape[0] if x is not None else n
        weights = pyro.sample("weights", Flat(constraints.simplex, (), (self.k,)))
        with pyro.plate("components", self.k):
            locs = pyro.sample("locs", Flat(constraints.real, (self.k,), (self.dim,)))
            scales = pyro.sample("scales", Flat(constraints.positive, (self.k,), (self.dim,)))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Categorical(weights))
            return pyro.sample(
                "x", dist.LogNormal(Vindex(locs)[..., z, :], Vindex(scales)[..., z, :]).to_event(1), obs=x
            )

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weights": (self.k,), "locs": (self.k, self.dim), "scales": (self.k, self.dim)}

    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        return {
            "weights": torch.from_numpy(rng.dirichlet(np.full(self.k, 10.0))),
            "locs": torch.from_numpy(rng.normal(0.0, separation / 2, size=(self.k, self.dim))),
            "scales": torch.from_numpy(rng.uniform(0.3, 0.6, size=(self.k, self.dim))),
        }

    def init_from_points(self, x: Tensor, index: Tensor, spread: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "weights": torch.full((self.k,), 1.0 / self.k, dtype=x.dtype),
            "locs": torch.log(x[index]),
            "scales": torch.ones(self.k, self.dim, dtype=x.dtype),
        }

    @classmethod
    def check_data(cls, x: np.ndarray, where: str) -> None:
        if (x <= 0).any():
            raise UserError(f"{where}: a log-normal mixture needs positive values.")


@pytest.fixture
def lognormal_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test model in the registry for one test only: registered at import, it would join the
    parametrized checks of every registered model (tests/test_models.py)."""
    monkeypatch.setitem(MODELS._items, LogNormalMixture.name, LogNormalMixture)


@pytest.mark.usefixtures("lognormal_registered")
def test_a_mixture_declared_only_in_pyro_is_fitted_by_em_from_a_config(tmp_path: Path) -> None:
    assert not isinstance(LogNormalMixture(2, 2), ClosedFormEM)
    truth = {
        "weights": torch.tensor([0.4, 0.6], dtype=torch.float64),
        "locs": torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64),
        "scales": torch.tensor([[0.5, 0.3], [0.4, 0.6]], dtype=torch.float64),
    }
    x, _ = LogNormalMixture(2, 2).simulate(truth, 2000, np.random.default_rng(4))
    np.save(tmp_path / "x.npy", x.numpy())
    # a start far from the truth: equal weights, the two locations swapped toward each other
    start = {
        "weights": torch.full((2,), 0.5),
        "locs": torch.tensor([[1.5, -0.5], [0.5, 0.5]]),
        "scales": torch.ones(2, 2),
    }
    save_file(
        {name: value.to(torch.float64) for name, value in start.items()}, str(tmp_path / "start.safetensors")
    )
    config = {
        "experiment": "gem",
        "data": {"source": "npy", "path": str(tmp_path / "x.npy"), "test_fraction": 0.0},
        "model": {"name": "test_lognormal_mixture", "k": 2},
        "init": {"method": "given", "path": str(tmp_path / "start.safetensors")},
        "backends": {"em": {"max_iter": 300, "tol": 1e-9}},
    }
    result = ppl_gmm.run(config, runs_dir=tmp_path / "runs", quiet=True)
    summary = result.summaries["em"]
    assert summary.status == "completed", summary.error
    fitted = result.params["em"]
    # ~1000 points a component: standard errors of the locations ≤ 0.6 / √800 ≈ 0.02
    order = torch.cdist(truth["locs"], fitted["locs"]).argmin(1)
    assert sorted(order.tolist()) == [0, 1]
    assert torch.allclose(fitted["locs"][order], truth["locs"], atol=0.1)
    assert torch.allclose(fitted["scales"][order], truth["scales"], atol=0.06)
    assert torch.allclose(fitted["weights"][order], truth["weights"], atol=0.05)


class OneGaussian(LatentModel):
    """A declaration without an assignment: nothing for EM to enumerate."""

    name = "one_gaussian"
    component_axes = {"locs": (0,)}
    pivot = "locs"

    def __init__(self, dim: int) -> None:
        self.k, self.dim = 1, dim

    @classmethod
    def from_config(cls, cfg: ModelOptions, x: Tensor) -> LatentModel:
        return cls(int(x.shape[1]))

    @property
    def has_prior(self) -> bool:
        return False

    def model(self, x: Tensor | None = None, n: int | None = None, batch_size: int | None = None) -> Tensor:
        n = x.shape[0] if x is not None else n
        locs = pyro.sample("locs", Flat(constraints.real_vector, (1,), (self.dim,)))
        with pyro.plate("data", n):
            return pyro.sample("x", dist.Normal(locs[0], 1.0).to_event(1), obs=x)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"locs": (1, self.dim)}

    def sample_truth(self, rng: np.random.Generator, separation: float) -> dict[str, Tensor]:
        return {"locs": torch.zeros(1, self.dim)}


def test_em_refuses_a_model_without_an_enumerated_assignment() -> None:
    with pytest.raises(
        UserError, match=r"backends\.em: .*no discrete latent site enumerated.*config_enumerate"
    ):
        EM().check(OneGaussian(2), EMOptions())


def test_em_with_a_closed_form_m_step_refuses_a_model_without_one() -> None:
    with pytest.raises(UserError, match=r"backends\.em\.m_step: closed_form needs .*Set m_step: gradient"):
        EM().check(LogNormalMixture(2, 1), EMOptions(m_step="closed_form"))


def test_em_with_ecm_refuses_a_model_without_closed_form_blocks() -> None:
    with pytest.raises(UserError, match=r"backends\.em\.m_step: ecm needs .*closed-form blocks"):
        EM().check(LogNormalMixture(2, 1), EMOptions(m_step="ecm"))


class LogNormalECM(LogNormalMixture):
    """The log-normal mixture with the weights and locations in closed form given the scales (the
    locations' maximum does not depend on them): ECM, the scales climbed by gradient."""

    closed_form_sites = ("weights", "locs")

    def conditional_m_step(self, x: Tensor, resp: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
        nk = resp.sum(0)
        return {"weights": nk / nk.sum(), "locs": resp.T @ torch.log(x) / nk[:, None]}


def _lognormal_data(
    n: int, seed: int, locs: list[list[float]] | None = None, scale: float = 1.0
) -> tuple[dict[str, Tensor], Tensor]:
    truth = {
        "weights": torch.tensor([0.4, 0.6], dtype=torch.float64),
        "locs": torch.tensor(locs or [[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64),
        "scales": torch.tensor([[0.5, 0.3], [0.4, 0.6]], dtype=torch.float64) * scale,
    }
    x, _ = LogNormalMixture(2, 2).simulate(truth, n, np.random.default_rng(seed))
    return truth, x


LOGNORMAL_START = {
    "weights": torch.tensor([0.5, 0.5], dtype=torch.float64),
    "locs": torch.tensor([[1.0, 0.0], [1.5, 0.5]], dtype=torch.float64),
    "scales": torch.ones(2, 2, dtype=torch.float64),
}


def _reference_on_logarithms(x: Tensor) -> dict[str, Tensor]:
    """A log-normal mixture of x is a diagonal Gaussian mixture of log x (the Jacobian does not
    depend on θ), so scikit-learn's EM on log x from the same start is an independent reference."""
    from sklearn.mixture import GaussianMixture as SklearnMixture

    start = LOGNORMAL_START
    reference = SklearnMixture(
        2,
        covariance_type="diag",
        reg_covar=0.0,
        tol=1e-13,
        max_iter=5000,
        weights_init=start["weights"].numpy(),
        means_init=start["locs"].numpy(),
        precisions_init=1.0 / start["scales"].numpy() ** 2,
    ).fit(np.log(x.numpy()))
    assert reference.converged_
    return {
        "weights": torch.from_numpy(reference.weights_),
        "locs": torch.from_numpy(reference.means_),
        "scales": torch.from_numpy(np.sqrt(reference.covariances_)),
    }


def test_ecm_reaches_the_maximum_likelihood_of_scikit_learn_on_the_logarithms() -> None:
    _, x = _lognormal_data(600, 5)
    result, objective = _fit(LogNormalECM(2, 2), x, LOGNORMAL_START, max_iter=3000, tol=1e-13)
    assert result.extras["m_step"] == "ecm" and result.converged
    assert np.all(np.diff(objective) >= -1e-12)
    reference = _reference_on_logarithms(x)
    for name, value in reference.items():
        assert torch.allclose(result.params[name], value, atol=1e-6), name


def test_incremental_em_without_a_closed_form_never_lowers_its_bound_and_reaches_the_maximum() -> None:
    _, x = _lognormal_data(600, 5)
    # ECM to convergence; plain GEM (a slower climb per block) for two epochs
    for model, epochs in ((LogNormalECM(2, 2), 300), (LogNormalMixture(2, 2), 2)):
        options = IncrementalEMOptions(blocks=4, max_epochs=epochs, tol=1e-12)
        IncrementalEM().check(model, options)
        steps: list = []
        result = IncrementalEM().fit(model, x, LOGNORMAL_START, options, steps.append)
        # the free energy F(q, θ): each block's E-step and each M-step raise it
        assert np.all(np.diff([step.objective for step in steps]) >= -1e-12)
        assert steps[-1].objective > steps[0].objective + 0.1
        if isinstance(model, LogNormalECM):
            assert result.extras["m_step"] == "ecm" and result.converged
            for name, value in _reference_on_logarithms(x).items():
                assert torch.allclose(result.params[name], value, atol=1e-6), name
        else:
            assert result.extras["m_step"] == "gradient" and result.n_steps == 8


def test_online_em_without_a_closed_form_reaches_the_batch_maximum() -> None:
    _, x = _lognormal_data(6000, 5)
    reference = _reference_on_logarithms(x)
    model = LogNormalMixture(2, 2)
    options = OnlineEMOptions(batch_size=100, epochs=3)
    OnlineEM().check(model, options)
    steps: list = []
    torch.manual_seed(0)
    result = OnlineEM().fit(model, x, LOGNORMAL_START, options, steps.append)
    assert result.extras["m_step"] == "gradient" and result.n_steps == 180
    best = float(model.log_likelihood(x, reference).mean())
    # stochastic gradient EM ends near the batch maximum, not on it
    assert best - 2e-3 < steps[-1].log_likelihood <= best + 1e-12
    order = torch.cdist(reference["locs"], result.params["locs"]).argmin(1)
    assert sorted(order.tolist()) == [0, 1]
    assert torch.allclose(result.params["locs"][order], reference["locs"], atol=0.05)


def test_kmeans_seeding_fits_a_model_without_a_closed_form_m_step() -> None:
    # clusters that k-means, which measures x rather than log x, tells apart
    truth, x = _lognormal_data(2000, 6, locs=[[2.0, 3.0], [3.0, 2.0]], scale=0.25)
    for model in (LogNormalMixture(2, 2), LogNormalECM(2, 2)):
        model.example = x[:1]
        init = initialize(model, x, InitConfig(method="kmeans++"), seed=1)
        order = torch.cdist(truth["locs"], init["locs"]).argmin(1)
        assert sorted(order.tolist()) == [0, 1]
        # the maximum-likelihood fit to the hard assignments of well-separated clusters
        assert torch.allclose(init["locs"][order], truth["locs"], atol=0.03), init["locs"]
        assert torch.allclose(init["scales"][order], truth["scales"], atol=0.03), init["scales"]
        assert torch.allclose(init["weights"][order], truth["weights"], atol=0.05)
