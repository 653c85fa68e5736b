"""Variational Bayes for the hidden Markov models (MacKay's variational Bayesian HMM): each sweep
equals hmmlearn 0.3's ``VariationalGaussianHMM`` and ``VariationalCategoricalHMM``, the ELBO
never decreases, it equals Pyro's ELBO of the declared model with a guide of the same families
(the states a Markov chain, enumerated), and the backend recovers a simulated truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hmmlearn import vhmm
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex
from safetensors.torch import load_file

import ppl_gmm
from ppl_gmm.backends.vb import (
    CAVISweep,
    HMMPosterior,
    VBOptions,
    hmm_expected_logs,
    hmm_variational_e_step,
    hmm_variational_kl,
    hmm_variational_update,
    run_cavi,
    variational_guide,
)
from ppl_gmm.models.gmm import GMMHyperparameters, _default_prior
from ppl_gmm.models.hmm import BernoulliHMM, GaussianHMM, HiddenMarkovModel, PoissonHMM

LENGTHS = np.array([60, 7, 1, 90, 33, 2])  # unequal, one of length 1
K, D = 3, 2


def _gaussian_data(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Rows around three well-apart means (the states need not be Markov for these checks), and
    the means."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (K, D))
    states = rng.integers(0, K, LENGTHS.sum())
    return torch.from_numpy(means[states] + rng.normal(size=(LENGTHS.sum(), D))), means


def _gaussian_hmm(x: torch.Tensor, covariance: str) -> GaussianHMM:
    prior = _default_prior(GMMHyperparameters(), covariance, K, x)
    return GaussianHMM(K, D, covariance, prior, 1.5, 2.0).bind(LENGTHS)


def _gaussian_init(means: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "start": torch.tensor([0.3, 0.3, 0.4]),
        "transitions": torch.full((K, K), 0.1) + 0.7 * torch.eye(K),
        "means": torch.from_numpy(means + 0.5),
        "covariances": torch.eye(D).expand(K, D, D).clone(),
    }


def _sweeps(model: HiddenMarkovModel, x: torch.Tensor, init: dict, n: int) -> list[tuple[CAVISweep, float]]:
    out: list[tuple[CAVISweep, float]] = []
    run_cavi(
        model,
        x,
        init,
        VBOptions(max_iter=n, tol=0.0, reg_covar=0.0),
        lambda s, sweep, e: out.append((sweep, e)),
    )
    return out


# ---- hmmlearn's variational HMMs, sweep by sweep -----------------------------------------------


def _hmmlearn_gaussian(model: GaussianHMM, q: HMMPosterior) -> vhmm.VariationalGaussianHMM:
    """hmmlearn's VariationalGaussianHMM with the model's priors, at q (no initialization)."""
    covariance, prior, e = model.covariance, model.emission.prior, q.emissions
    reference = vhmm.VariationalGaussianHMM(
        K, covariance_type=covariance, init_params="", params="stmc", n_iter=1, tol=-np.inf
    )
    reference.n_features = D
    reference.startprob_prior_ = np.full(K, model.start_concentration)
    reference.transmat_prior_ = np.full((K, K), model.transition_concentration)
    reference.means_prior_ = np.tile(prior.mean_prior.numpy(), (K, 1))
    reference.beta_prior_ = np.full(K, prior.mean_precision)
    dof = e.degrees_of_freedom.numpy().copy()
    if covariance == "full":
        reference.dof_prior_ = np.full(K, prior.degrees_of_freedom)
        reference.scale_prior_ = np.tile(prior.covariance_prior.numpy(), (K, 1, 1))
        reference.scale_posterior_ = e.covariances.numpy() * dof[:, None, None]  # W_k^-1 = ν_k E[Λ_k]^-1
    else:
        reference.dof_prior_, dof = float(prior.degrees_of_freedom), float(dof)
        reference.scale_prior_ = prior.covariance_prior.numpy().copy()
        reference.scale_posterior_ = e.covariances.numpy() * dof
    reference.dof_posterior_ = dof
    reference.covars_ = e.covariances.numpy().copy()
    reference.means_posterior_ = e.means.numpy().copy()
    reference.beta_posterior_ = e.mean_precision.numpy().copy()
    reference.startprob_posterior_ = q.start.numpy().copy()
    reference.transmat_posterior_ = q.transitions.numpy().copy()
    return reference


def _hmmlearn_bounds(reference, x: np.ndarray, sweeps: int) -> list[float]:
    """hmmlearn's lower bound at each of ``sweeps`` of its iterations (its E-step at the current
    q, the bound, then its update of q), one ``fit`` of one iteration at a time."""
    bounds = []
    for _ in range(sweeps):
        reference.fit(x, LENGTHS)
        bounds.append(reference.monitor_.history[-1])
    return bounds


@pytest.mark.parametrize("covariance", ["full", "tied"])
def test_each_sweep_equals_hmmlearns_variational_gaussian_hmm(covariance: str) -> None:
    """From the same q, every sweep's ELBO and the posterior after ten agree with hmmlearn's (its
    bound leaves out the emissions' -N D/2 log 2π). Its diag and spherical types put a Wishart on
    a diagonal matrix, not the Gamma per variance of this model's declaration."""
    x, means = _gaussian_data()
    model = _gaussian_hmm(x, covariance)
    ours = _sweeps(model, x, _gaussian_init(means), 10)
    reference = _hmmlearn_gaussian(model, ours[0][0].posterior)
    bounds = np.array(_hmmlearn_bounds(reference, x.numpy(), 10)) - len(x) * D / 2 * math.log(2 * math.pi)
    np.testing.assert_allclose([elbo * len(x) for _, elbo in ours[:10]], bounds, atol=1e-9, rtol=0)
    assert bounds[-1] - bounds[0] > 1.0  # the sweeps move
    q = ours[10][0].posterior
    for name, value in {
        "start": q.start,
        "transitions": q.transitions,
        "means": q.emissions.means,
        "mean_precision": q.emissions.mean_precision,
        "degrees_of_freedom": q.emissions.degrees_of_freedom,
    }.items():
        expected = {
            "start": reference.startprob_posterior_,
            "transitions": reference.transmat_posterior_,
            "means": reference.means_posterior_,
            "mean_precision": reference.beta_posterior_,
            "degrees_of_freedom": reference.dof_posterior_,
        }[name]
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-10, err_msg=name)
    np.testing.assert_allclose(q.emissions.covariances.numpy(), reference._covars_, rtol=1e-9)


def test_each_sweep_equals_hmmlearns_variational_categorical_hmm() -> None:
    """One binary feature is a categorical of two symbols: Beta(a0, b0) on p(x = 1) is hmmlearn's
    Dirichlet(b0, a0) over the symbols (0, 1)."""
    rng = np.random.default_rng(3)
    symbols = (rng.random(LENGTHS.sum()) < np.repeat([0.2, 0.8, 0.5], [80, 60, 53])).astype(np.int64)
    x = torch.from_numpy(symbols[:, None].astype(np.float64))
    a0, b0 = 2.0, 3.0
    model = BernoulliHMM(K, 1, (1.0, a0, b0), 1.5, 2.0).bind(LENGTHS)
    init = {
        "start": torch.tensor([0.3, 0.3, 0.4]),
        "transitions": torch.full((K, K), 0.1) + 0.7 * torch.eye(K),
        "probs": torch.tensor([[0.3], [0.6], [0.7]]),
    }
    ours = _sweeps(model, x, init, 10)
    q = ours[0][0].posterior
    reference = vhmm.VariationalCategoricalHMM(K, init_params="", params="ste", n_iter=1, tol=-np.inf)
    reference.n_features = 2
    reference.startprob_prior_ = np.full(K, 1.5)
    reference.transmat_prior_ = np.full((K, K), 2.0)
    reference.emissionprob_prior_ = np.tile([b0, a0], (K, 1))
    reference.startprob_posterior_ = q.start.numpy().copy()
    reference.transmat_posterior_ = q.transitions.numpy().copy()
    reference.emissionprob_posterior_ = np.stack(
        [q.emissions.b[:, 0].numpy(), q.emissions.a[:, 0].numpy()], 1
    )
    bounds = _hmmlearn_bounds(reference, symbols[:, None], 10)
    np.testing.assert_allclose([elbo * len(x) for _, elbo in ours[:10]], bounds, atol=1e-9, rtol=0)
    last = ours[10][0].posterior
    np.testing.assert_allclose(
        last.emissions.a[:, 0].numpy(), reference.emissionprob_posterior_[:, 1], rtol=1e-10
    )
    np.testing.assert_allclose(last.transitions.numpy(), reference.transmat_posterior_, rtol=1e-10)


# ---- the ELBO ------------------------------------------------------------------------------------


def _poisson(seed: int) -> tuple[PoissonHMM, torch.Tensor, dict]:
    rng = np.random.default_rng(seed)
    rates = np.array([[1.0, 4.0], [6.0, 1.0], [3.0, 3.0]])
    x = torch.from_numpy(rng.poisson(rates[rng.integers(0, K, LENGTHS.sum())]).astype(np.float64))
    model = PoissonHMM(K, D, (1.0, 2.0, 0.5), 1.5, 2.0).bind(LENGTHS)
    init = {
        "start": torch.full((K,), 1 / K),
        "transitions": torch.full((K, K), 1 / K),
        "rates": torch.from_numpy(rates + 0.5),
    }
    return model, x, init


@pytest.mark.parametrize("case", ["diag", "spherical", "full", "poisson"])
def test_elbo_never_decreases(case: str) -> None:
    if case == "poisson":
        model, x, init = _poisson(4)
    else:
        x, means = _gaussian_data(seed=5)
        model, init = _gaussian_hmm(x, case), _gaussian_init(means)
    objective = np.array([elbo for _, elbo in _sweeps(model, x, init, 40)])
    assert np.isfinite(objective).all() and objective[-1] - objective[0] > 1e-3
    assert np.diff(objective).min() >= -1e-12 * np.abs(objective).max(), np.diff(objective).min()


# Pyro: sequences of one length (a padded step's masked, enumerated guide site would count K times)
SHORT = np.array([4, 4, 4])


def _markov_guide(model: HiddenMarkovModel, x: torch.Tensor, q: HMMPosterior, chain_of: HMMPosterior):
    """The CAVI families as a Pyro guide: q(θ) = q drawn, and q(z) the Markov chain optimal given
    ``chain_of``, its conditionals from a backward pass written here in NumPy, its states
    enumerated."""
    s, t = len(SHORT), int(SHORT[0])
    log_start, log_moves, log_b = (value.numpy() for value in hmm_expected_logs(model, x, chain_of))
    start, moves, b = np.exp(log_start), np.exp(log_moves), np.exp(log_b).reshape(s, t, -1)
    backward = np.ones_like(b)
    for step in range(t - 2, -1, -1):
        backward[:, step] = (b[:, step + 1] * backward[:, step + 1]) @ moves.T
    first = start * b[:, 0] * backward[:, 0]
    following = moves[None, None] * (b[:, 1:] * backward[:, 1:])[:, :, None, :]  # (S, T-1, from, to)
    first_probs = torch.from_numpy(first / first.sum(-1, keepdims=True))
    following_probs = torch.from_numpy(following / following.sum(-1, keepdims=True))
    global_part = variational_guide(model, q)

    def guide(x: torch.Tensor) -> None:
        global_part(x)
        with pyro.plate("data", s):
            z = pyro.sample("z_0", dist.Categorical(first_probs), infer={"enumerate": "parallel"})
            for step in range(1, t):
                probs = Vindex(following_probs[:, step - 1])[torch.arange(s), z, :]
                z = pyro.sample(f"z_{step}", dist.Categorical(probs), infer={"enumerate": "parallel"})

    return guide


def _short(case: str) -> tuple[HiddenMarkovModel, torch.Tensor, dict]:
    """A two-state model of ``case`` (a covariance type, poisson or bernoulli), its prior, data of
    three sequences of four rows, and a start."""
    rng = np.random.default_rng(7)
    n = int(SHORT.sum())
    flat = {"start": torch.full((2,), 0.5), "transitions": torch.tensor([[0.7, 0.3], [0.4, 0.6]])}
    if case == "poisson":
        x = torch.from_numpy(rng.poisson([[1.0, 4.0], [6.0, 1.0]] * (n // 2)).astype(np.float64))
        model: HiddenMarkovModel = PoissonHMM(2, 2, (1.0, 2.0, 0.5), 1.5, 2.0)
        return model.bind(SHORT), x, flat | {"rates": torch.tensor([[1.5, 3.0], [5.0, 1.5]])}
    if case == "bernoulli":
        x = torch.from_numpy((rng.random((n, 3)) < [0.2, 0.7, 0.5]).astype(np.float64))
        model = BernoulliHMM(2, 3, (1.0, 2.0, 3.0), 1.5, 2.0)
        return model.bind(SHORT), x, flat | {"probs": torch.tensor([[0.3, 0.6, 0.5], [0.6, 0.4, 0.5]])}
    x = torch.from_numpy(rng.normal(size=(n, 2)) + 3.0 * (np.arange(n) % 3 == 0)[:, None])
    model = GaussianHMM(2, 2, case, _default_prior(GMMHyperparameters(), case, 2, x), 1.5, 2.0)
    gaussian = {
        "means": torch.tensor([[0.0, 0.0], [3.0, 3.0]]),
        "covariances": torch.eye(2).expand(2, 2, 2).clone(),
    }
    return model.bind(SHORT), x, flat | gaussian


def _pyro_elbos(model: HiddenMarkovModel, guide, x: torch.Tensor, draws: int) -> np.ndarray:
    estimator = TraceEnum_ELBO(max_plate_nesting=1)
    return np.array([-estimator.loss(model.model, guide, x) for _ in range(draws)])


def _expected_log_joint(model: HiddenMarkovModel, x: torch.Tensor, chain, q: HMMPosterior) -> float:
    """E_q(z)[E_q(θ) log p(x, z | θ)] for the chain whose sums ``chain`` holds."""
    log_start, log_moves, log_b = hmm_expected_logs(model, x, q)
    return float(
        (chain.first * log_start).sum()
        + (chain.transitions * log_moves).sum()
        + (chain.posteriors * log_b).sum()
    )


@pytest.mark.filterwarnings("ignore:Singular sample detected")
@pytest.mark.parametrize("case", ["full", "diag", "spherical", "poisson", "bernoulli"])
def test_elbo_is_pyros_exactly_at_a_cavi_update(case: str) -> None:
    """With q(θ) the exact optimum given the chain q(z), E_q(z)[log p(X, Z, θ)] - log q(θ) does not
    depend on θ: every draw of Pyro's estimate equals the ELBO of (q(z), q(θ)). Here q(z) is the
    chain optimal given an earlier q_old, whose entropy is log Z̃_old - E_q(z)[the expected
    log-joint under q_old]: this checks the update, the KL and the chain's normalizer at once."""
    model, x, init = _short(case)
    old = _sweeps(model, x, init, 2)[-1][0].posterior
    chain = hmm_variational_e_step(model, x, old)
    q = hmm_variational_update(model, x, chain)
    entropy = chain.log_likelihood - _expected_log_joint(model, x, chain, old)
    expected = _expected_log_joint(model, x, chain, q) + entropy - float(hmm_variational_kl(model, q))
    draws = _pyro_elbos(model, _markov_guide(model, x, q, old), x, 2)
    np.testing.assert_allclose(draws, expected, rtol=1e-10)


@pytest.mark.filterwarnings("ignore:Singular sample detected")
@pytest.mark.parametrize("case", ["full", "poisson"])
def test_the_reported_elbo_agrees_with_pyro(case: str) -> None:
    """What each sweep reports, log Z̃ - KL at q(θ) and the chain optimal given it, is the mean of
    Pyro's estimates (which vary: q(θ) is not the optimum given that chain) within 3 standard
    errors."""
    model, x, init = _short(case)
    sweep, elbo = _sweeps(model, x, init, 2)[-1]
    q, reported = sweep.posterior, elbo * len(x)
    draws = _pyro_elbos(model, _markov_guide(model, x, q, q), x, 60)
    standard_error = draws.std(ddof=1) / math.sqrt(len(draws))
    assert 0 < standard_error < 0.1  # varies, yet precise enough to see any constant left out
    assert abs(draws.mean() - reported) < 3 * standard_error, (draws.mean(), reported, standard_error)


# ---- the backend ---------------------------------------------------------------------------------


def test_vb_recovers_the_truth_and_empties_surplus_states(tmp_path: Path) -> None:
    """Four states fitted to sequences of two: VB's posterior leaves two states with (almost) no
    time steps, reported pruned, and the other two recover the simulated transitions and means."""
    config = {
        "experiment": "vb_hmm",
        "data": {
            "source": "synthetic",
            "n": 2000,
            "dim": 2,
            "k": 2,
            "separation": 5.0,
            "sequence_length": 50,
        },
        "model": {"name": "gaussian_hmm", "k": 4, "prior": "conjugate"},
        "backends": {"vb": {"max_iter": 2000}},
    }
    result = ppl_gmm.run(config, runs_dir=tmp_path / "runs", quiet=True)
    summary = result.summaries["vb"]
    assert summary.status == "completed" and summary.converged, summary.error
    assert summary.extras["effective_k"] == 2 and summary.ari == 1.0
    kept = sorted(set(range(4)) - set(summary.extras["pruned"]))
    truth = load_file(str(result.path / "truth.safetensors"))
    fitted = result.params["vb"]
    order = [kept[int(i)] for i in torch.cdist(truth["means"], fitted["means"][kept]).argmin(1)]
    assert sorted(order) == kept
    # the kept states' transitions, renormalized, within ~4 standard errors (~800 steps a state)
    kept_moves = fitted["transitions"][order][:, order]
    kept_moves = kept_moves / kept_moves.sum(1, keepdim=True)
    assert torch.allclose(kept_moves, truth["transitions"], atol=0.06), (kept_moves, truth["transitions"])
    assert torch.allclose(fitted["means"][order], truth["means"], atol=0.15)
    posterior = load_file(str(result.path / "vb" / "posterior.safetensors"))
    assert posterior["transitions.std"].shape == (4, 4) and bool((posterior["transitions.std"] > 0).all())
