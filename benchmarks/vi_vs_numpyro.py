"""Our map, svi and mcmc backends against NumPyro on the same model, data and start: ms per step of
map and svi, and NUTS seconds per effective sample, for ours compiled (``compile: true``), ours
eager and NumPyro's jitted twin of the same declaration, one thread each, float64. Method:
benchmarks/README.md, section "vi_vs_numpyro".

    .venv/bin/python -m benchmarks.vi_vs_numpyro            # Old Faithful, (100k, 8, 8), NUTS (13-18 min)
    .venv/bin/python -m benchmarks.vi_vs_numpyro --quick    # a smoke run (~3 min)

Prints the loss check, each run, the medians and the targets; writes results/vi_vs_numpyro.csv (one
row per timed run and one median row per case and contender) and .txt (the printed output).
"""

# ruff: noqa: E402  (XLA reads its flags when jax is imported: they are set before the imports)
from __future__ import annotations

import os

# one thread on the JAX side, as torch.set_num_threads(1) on ours
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false"
    + " intra_op_parallelism_threads=1"
).strip()

import argparse
import datetime as dt
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as ndist
import numpyro.optim
import pyro
import torch
from numpyro.contrib.funsor import config_enumerate
from numpyro.diagnostics import effective_sample_size
from numpyro.distributions import constraints as nconstraints
from numpyro.infer import NUTS, SVI, TraceEnum_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoNormal
from numpyro.infer.initialization import init_to_value
from numpyro.ops.indexing import Vindex
from torch import Tensor

from ppl_gmm.backends.base import FitResult, StepInfo
from ppl_gmm.backends.map import MAP, MAPOptions
from ppl_gmm.backends.mcmc import MCMCBackend, MCMCOptions, convergence
from ppl_gmm.backends.svi import SVIBackend, SVIBackendOptions
from ppl_gmm.config import DataConfig, InitConfig, load_config
from ppl_gmm.data import load_data
from ppl_gmm.evaluate import relabel
from ppl_gmm.experiment import prepare
from ppl_gmm.init import initialize
from ppl_gmm.models.base import Params
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions

from ._common import (
    REPO,
    RESULTS,
    add_quiet_options,
    fmt_n,
    machine,
    measure_quietly,
    synthetic,
    write_results,
)

jax.config.update("jax_enable_x64", True)

NUTS_CONFIG = REPO / "configs" / "vb_vs_svi_vs_mcmc.yaml"
CASES = ("map_old_faithful", "svi_old_faithful", "map_large", "svi_large", "nuts")
DEFAULT_CASES = ("map_old_faithful", "svi_old_faithful", "map_large", "nuts")
CHECK_TOL = 1e-10  # largest relative difference of the two losses at the start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vi_vs_numpyro",
        description="Per-step time of map and svi, NUTS time per effective sample: ours against NumPyro.",
    )
    add = parser.add_argument
    add("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES), help="default: all but svi_large")
    add("--quick", action="store_true", help="a smoke run: few steps, N=10000 for the large case, 1 round")
    add(
        "--steps-small",
        type=int,
        nargs=2,
        default=(50, 550),
        metavar=("A", "B"),
        help="Old Faithful (50 550)",
    )
    add("--steps-large", type=int, nargs=2, default=(3, 23), metavar=("A", "B"), help="(100k, 8, 8) (3 23)")
    add("--large", type=int, nargs=3, default=(100_000, 8, 8), metavar=("N", "D", "K"), help="(100000 8 8)")
    add("--draws", type=int, nargs=2, default=None, metavar=("WARMUP", "SAMPLES"), help="NUTS (the config's)")
    add("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    add("--seed", type=int, default=0, help="data, k-means++ and sampler seed (default 0)")
    add_quiet_options(parser, quiet=0.25, max_wait=60.0)
    add("--out", type=Path, default=RESULTS / "vi_vs_numpyro.csv", help="CSV to write (and .txt beside it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps_small, args.steps_large, args.large = (10, 60), (2, 7), (10_000, 8, 8)
        args.draws, args.repeats = args.draws or (100, 100), 1
    for name in ("steps_small", "steps_large"):
        short, long = getattr(args, name)
        if not 1 <= short < long:
            parser.error(f"--{name.replace('_', '-')}: need 1 <= A < B")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


# ---- the problems ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    name: str
    model: GaussianMixture
    x: Tensor
    init: Params


def full_gmm(k: int, prior: str, x: Tensor) -> GaussianMixture:
    model = GaussianMixture.from_config(GMMOptions(k=k, prior=prior), x)
    assert isinstance(model, GaussianMixture)
    return model


def old_faithful(prior: str, seed: int) -> Problem:
    """The built-in Old Faithful (all 272 rows), standardized as ``data.standardize: true`` does,
    K = 2, full covariances, a k-means++ start."""
    x = load_data(DataConfig(source="old_faithful", standardize=True, test_fraction=0.0), seed).train
    model = full_gmm(2, prior, x)
    return Problem(f"old_faithful {fmt_n(x.shape[0])}x{x.shape[1]} K=2", model, x, kmeans(model, x, seed))


def large(n: int, d: int, k: int, prior: str, seed: int) -> Problem:
    """``synthetic`` data (separation 4), as svi_overhead draws them, with a k-means++ start."""
    x = torch.from_numpy(synthetic(n, d, k, 4.0, seed)[0])
    model = full_gmm(k, prior, x)
    return Problem(f"synthetic {fmt_n(n)}x{d} K={k}", model, x, kmeans(model, x, seed))


def kmeans(model: GaussianMixture, x: Tensor, seed: int) -> Params:
    return initialize(model, x, InitConfig(method="kmeans++"), seed)


def nuts_problem() -> tuple[Problem, MCMCOptions, int]:
    """The data, model, start and mcmc options of configs/vb_vs_svi_vs_mcmc.yaml, prepared as
    ``ppl-gmm run`` prepares them."""
    plan = prepare(load_config(NUTS_CONFIG))
    options = next(opts for name, _, opts in plan.backends if name == "mcmc")
    assert isinstance(options, MCMCOptions) and isinstance(plan.model, GaussianMixture)
    x = plan.data.train
    name = f"{NUTS_CONFIG.name} {fmt_n(x.shape[0])}x{x.shape[1]} K={plan.model.k}"
    return Problem(name, plan.model, x, plan.inits[0]), options, plan.config.seed


# ---- NumPyro's twin of GaussianMixture.model (full covariances) --------------------------------


def twin_prior(model: GaussianMixture) -> dict[str, Any] | None:
    """The conjugate prior's hyperparameters, read off the model, as JAX arrays (None: flat)."""
    prior = model.prior
    if prior is None:
        return None
    assert model.covariance == "full" and not prior.stick_breaking
    return {
        "alpha": prior.weight_concentration,
        "beta": prior.mean_precision,
        "m0": jnp.asarray(prior.mean_prior.numpy()),
        "nu0": prior.degrees_of_freedom,
        "c0": jnp.asarray(prior.covariance_prior.numpy()),  # W0^-1
    }


def gmm_twin(x: jax.Array, k: int, d: int, prior: dict[str, Any] | None) -> None:
    """Site for site ``GaussianMixture.model`` with full covariances: ``weights``, ``precision``
    (K, D, D), ``locs`` (K, D), ``z`` enumerated and ``x``; flat priors with ``prior`` None."""
    # global variables
    if prior is None:
        weights = numpyro.sample("weights", ndist.ImproperUniform(nconstraints.simplex, (), (k,)))
    else:
        weights = numpyro.sample("weights", ndist.Dirichlet(jnp.full(k, prior["alpha"])))
    with numpyro.plate("components", k):
        if prior is None:
            precision = numpyro.sample(
                "precision", ndist.ImproperUniform(nconstraints.positive_definite, (k,), (d, d))
            )
            locs = numpyro.sample("locs", ndist.ImproperUniform(nconstraints.real_vector, (k,), (d,)))
        else:
            # torch's Wishart(ν0, precision_matrix=W0^-1) is NumPyro's Wishart(ν0, rate_matrix=W0^-1)
            precision = numpyro.sample("precision", ndist.Wishart(prior["nu0"], rate_matrix=prior["c0"]))
            locs = numpyro.sample(
                "locs", ndist.MultivariateNormal(prior["m0"], precision_matrix=prior["beta"] * precision)
            )
    # local variables
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", ndist.Categorical(weights), infer={"enumerate": "parallel"})
        numpyro.sample(
            "x",
            ndist.MultivariateNormal(
                Vindex(locs)[..., z, :], precision_matrix=Vindex(precision)[..., z, :, :]
            ),
            obs=x,
        )


def twin(problem: Problem) -> tuple[Callable[..., None], dict[str, jax.Array], jax.Array]:
    """The twin model bound to the problem's K, D and prior, the start as sites, and x."""
    model = problem.model
    fn = partial(gmm_twin, k=model.k, d=model.dim, prior=twin_prior(model))
    sites = {name: jnp.asarray(value.numpy()) for name, value in model.to_sites(problem.init).items()}
    return fn, sites, jnp.asarray(problem.x.numpy())


def numpyro_svi(problem: Problem, guide: str, lr: float, init_scale: float = 0.05) -> tuple[SVI, jax.Array]:
    fn, sites, x = twin(problem)
    hidden = numpyro.handlers.block(fn, hide=["z"])
    if guide == "delta":
        auto: Any = AutoDelta(hidden, init_loc_fn=init_to_value(values=sites))
    else:
        auto = AutoNormal(hidden, init_loc_fn=init_to_value(values=sites), init_scale=init_scale)
    return SVI(fn, auto, numpyro.optim.Adam(lr), TraceEnum_ELBO(max_plate_nesting=1)), x


# ---- the check -------------------------------------------------------------------------------


def check_start(name: str, problem: Problem) -> dict[str, float]:
    """−log p(x, θ0) by our map backend (its step-0 loss) and by NumPyro's AutoDelta loss on the
    twin: the same model and start give the same number."""
    infos: list[StepInfo] = []
    pyro.clear_param_store()
    MAP().fit(problem.model, problem.x, problem.init, MAPOptions(steps=0), infos.append)
    ours = -infos[0].objective * problem.x.shape[0]
    svi, x = numpyro_svi(problem, "delta", 0.05)
    state = svi.init(jax.random.PRNGKey(0), x)
    theirs = float(svi.evaluate(state, x))
    rel = abs(ours - theirs) / abs(ours)
    verdict = "OK" if rel <= CHECK_TOL else "MISMATCH"
    say(f"  {name:<18} ours {ours:.15g}  NumPyro {theirs:.15g}  rel. diff {rel:.1e}  {verdict}")
    return {"loss_ours": ours, "loss_numpyro": theirs, "loss_rel_diff": rel}


# ---- timed runs: each returns its figures --------------------------------------------------------


def compile_seconds(result: FitResult) -> float:
    seconds = result.extras.get("compile_seconds")
    return math.nan if seconds is None else float(seconds)


def per_step(times: dict[int, float], steps: tuple[int, int]) -> float:
    """ms per step between steps A and B of one run: what came before A (set-up, a compile at the
    first step) cancels."""
    short, long = steps
    return 1000 * (times[long] - times[short]) / (long - short)


def ours_vi(kind: str, problem: Problem, steps: tuple[int, int], compile: bool) -> dict[str, Any]:
    times: dict[int, float] = {}
    last: list[float] = []

    def report(info: StepInfo) -> None:
        times[info.step] = info.wall_seconds
        last[:] = [info.objective]

    long = steps[1]
    pyro.clear_param_store()
    result: FitResult
    if kind == "map":
        options = MAPOptions(steps=long, tol=0.0, eval_every=long, compile=compile)
        result = MAP().fit(problem.model, problem.x, problem.init, options, report)
    else:
        svi_options = SVIBackendOptions(
            steps=long,
            tol=0.0,
            eval_every=long,
            guide="normal",
            mean_samples=1,
            elbo_particles=1,
            compile=compile,
        )
        result = SVIBackend().fit(problem.model, problem.x, problem.init, svi_options, report)
    return {
        "ms_per_step": per_step(times, steps),
        "compile_s": compile_seconds(result),
        "fit_s": result.fit_seconds,
        "objective": last[0],
    }


def numpyro_vi(kind: str, problem: Problem, steps: tuple[int, int], seed: int) -> dict[str, Any]:
    """NumPyro's SVI, ``jax.jit(svi.update)`` stepped in a loop; its first call compiles."""
    short, long = steps
    svi, x = numpyro_svi(problem, "delta" if kind == "map" else "normal", 0.05)
    began = time.perf_counter()
    state = jax.block_until_ready(svi.init(jax.random.PRNGKey(seed), x))
    init_s = time.perf_counter() - began
    update = jax.jit(svi.update)
    times = {}
    began = time.perf_counter()
    for step in range(1, long + 1):
        state, loss = update(state, x)
        if step in (1, short, long):
            jax.block_until_ready(loss)
            times[step] = time.perf_counter() - began
    ms = per_step(times, steps)
    return {
        "ms_per_step": ms,
        "compile_s": init_s + times[1] - ms / 1000,  # init's tracing, and the first update less a step
        "fit_s": times[long],
        "objective": -float(loss) / problem.x.shape[0],
    }


def min_ess(draws: dict[str, Tensor]) -> float:
    """The smallest effective sample size (NumPyro's estimator) over every varying entry of the
    (draws, ...) tensors of one chain."""
    smallest = math.inf
    for value in draws.values():
        flat = value.reshape(value.shape[0], -1).numpy()
        varies = (flat != flat[:1]).any(0)
        if varies.any():
            smallest = min(smallest, float(np.min(effective_sample_size(flat[None, :, varies]))))
    return smallest


def nuts_figures(sampling_s: float, draws: dict[str, Tensor], n_samples: int) -> dict[str, Any]:
    ess = min_ess(draws)
    _, ess_pyro = convergence({name: value[None] for name, value in draws.items()})
    return {
        "sampling_s": sampling_s,
        "ms_per_draw": 1000 * sampling_s / n_samples,
        "ess_min": ess,
        "ess_min_pyro": math.nan if ess_pyro is None else ess_pyro,
        # with few draws the estimate can come out negative (anticorrelated draws): no figure then
        "s_per_ess": sampling_s / ess if ess > 0 else math.nan,
    }


def ours_nuts(problem: Problem, options: MCMCOptions, seed: int) -> dict[str, Any]:
    times: dict[int, float] = {}
    pyro.set_rng_seed(seed)
    result = MCMCBackend().fit(
        problem.model,
        problem.x,
        problem.init,
        options,
        lambda info: times.__setitem__(info.step, info.wall_seconds),
    )
    warmup, samples = options.warmup_steps, options.num_samples
    figures = nuts_figures(times[warmup + samples] - times[warmup], dict(result.tensors["draws"]), samples)
    figures.update(
        warmup_s=times[warmup],
        compile_s=compile_seconds(result),
        fit_s=result.fit_seconds,
        accept_prob=result.extras["accept_prob"],
        divergences=result.extras["divergences"],
    )
    return figures


def numpyro_nuts(problem: Problem, options: MCMCOptions, seed: int) -> dict[str, Any]:
    """NumPyro's NUTS kernel (funsor enumeration of z), ``jax.jit(kernel.sample)`` stepped in a
    loop: its first call compiles; the draws are relabelled to the start as ours are."""
    fn, sites, x = twin(problem)
    kernel = NUTS(
        config_enumerate(fn),
        init_strategy=init_to_value(values=sites),
        target_accept_prob=options.target_accept_prob,
        max_tree_depth=options.max_tree_depth,
    )
    warmup, samples = options.warmup_steps, options.num_samples
    began = time.perf_counter()
    state = kernel.init(jax.random.PRNGKey(seed), warmup, None, (x,), {})
    step = jax.jit(kernel.sample)
    state = jax.block_until_ready(step(state, (x,), {}))
    first_s = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(warmup - 1):
        state = step(state, (x,), {})
    jax.block_until_ready(state)
    warmup_s = time.perf_counter() - began
    kept = []
    accept = 0.0
    began = time.perf_counter()
    for _ in range(samples):
        state = step(state, (x,), {})
        kept.append(state.z)
        accept += state.accept_prob
    jax.block_until_ready(state)
    sampling_s = time.perf_counter() - began
    constrain = kernel.postprocess_fn((x,), {})
    stacked = jax.vmap(constrain)(jax.tree.map(lambda *values: jnp.stack(values), *kept))
    model = problem.model
    pivot = problem.init
    draws = [
        relabel(
            model,
            pivot,
            model.from_sites({s: torch.from_numpy(np.array(v[i])) for s, v in stacked.items()}),
        )
        for i in range(samples)
    ]
    flat = {name: torch.stack([draw[name] for draw in draws]) for name in draws[0]}
    figures = nuts_figures(sampling_s, flat, samples)
    per_draw_s = (warmup_s + sampling_s) / (warmup - 1 + samples)
    figures.update(
        warmup_s=first_s + warmup_s,
        compile_s=first_s - per_draw_s,
        fit_s=first_s + warmup_s + sampling_s,
        accept_prob=float(accept) / samples,
        divergences=math.nan,
    )
    return figures


# ---- rounds, medians, the table ------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    problem: Problem
    unit: str  # "ms/step" or "s/ESS"
    metric: str  # the key of each run's figures that the table compares
    contenders: dict[str, Callable[[int], dict[str, Any]]]  # name -> run(round)
    meta: dict[str, Any]


def vi_case(name: str, kind: str, problem: Problem, steps: tuple[int, int], seed: int) -> Case:
    contenders: dict[str, Callable[[int], dict[str, Any]]] = {
        "compiled": lambda r: ours_vi(kind, problem, steps, True),
        "eager": lambda r: ours_vi(kind, problem, steps, False),
        "numpyro": lambda r: numpyro_vi(kind, problem, steps, seed + r),
    }
    meta = {"steps_short": steps[0], "steps_long": steps[1]}
    return Case(name, problem, "ms/step", "ms_per_step", contenders, meta)


def nuts_case(problem: Problem, options: MCMCOptions, seed: int, draws: tuple[int, int] | None) -> Case:
    if draws is not None:
        options = options.model_copy(update={"warmup_steps": draws[0], "num_samples": draws[1]})
    variants = {  # compile and Pyro's jit_compile exclude each other
        "compiled": {"compile": True, "jit_compile": False},
        "eager": {"compile": False, "jit_compile": True},  # the config's
        "eager_nojit": {"compile": False, "jit_compile": False},
    }
    contenders: dict[str, Callable[[int], dict[str, Any]]] = {
        name: partial(
            lambda r, update: ours_nuts(problem, options.model_copy(update=update), seed + r), update=up
        )
        for name, up in variants.items()
    }
    contenders["numpyro"] = lambda r: numpyro_nuts(problem, options, seed + r)
    meta = {"warmup": options.warmup_steps, "samples": options.num_samples}
    return Case("nuts", problem, "s/ESS", "s_per_ess", contenders, meta)


def run_round(case: Case, r: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    names = list(case.contenders)
    order = names[r % len(names) :] + names[: r % len(names)]  # rotates between rounds
    rows = []
    for position, name in enumerate(order):
        measured, figures = measure_quietly(partial(case.contenders[name], r), args.quiet, args.max_wait)
        row = {"case": case.name, "round": str(r + 1), "contender": name, "position": position}
        row.update(figures, wall_s=measured.seconds, other_cores=measured.other_cores)
        rows.append(row)
        extra = ""
        if case.unit == "s/ESS":
            extra = f"  ({figures['ms_per_draw']:.2f} ms/draw, min ESS {figures['ess_min']:.0f})"
        say(
            f"  round {r + 1} {name:<12} {figures[case.metric]:10.4f} {case.unit}{extra}  compile "
            f"{figures['compile_s']:6.2f} s  (other processes: {measured.other_cores:.2f} cores)"
        )
    return rows


def median_rows(case: Case, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in case.contenders:
        mine = [row for row in rows if row["contender"] == name]
        keys = [key for key, value in mine[0].items() if isinstance(value, float | int) and key != "position"]
        median = {key: statistics.median(float(row[key]) for row in mine) for key in keys}
        out.append({"case": case.name, "round": "median", "contender": name, **median})
    return out


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


Medians = dict[str, dict[str, dict[str, Any]]]  # case -> contender -> its median row


def print_table(medians: Medians, cases: list[Case]) -> None:
    say()
    say(
        f"{'case':<18}{'unit':>8}{'compiled':>11}{'eager':>11}{'NumPyro':>11}{'comp/NumPyro':>14}"
        f"{'comp/eager':>12}"
    )
    for case in cases:
        lines = [(case.name, case.metric, case.unit)]
        if case.metric == "s_per_ess":  # the speed alone, without the chains' luck in ESS
            lines.append(("  per draw", "ms_per_draw", "ms/draw"))
        for label, metric, unit in lines:
            value = {
                name: medians[case.name].get(name, {}).get(metric, math.nan)
                for name in ("compiled", "eager", "eager_nojit", "numpyro")
            }
            say(
                f"{label:<18}{unit:>8}{value['compiled']:>11.4g}{value['eager']:>11.4g}"
                f"{value['numpyro']:>11.4g}{ratio(value['compiled'], value['numpyro']):>14.3f}"
                f"{ratio(value['compiled'], value['eager']):>12.3f}"
            )
            if not math.isnan(value["eager_nojit"]):
                say(
                    f"{'  eager, no jit':<18}{unit:>8}{'':>11}{value['eager_nojit']:>11.4g}{'':>25}"
                    f"{ratio(value['compiled'], value['eager_nojit']):>12.3f}"
                )
    say("(nuts: eager is today's config, jit_compile: true; compile seconds are in the CSV)")


def check_targets(medians: Medians) -> list[tuple[str, bool | None]]:
    """Each target's text and whether it was met (None: not measured in this run)."""

    def value(case: str, name: str) -> float:
        return (
            medians.get(case, {})
            .get(name, {})
            .get("s_per_ess" if case == "nuts" else "ms_per_step", math.nan)
        )

    targets: list[tuple[str, bool | None]] = []

    def target(text: str, r: float, met: bool) -> None:
        targets.append((text, None if math.isnan(r) else met))

    for case in ("map_old_faithful", "svi_old_faithful"):
        r = ratio(value(case, "compiled"), value(case, "numpyro"))
        target(f"{case}: compiled within 2x NumPyro per step (ratio {r:.2f})", r, r <= 2)
    r = ratio(value("map_large", "compiled"), value("map_large", "eager"))
    target(f"map_large: compiled no slower than eager per step (ratio {r:.2f})", r, r <= 1)
    r = ratio(value("nuts", "eager"), value("nuts", "compiled"))
    target(f"nuts: compiled >= 5x less time per effective sample than eager ({r:.2f}x)", r, r >= 5)
    say()
    for text, met in targets:
        say(f"  {'n/a ' if met is None else 'PASS' if met else 'MISS'}  {text}")
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    seed = args.seed
    say(
        f"vi_vs_numpyro: float64, 1 thread, repeats={args.repeats} (torch {torch.__version__}, pyro "
        f"{pyro.__version__}, numpyro {numpyro.__version__}, jax {jax.__version__}; {machine()})"
    )
    cases: list[Case] = []
    n, d, k = args.large
    if "map_old_faithful" in args.cases:
        cases.append(vi_case("map_old_faithful", "map", old_faithful("none", seed), args.steps_small, seed))
    if "svi_old_faithful" in args.cases:
        cases.append(
            vi_case("svi_old_faithful", "svi", old_faithful("conjugate", seed), args.steps_small, seed)
        )
    if "map_large" in args.cases:
        cases.append(vi_case("map_large", "map", large(n, d, k, "none", seed), args.steps_large, seed))
    if "svi_large" in args.cases:
        cases.append(vi_case("svi_large", "svi", large(n, d, k, "conjugate", seed), args.steps_large, seed))
    if "nuts" in args.cases:
        problem, options, config_seed = nuts_problem()
        cases.append(nuts_case(problem, options, config_seed, args.draws))

    say("\nloss at the start, -log p(x, theta0) (prior included under conjugate):")
    checks = {case.name: check_start(case.name, case.problem) for case in cases}
    if any(check["loss_rel_diff"] > CHECK_TOL for check in checks.values()):
        say("error: the two models disagree at the start, so their timings are of different models")
        return 1

    rows: list[dict[str, Any]] = []
    medians: Medians = {}
    for case in cases:
        say(f"\n{case.name}: {case.problem.name}, {case.meta}")
        case_rows = [row for r in range(args.repeats) for row in run_round(case, r, args)]
        middle = median_rows(case, case_rows)
        medians[case.name] = {row["contender"]: row for row in middle}
        stamp = {"problem": case.problem.name, **case.meta, **checks[case.name]}
        rows.extend({**row, **stamp} for row in case_rows + middle)
    print_table(medians, cases)
    targets = check_targets(medians)
    meta = {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__}
    meta.update(pyro=pyro.__version__, numpyro=numpyro.__version__, jax=jax.__version__, quick=args.quick)
    rows.extend({"case": "target", "round": "", "contender": text, "met": met} for text, met in targets)
    write_results(args.out, [{**meta, **row} for row in rows], LINES)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
