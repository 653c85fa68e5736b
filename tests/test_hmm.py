"""The Gaussian hidden Markov model: its forward–backward recursions and Baum–Welch EM against
hmmlearn 0.3, and its log density against Pyro's enumeration of its own declaration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hmmlearn import hmm
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from safetensors.torch import load_file
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning

import ppl_gmm
from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.config import parse_config
from ppl_gmm.errors import UserError
from ppl_gmm.evaluate import permute, relabel
from ppl_gmm.experiment import prepare
from ppl_gmm.models._hmm import padding
from ppl_gmm.models.gmm import GMMHyperparameters, _default_prior
from ppl_gmm.models.hmm import BernoulliHMM, GaussianHMM, PoissonHMM

LENGTHS = np.array([60, 7, 1, 90, 33, 2])  # unequal, one of length 1
COVARIANCE_TYPES = ["full", "diag", "spherical", "tied"]


def _reference(covariance: str, k: int = 3, dim: int = 2, seed: int = 0) -> hmm.GaussianHMM:
    """hmmlearn's GaussianHMM at a random θ of the covariance type, its priors and covariance
    floor switched off, fitting every parameter from the current one (no initialization)."""
    rng = np.random.default_rng(seed)
    reference = hmm.GaussianHMM(
        k,
        covariance_type=covariance,
        min_covar=0.0,
        covars_prior=0.0,
        covars_weight=0.0,
        means_weight=0.0,
        startprob_prior=1.0,
        transmat_prior=1.0,
        init_params="",
        params="stmc",
        n_iter=1,
        tol=-np.inf,
        implementation="log",
    )
    reference.n_features = dim
    reference.startprob_ = rng.dirichlet(np.ones(k) * 3)
    reference.transmat_ = 0.6 * np.eye(k) + 0.4 * rng.dirichlet(np.ones(k), size=k)
    reference.means_ = rng.normal(0, 3, (k, dim))
    a = rng.normal(size=(k, dim, dim))
    full = a @ a.transpose(0, 2, 1) + np.eye(dim)
    reference.covars_ = {
        "full": full,
        "diag": np.diagonal(full, axis1=1, axis2=2).copy(),
        "spherical": np.diagonal(full, axis1=1, axis2=2).mean(1),
        "tied": full[0],
    }[covariance]
    return reference


def _params(reference: hmm.GaussianHMM) -> dict[str, torch.Tensor]:
    """hmmlearn's θ as the model's tensors (full covariance matrices whatever the type)."""
    return {
        "start": torch.from_numpy(reference.startprob_.copy()),
        "transitions": torch.from_numpy(reference.transmat_.copy()),
        "means": torch.from_numpy(reference.means_.copy()),
        "covariances": torch.from_numpy(_full_covariances(reference)),
    }


def _full_covariances(reference: hmm.GaussianHMM) -> np.ndarray:
    """hmmlearn's covariances as (K, D, D) matrices. Its ``covars_`` gives them, except for the
    spherical type after a fit, whose M-step stores each variance D times, (K, D)."""
    if reference.covariance_type == "spherical":
        variances = np.asarray(reference._covars_).reshape(reference.n_components, -1)[:, 0]
        return variances[:, None, None] * np.eye(reference.n_features)
    return reference.covars_.copy()


def _data(reference: hmm.GaussianHMM, seed: int = 1) -> torch.Tensor:
    x, _ = reference.sample(int(LENGTHS.sum()), random_state=seed)
    return torch.from_numpy(x)


def test_forward_backward_agrees_with_hmmlearn() -> None:
    reference = _reference("full")
    x = _data(reference)
    model = GaussianHMM(3, 2, "full", None).bind(LENGTHS)
    params = _params(reference)
    estep = model.e_step(x, params)
    assert estep.log_likelihood == pytest.approx(reference.score(x.numpy(), LENGTHS), abs=1e-9)
    assert float(model.log_likelihood(x, params).sum()) == pytest.approx(estep.log_likelihood, abs=1e-9)
    np.testing.assert_allclose(
        estep.posteriors.numpy(), reference.predict_proba(x.numpy(), LENGTHS), atol=1e-10
    )
    np.testing.assert_array_equal(
        model.most_probable_states(x, params).numpy(), reference.predict(x.numpy(), LENGTHS)
    )
    # the expected counts, from hmmlearn's own accumulation per sequence
    stats = reference._initialize_sufficient_statistics()
    for start, stop in zip(np.cumsum(LENGTHS) - LENGTHS, np.cumsum(LENGTHS), strict=True):
        rows = x.numpy()[start:stop]
        lattice, _, posteriors, forward, backward = reference._fit_log(rows)
        reference._accumulate_sufficient_statistics(stats, rows, lattice, posteriors, forward, backward)
    np.testing.assert_allclose(estep.transitions.numpy(), stats["trans"], atol=1e-9)
    np.testing.assert_allclose(estep.first.numpy(), stats["start"], atol=1e-12)
    # each row's one-step predictive density: for a sequence's first row, the mixture at start
    first = np.cumsum(LENGTHS) - LENGTHS
    mixture = sum(
        reference.startprob_[k]
        * multivariate_normal(reference.means_[k], reference.covars_[k]).pdf(x.numpy()[first])
        for k in range(3)
    )
    np.testing.assert_allclose(model.log_likelihood(x, params).numpy()[first], np.log(mixture), atol=1e-10)


@pytest.mark.parametrize("covariance", COVARIANCE_TYPES)
@pytest.mark.parametrize("prior", ["none", "conjugate"])
def test_log_density_equals_pyro_enumeration_of_the_declaration(covariance: str, prior: str) -> None:
    reference = _reference(covariance, seed=2)
    x = _data(reference, seed=3)
    gaussian_prior = None
    if prior == "conjugate":
        gaussian_prior = _default_prior(GMMHyperparameters(), covariance, 3, x)
    model = GaussianHMM(3, 2, covariance, gaussian_prior, 1.5, 2.0).bind(LENGTHS)
    params = _params(reference)
    conditioned = poutine.condition(model.model, data=model.to_sites(params))
    # every global site observed: -loss = log p(x | θ) + log p(θ), the states summed out by Pyro
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, lambda x: None, x)
    expected = model.e_step(x, params, posteriors=False).log_likelihood + float(model.log_prior(params))
    assert -float(loss) == pytest.approx(expected, abs=1e-8)
    if prior == "conjugate":
        assert abs(float(model.log_prior(params))) > 1.0  # the prior's terms are in both


@pytest.mark.parametrize("covariance", COVARIANCE_TYPES)
def test_baum_welch_agrees_with_hmmlearn_step_by_step(covariance: str) -> None:
    reference = _reference(covariance, seed=4)
    x = _data(reference, seed=5)
    model = GaussianHMM(3, 2, covariance, None).bind(LENGTHS)
    start = _params(reference)
    steps: list = []
    result = EM().fit(model, x, start, EMOptions(max_iter=25, tol=0.0, reg_covar=0.0), steps.append)
    ours = np.array([step.log_likelihood for step in steps])
    expected = []
    for iteration in range(26):
        expected.append(reference.score(x.numpy(), LENGTHS) / len(x))
        if iteration < 25:
            reference.fit(x.numpy(), LENGTHS)  # one EM iteration from the current θ
    # hmmlearn adds 1e-7 to covariance diagonals when it evaluates densities: agreement to ~1e-7
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
    assert np.all(np.diff(ours) >= -1e-12)  # never decreases
    for name, value in _params(reference).items():  # θ after 25 iterations
        np.testing.assert_allclose(result.params[name].numpy(), value.numpy(), atol=1e-5, err_msg=name)


def _config(backends: dict, **data: object) -> dict:
    return {
        "experiment": "hmm",
        "data": {"source": "synthetic", "n": 400, "dim": 2, "k": 2, "separation": 5.0}
        | {"sequence_length": 20, "test_fraction": 0.25}
        | data,
        "model": {"name": "gaussian_hmm", "k": 2, "prior": "conjugate"},
        "backends": backends,
    }


def test_a_synthetic_config_runs_through_em_map_svi_and_mcmc(tmp_path: Path) -> None:
    backends = {
        "em": {"max_iter": 200, "tol": 1e-10, "save_assignments": True},
        "map": {"steps": 5},
        "svi": {"steps": 5, "mean_samples": 5, "elbo_particles": 2},
        "mcmc": {"num_samples": 4, "warmup_steps": 4},
    }
    result = ppl_gmm.run(_config(backends), runs_dir=tmp_path / "runs", quiet=True)
    for backend, summary in result.summaries.items():
        assert summary.status == "completed", (backend, summary.error)
        assert summary.n_params == (2 - 1) + 2 * (2 - 1) + 2 * 2 + 2 * 3
        assert summary.test_log_likelihood is not None
    data = json.loads((result.path / "data.json").read_text())
    assert (data["n_sequences_train"], data["n_sequences_test"]) == (15, 5)
    em = result.summaries["em"]
    assert em.converged and em.ari == 1.0  # the Viterbi paths are the simulated states
    # em from the truth's neighbourhood: its estimate recovers the simulated transitions
    truth = load_file(str(result.path / "truth.safetensors"))
    fitted = result.params["em"]
    order = torch.cdist(truth["means"], fitted["means"]).argmin(1)
    assert sorted(order.tolist()) == [0, 1]
    # ~4 standard errors at ~150 rows a state (variances ≤ 1.5; a transition row's counts ~150)
    assert torch.allclose(fitted["transitions"][order][:, order], truth["transitions"], atol=0.15)
    assert torch.allclose(fitted["means"][order], truth["means"], atol=0.4)
    # the saved assignments: the Viterbi path and smoothed probabilities that sum to one
    frame = pd.read_csv(result.path / "em" / "assignments.csv")
    assert len(frame) == 300 and np.allclose(frame[["p0", "p1"]].sum(axis=1), 1.0)
    assert (frame["hard"] == frame["label"].map(dict(enumerate(order.argsort().tolist())))).all()


@pytest.mark.parametrize(
    ("backends", "data", "message"),
    [
        ({"online_em": {}}, {}, r"backends\.online_em: model 'gaussian_hmm' is a hidden Markov model"),
        ({"incremental_em": {}}, {}, r"backends\.incremental_em: .*hidden Markov model"),
        ({"map": {"batch_size": 10}}, {}, r"backends\.map: .*batch_size"),
        ({"svi": {"local": "mean_field"}}, {}, r"backends\.svi: .*mean_field"),
        (
            {"em": {}},
            {"sequence_length": 7, "n": 400},
            r"data: 1 of the \d+ train sequences have fewer than 2 rows",
        ),
    ],
)
def test_what_cannot_serve_sequences_is_refused_up_front(backends: dict, data: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        prepare(parse_config(_config(backends, **data)))


def test_rows_without_sequences_are_one_sequence_that_a_test_split_would_cut() -> None:
    config = _config({"em": {}}) | {"data": {"source": "old_faithful", "test_fraction": 0.2}}
    with pytest.raises(UserError, match=r"data\.test_fraction: .*one sequence.*would cut"):
        prepare(parse_config(config))
    # with test_fraction 0 the 272 eruptions, in recording order, are one sequence
    plan = prepare(parse_config(config | {"data": {"source": "old_faithful", "test_fraction": 0.0}}))
    reference = _reference("full", k=2, dim=2)
    params = _params(reference)
    x = plan.data.train
    assert float(plan.model.log_likelihood(x, params).sum()) == pytest.approx(
        reference.score(x.numpy()), abs=1e-8
    )


def test_a_mixture_refuses_a_sequence_length() -> None:
    config = _config({"em": {}}) | {"model": {"name": "gmm", "k": 2}}
    with pytest.raises(UserError, match=r"data\.sequence_length: model 'gmm' draws independent points"):
        prepare(parse_config(config))


def _poisson_reference(k: int = 3, dim: int = 4, seed: int = 6) -> hmm.PoissonHMM:
    """hmmlearn's PoissonHMM at a random θ, its priors off, fitting from the current θ."""
    rng = np.random.default_rng(seed)
    reference = hmm.PoissonHMM(
        k,
        lambdas_prior=0.0,
        lambdas_weight=0.0,
        startprob_prior=1.0,
        transmat_prior=1.0,
        init_params="",
        params="stl",
        n_iter=1,
        tol=-np.inf,
        implementation="log",
    )
    reference.n_features = dim
    reference.startprob_ = rng.dirichlet(np.ones(k) * 3)
    reference.transmat_ = 0.6 * np.eye(k) + 0.4 * rng.dirichlet(np.ones(k), size=k)
    reference.lambdas_ = rng.gamma(2.0, 3.0, size=(k, dim))
    return reference


def _poisson_params(reference: hmm.PoissonHMM) -> dict[str, torch.Tensor]:
    return {
        "start": torch.from_numpy(reference.startprob_.copy()),
        "transitions": torch.from_numpy(reference.transmat_.copy()),
        "rates": torch.from_numpy(reference.lambdas_.copy()),
    }


def test_poisson_baum_welch_agrees_with_hmmlearn_step_by_step() -> None:
    reference = _poisson_reference()
    x = torch.from_numpy(reference.sample(int(LENGTHS.sum()), random_state=7)[0].astype(np.float64))
    model = PoissonHMM(3, 4, None).bind(LENGTHS)
    start = _poisson_params(reference)
    steps: list = []
    result = EM().fit(model, x, start, EMOptions(max_iter=25, tol=0.0), steps.append)
    expected = []
    for iteration in range(26):
        expected.append(reference.score(x.numpy(), LENGTHS) / len(x))
        if iteration < 25:
            reference.fit(x.numpy(), LENGTHS)
    np.testing.assert_allclose([step.log_likelihood for step in steps], expected, atol=1e-9, rtol=0)
    for name, value in _poisson_params(reference).items():
        np.testing.assert_allclose(result.params[name].numpy(), value.numpy(), atol=1e-7, err_msg=name)


@pytest.mark.parametrize("prior", ["none", "conjugate"])
def test_poisson_log_density_equals_pyro_enumeration_of_the_declaration(prior: str) -> None:
    reference = _poisson_reference(seed=8)
    x = torch.from_numpy(reference.sample(int(LENGTHS.sum()), random_state=9)[0].astype(np.float64))
    model = PoissonHMM(3, 4, None if prior == "none" else (1.0, 2.0, 0.5), 1.5, 2.0).bind(LENGTHS)
    params = _poisson_params(reference)
    conditioned = poutine.condition(model.model, data=model.to_sites(params))
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, lambda x: None, x)
    expected = model.e_step(x, params, posteriors=False).log_likelihood + float(model.log_prior(params))
    assert -float(loss) == pytest.approx(expected, abs=1e-8)
    assert estep_matches_hmmlearn(model, reference, x, params)


def estep_matches_hmmlearn(
    model: PoissonHMM, reference: hmm.PoissonHMM, x: torch.Tensor, params: dict
) -> bool:
    estep = model.e_step(x, params)
    return bool(
        np.isclose(estep.log_likelihood, reference.score(x.numpy(), LENGTHS), atol=1e-9)
        and np.allclose(estep.posteriors.numpy(), reference.predict_proba(x.numpy(), LENGTHS), atol=1e-10)
    )


def test_a_poisson_hmm_runs_from_a_config(tmp_path: Path) -> None:
    config = _config({"em": {"max_iter": 100}, "map": {"steps": 3}}, dim=8)
    config["model"] = {"name": "poisson_hmm", "k": 2, "prior": "conjugate"}
    result = ppl_gmm.run(config, runs_dir=tmp_path / "runs", quiet=True)
    for backend, summary in result.summaries.items():
        assert summary.status == "completed", (backend, summary.error)
        assert summary.n_params == (2 - 1) + 2 * (2 - 1) + 2 * 8
    assert result.summaries["em"].ari > 0.95  # eight count features tell the two states apart


def test_viterbi_equals_pyros_map_decoding_of_the_declaration() -> None:
    from pyro.infer import infer_discrete

    reference = _reference("diag", seed=10)
    lengths = np.array([20, 7, 1, 15])  # short: Pyro traces every step
    x = _data(reference, seed=11)[: lengths.sum()]
    model = GaussianHMM(3, 2, "diag", None).bind(lengths)
    params = _params(reference)
    conditioned = poutine.condition(model.model, data=model.to_sites(params))
    decoded = poutine.trace(infer_discrete(conditioned, first_available_dim=-2, temperature=0)).get_trace(x)
    rows, mask = padding(torch.from_numpy(lengths))
    states = torch.empty(len(x), dtype=torch.long)
    for t in range(rows.shape[0]):
        z = decoded.nodes[f"z_{t}"]["value"].reshape(-1)
        states[rows[t][mask[t]]] = z[mask[t]]
    assert torch.equal(states, model.most_probable_states(x, params))


def test_relabelling_permutes_transitions_on_both_axes() -> None:
    model = GaussianHMM(3, 2, "full", None)
    params = _params(_reference("full", seed=12))
    perm = torch.tensor([2, 0, 1])
    shuffled = permute(params, perm, model.component_axes)
    assert torch.equal(shuffled["transitions"], params["transitions"][perm][:, perm])
    back = relabel(model, params, shuffled)
    for name, value in params.items():
        assert torch.equal(back[name], value), name


def test_bernoulli_baum_welch_agrees_with_hmmlearns_categorical_hmm_on_two_symbols() -> None:
    """One binary feature is a categorical emission of two symbols: emissionprob = [1 - p, p]."""
    rng = np.random.default_rng(13)
    reference = hmm.CategoricalHMM(
        3,
        startprob_prior=1.0,
        transmat_prior=1.0,
        emissionprob_prior=1.0,
        init_params="",
        params="ste",
        n_iter=1,
        tol=-np.inf,
        implementation="log",
    )
    reference.n_features = 2
    reference.startprob_ = rng.dirichlet(np.ones(3) * 3)
    reference.transmat_ = 0.6 * np.eye(3) + 0.4 * rng.dirichlet(np.ones(3), size=3)
    probs = rng.uniform(0.1, 0.9, size=3)
    reference.emissionprob_ = np.column_stack([1 - probs, probs])
    symbols, _ = reference.sample(int(LENGTHS.sum()), random_state=14)
    x = torch.from_numpy(symbols.astype(np.float64))
    model = BernoulliHMM(3, 1, None).bind(LENGTHS)
    start = {
        "start": torch.from_numpy(reference.startprob_.copy()),
        "transitions": torch.from_numpy(reference.transmat_.copy()),
        "probs": torch.from_numpy(probs[:, None].copy()),
    }
    steps: list = []
    result = EM().fit(model, x, start, EMOptions(max_iter=25, tol=0.0), steps.append)
    expected = []
    for iteration in range(26):
        expected.append(reference.score(symbols, LENGTHS) / len(x))
        if iteration < 25:
            reference.fit(symbols, LENGTHS)
    np.testing.assert_allclose([step.log_likelihood for step in steps], expected, atol=1e-9, rtol=0)
    np.testing.assert_allclose(result.params["probs"].numpy()[:, 0], reference.emissionprob_[:, 1], atol=1e-7)
    np.testing.assert_allclose(result.params["transitions"].numpy(), reference.transmat_, atol=1e-7)


def test_the_estimator_takes_lengths_as_hmmlearn_does() -> None:
    lengths = np.array([60, 8, 90, 33, 2])  # the experiment refuses a sequence of one row
    reference = _reference("diag", seed=15)
    x = _data(reference, seed=16).numpy()
    start = {name: value.numpy() for name, value in _params(reference).items()}
    estimator = ppl_gmm.Mixture(
        3, model="gaussian_hmm", covariance_type="diag", init=start, max_iter=10, tol=0.0, reg_covar=0.0
    )
    with pytest.warns(ConvergenceWarning):  # ten iterations, no stopping: as hmmlearn's run
        estimator.fit(x, lengths=lengths)
    for _ in range(10):
        reference.fit(x, lengths)
    np.testing.assert_allclose(estimator.transitions_, reference.transmat_, atol=1e-5)
    np.testing.assert_allclose(estimator.means_, reference.means_, atol=1e-5)
    np.testing.assert_allclose(estimator.covariances_, reference._covars_, atol=1e-5)
    np.testing.assert_array_equal(estimator.predict(x, lengths), reference.predict(x, lengths))
    # scikit-learn's score is the mean per row, hmmlearn's the sum
    assert estimator.score(x, lengths=lengths) * len(x) == pytest.approx(
        reference.score(x, lengths), abs=1e-5
    )
    np.testing.assert_allclose(
        estimator.predict_proba(x, lengths), reference.predict_proba(x, lengths), atol=1e-6
    )
    with pytest.raises(UserError, match=r"lengths: expected positive integers.* sum to the 193 rows"):
        estimator.predict(x, [100, 50])
    with pytest.raises(UserError, match=r"lengths: model 'gmm' takes independent rows"):
        ppl_gmm.Mixture(2).fit(x, lengths=lengths)


@pytest.mark.parametrize("name", ["gaussian_hmm", "poisson_hmm", "bernoulli_hmm"])
def test_n_params_counts_the_free_dimensions_pyro_optimizes(name: str) -> None:
    """n_params (BIC's count) equals the size of the unconstrained locations of Pyro's AutoNormal
    guide over the declaration's global sites."""
    import pyro
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_value

    from ppl_gmm.models import MODELS

    cls = MODELS.get(name)
    simulation = cls.for_simulation(cls.options(k=3), 3).bind(np.array([6, 4]))
    truth = simulation.sample_truth(np.random.default_rng(0), 4.0)
    x, _ = simulation.simulate(truth, 10, np.random.default_rng(1))
    model = cls.from_config(cls.options(k=3, prior="conjugate"), x).bind(np.array([6, 4]))
    sites = model.to_sites(model.check_params(truth, "truth"))
    pyro.clear_param_store()
    guide = AutoNormal(
        poutine.block(model.model, expose=list(sites)), init_loc_fn=init_to_value(values=sites)
    )
    guide(x)
    locs = [value for key, value in pyro.get_param_store().items() if key.startswith("AutoNormal.locs.")]
    assert len(locs) == len(sites)
    assert model.n_params() == sum(value.numel() for value in locs)
