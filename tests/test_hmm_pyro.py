"""The Pyro backends on hidden Markov models, against exact references: MAP by gradient on the
declaration ends where exact EM for the MAP (Baum–Welch with the prior) can gain nothing more, and
NUTS with the states enumerated agrees with an independent Gibbs sampler (forward filtering,
backward sampling, conjugate draws) written here in NumPy."""

from __future__ import annotations

import numpy as np
import torch
from pyro.ops.stats import effective_sample_size

from ppl_gmm.backends.map import MAP, MAPOptions
from ppl_gmm.backends.mcmc import MCMCBackend, MCMCOptions
from ppl_gmm.models.hmm import GaussianHMM, GaussianHMMOptions, PoissonHMM

TRANSITIONS = torch.tensor([[0.8, 0.2], [0.25, 0.75]], dtype=torch.float64)
START = torch.tensor([0.5, 0.5], dtype=torch.float64)


def _em_gains(model: GaussianHMM, x: torch.Tensor, params: dict, steps: int) -> np.ndarray:
    """The change of log p(x | θ) + log p(θ) over each of ``steps`` steps of exact EM for the MAP."""

    def objective(p: dict) -> float:
        return model.e_step(x, p, posteriors=False).log_likelihood + float(model.log_prior(p))

    values = [objective(params)]
    for _ in range(steps):
        params = model.m_step_hmm(x, model.e_step(x, params))
        values.append(objective(params))
    return np.diff(values)


def test_map_on_the_declaration_reaches_a_maximum_of_the_posterior() -> None:
    # small on purpose: a Pyro step traces every time step of the declaration (10-20 ms here)
    lengths = np.array([4, 3, 4, 4, 3, 4, 4, 3])
    truth = {
        "start": START,
        "transitions": TRANSITIONS,
        "means": torch.tensor([[-2.0], [2.0]], dtype=torch.float64),
        "covariances": torch.tensor([[[1.0]], [[0.5]]], dtype=torch.float64),
    }
    rng = np.random.default_rng(1)
    x, _ = GaussianHMM(2, 1, "full", None).bind(lengths).simulate(truth, int(lengths.sum()), rng)
    options = GaussianHMMOptions(
        k=2, prior="conjugate", hyperparameters={"start_concentration": 2.0, "transition_concentration": 2.0}
    )
    model = GaussianHMM.from_config(options, x).bind(lengths)
    assert model.has_prior
    init = {
        "start": START,
        "transitions": torch.full((2, 2), 0.5, dtype=torch.float64),
        "means": torch.tensor([[-1.0], [1.0]], dtype=torch.float64),
        "covariances": torch.ones(2, 1, 1, dtype=torch.float64),
    }
    # the criterion discriminates: a few steps in, EM from map's estimate still climbs
    early = MAP().fit(model, x, init, MAPOptions(steps=5, lr=0.1, tol=0.0), lambda step: None)
    assert _em_gains(model, x, early.params, 1)[0] > 1e-2

    fit = MAP().fit(
        model, x, init, MAPOptions(steps=2000, lr=0.1, tol=1e-10, patience=20, jit=True), lambda s: None
    )
    assert fit.converged and fit.point_estimate == "map"
    gains = _em_gains(model, x, fit.params, 3)
    # the total objective (not per observation: 29 times stricter) gains < 1e-6 per EM step,
    # and never falls beyond rounding: map's estimate is a fixed point of EM for the MAP
    assert np.all(gains < 1e-6), gains
    assert np.all(gains > -1e-9), gains


# ---- NUTS against a Gibbs sampler ----------------------------------------------------------


def _poisson_gibbs(
    x: np.ndarray, lengths: np.ndarray, prior: tuple[float, float, float, float], sweeps: int, seed: int
) -> dict[str, np.ndarray]:
    """Gibbs draws of (start, transitions, rates) for a 2-state Poisson HMM with one feature:
    Dirichlet(s0) start, Dirichlet(c0) transition rows, Gamma(a0, rate b0) rates. Each sweep draws
    every sequence's states by forward filtering, backward sampling given θ, then θ from its
    conjugate posterior given the states. The sequences are padded to the longest (T, S); a
    padded step carries the filter forward unchanged, so its sampled state copies the next one."""
    s0, c0, a0, b0 = prior
    rng = np.random.default_rng(seed)
    k, n_seq, steps = 2, len(lengths), int(lengths.max())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    mask = np.arange(steps)[:, None] < lengths[None, :]  # (T, S)
    counts = np.zeros((steps, n_seq))
    counts[mask] = x[(offsets[None, :] + np.arange(steps)[:, None])[mask]]
    start, transitions, rates = np.full(k, 0.5), np.full((k, k), 0.5), np.array([1.0, 5.0])
    out: dict[str, list[np.ndarray]] = {"start": [], "transitions": [], "rates": []}
    for _ in range(sweeps):
        emission = np.exp(counts[..., None] * np.log(rates) - rates)  # (T, S, K), up to x!
        filtered = np.empty((steps, n_seq, k))
        alpha = start * emission[0]
        filtered[0] = alpha / alpha.sum(1, keepdims=True)
        for t in range(1, steps):
            alpha = (filtered[t - 1] @ transitions) * emission[t]
            alpha /= alpha.sum(1, keepdims=True)
            filtered[t] = np.where(mask[t][:, None], alpha, filtered[t - 1])
        z = np.empty((steps, n_seq), dtype=np.int64)
        z[-1] = rng.random(n_seq) >= filtered[-1, :, 0]
        for t in range(steps - 2, -1, -1):
            back = filtered[t] * transitions[:, z[t + 1]].T  # (S, K)
            drawn = rng.random(n_seq) >= back[:, 0] / back.sum(1)
            z[t] = np.where(mask[t + 1], drawn, z[t + 1])
        first = np.bincount(z[0], minlength=k)
        moves = np.zeros((k, k))
        np.add.at(moves, (z[:-1][mask[1:]], z[1:][mask[1:]]), 1.0)
        visits = np.bincount(z[mask], minlength=k)
        totals = np.bincount(z[mask], weights=counts[mask], minlength=k)
        start = rng.standard_gamma(s0 + first)
        start /= start.sum()
        transitions = rng.standard_gamma(c0 + moves)  # each row Dirichlet by normalizing
        transitions /= transitions.sum(1, keepdims=True)
        rates = rng.standard_gamma(a0 + totals) / (b0 + visits)
        out["start"].append(start)
        out["transitions"].append(transitions)
        out["rates"].append(rates)
    return {name: np.stack(values) for name, values in out.items()}


def _ordered(draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each draw's states sorted by rate: the one labelling both samplers share."""
    order = np.argsort(draws["rates"], axis=1)  # (draws, K)
    rows = np.arange(len(order))[:, None]
    # transitions[d, i, j] from state order[d, i] to state order[d, j]
    transitions = draws["transitions"][rows[..., None], order[:, :, None], order[:, None, :]]
    return {
        "start": draws["start"][rows, order],
        "transitions": transitions,
        "rates": draws["rates"][rows, order],
    }


def _effective_sample_size(values: np.ndarray) -> float:
    """Pyro's estimate (Geyer's initial monotone sequence) for one chain."""
    return float(effective_sample_size(torch.from_numpy(values)[None], chain_dim=0, sample_dim=1))


def _summaries(draws: dict[str, np.ndarray]) -> dict[str, tuple[float, float, float]]:
    """(mean, sd, effective sample size) of each free scalar: both rates, the probabilities of
    staying in each state, the start probability of the low-rate state."""
    scalars = {
        "rate low": draws["rates"][:, 0],
        "rate high": draws["rates"][:, 1],
        "stay low": draws["transitions"][:, 0, 0],
        "stay high": draws["transitions"][:, 1, 1],
        "start low": draws["start"][:, 0],
    }
    out = {}
    for name, values in scalars.items():
        ess = _effective_sample_size(values)
        out[name] = (float(values.mean()), float(values.std(ddof=1)), ess)
    return out


def test_nuts_with_enumerated_states_agrees_with_a_gibbs_sampler() -> None:
    # short, unequal sequences (the padding masked in both samplers): a NUTS gradient traces the
    # declaration a time step at a time, ~8 ms here at 3 steps, and an iteration takes ~10
    lengths = np.array([3, 2, 3, 3, 2, 3, 3, 2, 3, 3, 2, 3])
    truth = {
        "start": START,
        "transitions": TRANSITIONS,
        "rates": torch.tensor([[1.0], [8.0]], dtype=torch.float64),
    }
    x, _ = PoissonHMM(2, 1, None).bind(lengths).simulate(truth, int(lengths.sum()), np.random.default_rng(3))
    hyper = {"start_concentration": 2.0, "transition_concentration": 2.0, "rate_shape": 2.0, "rate_rate": 0.5}
    model = PoissonHMM.from_config(PoissonHMM.options(k=2, prior="conjugate", hyperparameters=hyper), x)
    model = model.bind(lengths)
    init = {
        "start": START,
        "transitions": torch.full((2, 2), 0.5, dtype=torch.float64),
        "rates": torch.tensor([[2.0], [6.0]], dtype=torch.float64),
    }
    options = MCMCOptions(num_samples=120, warmup_steps=80, jit_compile=True)
    fit = MCMCBackend().fit(model, x, init, options, lambda step: None)
    assert fit.extras["divergences"] == 0
    drawn = {name: value.numpy() for name, value in fit.tensors["draws"].items()}
    nuts = _summaries(_ordered({**drawn, "rates": drawn["rates"][..., 0]}))

    gibbs_draws = _poisson_gibbs(x.numpy()[:, 0], lengths, (2.0, 2.0, 2.0, 0.5), sweeps=6000, seed=4)
    gibbs = _summaries(_ordered({name: value[500:] for name, value in gibbs_draws.items()}))
    for name, (mean, sd, ess) in nuts.items():
        ref_mean, ref_sd, ref_ess = gibbs[name]
        assert ess > 50 and ref_ess > 1000, (name, ess, ref_ess)
        # means within 4 Monte Carlo standard errors of their difference (both chains' ESS)
        se = np.hypot(sd / np.sqrt(ess), ref_sd / np.sqrt(ref_ess))
        assert abs(mean - ref_mean) < 4 * se, (name, mean, ref_mean, se)
        # sds within 4 standard errors, sd·sqrt(1 / (2 ESS)) for a near-normal marginal, widened
        # by half for the skew of the probabilities and rates
        se_sd = 1.5 * np.hypot(sd / np.sqrt(2 * ess), ref_sd / np.sqrt(2 * ref_ess))
        assert abs(sd - ref_sd) < 4 * se_sd, (name, sd, ref_sd, se_sd)
