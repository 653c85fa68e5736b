"""Does the ``map`` backend add overhead on top of Pyro?

In one process, on the same synthetic data, model object and initial parameters, this times

  ours  ``MAP().fit(model, x, init, MAPOptions(steps=S, tol=0, eval_every=S), report=...)``
  bare  the same ``model.model``, an ``AutoDelta`` guide over the same global sites started at the
        same values, ``TraceEnum_ELBO(max_plate_nesting=1)``, ``pyro.optim.Adam({"lr": 0.05})``
        and ``SVI.step(x)`` in a plain for loop

each for a short and a long run; the per-step time is (long - short) / (S_long - S_short), so
fixed costs (setup, first step, our initial loss and final exact log-likelihood) cancel. Rounds
are interleaved (ours, bare, ours, bare, ...; ``--alternate`` puts bare first every other round)
and the medians compared. Each timed run first waits for the machine to be quiet and records how
busy other processes kept it (``other_cores_max``). Before timing, both are
run for a few steps and their loss trajectories compared (the same computation: they should agree
to rounding).

    .venv/bin/python -m benchmarks.svi_overhead            # N=100_000, D=8, K=8
    .venv/bin/python -m benchmarks.svi_overhead --quick    # N=10_000

Results are appended to benchmarks/results/svi_overhead.csv (one row per round and one median
row per invocation).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value
from torch import Tensor

from ppl_gmm.backends.base import StepInfo
from ppl_gmm.backends.map import MAP, MAPOptions
from ppl_gmm.config import InitConfig
from ppl_gmm.init import initialize
from ppl_gmm.models.base import LatentModel, Params
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions, make_synthetic
from ppl_gmm.runs import write_csv

from ._common import machine, measure, wait_until_quiet

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "svi_overhead.csv"
LR = 0.05  # MAPOptions' default; the bare loop uses the same


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.svi_overhead",
        description="Per-step time of the map backend against a bare Pyro SVI loop.",
    )
    parser.add_argument("--n", type=int, default=100_000, help="points (default 100000)")
    parser.add_argument("--quick", action="store_true", help="N=10000 (overrides --n)")
    parser.add_argument("--dim", "-d", type=int, default=8, help="features D (default 8)")
    parser.add_argument("--k", "-k", type=int, default=8, help="components K, true and fitted (default 8)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs=2,
        default=(20, 120),
        metavar=("SHORT", "LONG"),
        help="the two run lengths whose difference is timed (default 20 120)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--check-steps", type=int, default=5, help="steps compared for the loss trajectory")
    parser.add_argument(
        "--alternate",
        action="store_true",
        help="swap which goes first every other round (bare, ours, ...), to expose order effects",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and k-means++ seed (default 0)")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.25,
        help="before each timed run, wait until other processes keep fewer than this many cores "
        "busy (default 0.25; a large value disables the wait)",
    )
    parser.add_argument("--max-wait", type=float, default=300.0, help="... but at most this many seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV to append to")
    args = parser.parse_args(argv)
    if args.quick:
        args.n = 10_000
    short, long = args.steps
    if not 0 <= short < long:
        parser.error("--steps: need 0 <= SHORT < LONG")
    if args.repeats < 1 or args.threads < 1 or args.check_steps < 1:
        parser.error("--repeats, --threads and --check-steps must be at least 1")
    if args.k > args.n:
        parser.error("--k: more components than points")
    return args


# ---- the two contenders --------------------------------------------------------------------


def run_ours(
    model: LatentModel, x: Tensor, init: Params, steps: int, report: Callable[[StepInfo], None]
) -> Params:
    pyro.clear_param_store()
    options = MAPOptions(steps=steps, tol=0.0, eval_every=max(steps, 1))
    return MAP().fit(model, x, init, options, report=report).params


def run_bare(model: GaussianMixture, x: Tensor, init: Params, steps: int) -> tuple[list[float], Params]:
    pyro.clear_param_store()
    sites = model.to_sites(init)
    guide = AutoDelta(poutine.block(model.model, expose=list(sites)), init_loc_fn=init_to_value(values=sites))
    svi = SVI(model.model, guide, pyro.optim.Adam({"lr": LR}), TraceEnum_ELBO(max_plate_nesting=1))
    losses = []
    for _ in range(steps):
        losses.append(svi.step(x))
    return losses, model.from_sites({k: v.detach() for k, v in guide.median(x).items()})


# ---- timing on a shared machine (see benchmarks/_common.py) ------------------------------------


class Timing(NamedTuple):
    seconds: float
    other_cores: float  # cores kept busy by other processes while it ran (NaN where unknown)


def timed(fn: Callable[[], object], quiet: float, max_wait: float) -> Timing:
    gc.collect()
    wait_until_quiet(quiet, max_wait, sample=0.5)
    measured, _ = measure(fn)
    return Timing(measured.seconds, measured.other_cores)


def _nanmax(values: Iterable[float]) -> float:
    return max((v for v in values if not math.isnan(v)), default=math.nan)


# ---- the check ----------------------------------------------------------------------------


def check_trajectories(model: GaussianMixture, x: Tensor, init: Params, steps: int) -> dict[str, float]:
    """Run both for ``steps`` steps; print and return the largest relative differences."""
    n = x.shape[0]
    infos: list[StepInfo] = []
    ours_params = run_ours(model, x, init, steps, infos.append)
    bare_losses, bare_params = run_bare(model, x, init, steps)
    # ours reports step 0 (the loss at the start, before any step) and then -loss/N per step
    ours_obj = np.array([info.objective for info in infos if info.step >= 1])
    bare_obj = -np.array(bare_losses) / n
    rel = np.abs(ours_obj - bare_obj) / np.abs(bare_obj)
    params_rel = max(
        float(((ours_params[key] - bare_params[key]).abs().max() / bare_params[key].abs().max()).item())
        for key in bare_params
    )
    print(f"loss trajectory, first {steps} steps (objective = -loss/N):")
    print(f"  {'step':>4}  {'ours':>22}  {'bare':>22}  {'rel. diff':>9}")
    for step, (a, b, r) in enumerate(zip(ours_obj, bare_obj, rel, strict=True), start=1):
        print(f"  {step:>4}  {a:>22.15f}  {b:>22.15f}  {r:>9.1e}")
    worst = float(rel.max())
    verdict = "OK" if worst <= 1e-10 and params_rel <= 1e-10 else "MISMATCH"
    print(
        f"  max rel. diff: objective {worst:.1e}, parameters after {steps} steps {params_rel:.1e}"
        f"  -> {verdict}"
    )
    return {"max_rel_diff_objective": worst, "max_rel_diff_params": params_rel}


# ---- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    short, long = args.steps

    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 1]))
    x_np, _, _ = make_synthetic(args.n, args.dim, args.k, 4.0, rng)
    x = torch.from_numpy(np.ascontiguousarray(x_np))  # float64, as the experiments use
    model = GaussianMixture.from_config(GMMOptions(k=args.k), x)  # full covariance, no prior (MLE)
    assert isinstance(model, GaussianMixture)
    init = initialize(model, x, InitConfig(method="kmeans++"), args.seed)

    print(
        f"svi_overhead: N={args.n} D={args.dim} K={args.k} dtype={x.dtype} threads="
        f"{torch.get_num_threads()} steps {short}->{long} repeats={args.repeats} "
        f"(torch {torch.__version__}, pyro {pyro.__version__}, {machine()})"
    )
    # the check doubles as a warm-up of both code paths
    check = check_trajectories(model, x, init, args.check_steps)

    def ours(steps: int) -> Callable[[], object]:
        return lambda: run_ours(model, x, init, steps, lambda s: None)

    def bare(steps: int) -> Callable[[], object]:
        return lambda: run_bare(model, x, init, steps)

    rows = []
    for r in range(1, args.repeats + 1):
        pyro.set_rng_seed(args.seed)
        bare_first = args.alternate and r % 2 == 0
        pairs = [("ours", ours), ("bare", bare)]
        times = {}
        for name, make in reversed(pairs) if bare_first else pairs:
            times[name] = [timed(make(steps), args.quiet, args.max_wait) for steps in (short, long)]
        runs = times["ours"] + times["bare"]
        (o_short, o_long, b_short, b_long) = (run.seconds for run in runs)
        other = _nanmax(run.other_cores for run in runs)
        o_ms = 1000 * (o_long - o_short) / (long - short)
        b_ms = 1000 * (b_long - b_short) / (long - short)
        rows.append(
            {
                "round": str(r),
                "first": "bare" if bare_first else "ours",
                "ours_short_s": o_short,
                "ours_long_s": o_long,
                "ours_ms_per_step": o_ms,
                "bare_short_s": b_short,
                "bare_long_s": b_long,
                "bare_ms_per_step": b_ms,
                "ratio": o_ms / b_ms,
                "other_cores_max": other,
            }
        )
        print(
            f"  round {r} ({rows[-1]['first']} first): ours {o_ms:8.2f} ms/step   bare {b_ms:8.2f} "
            f"ms/step   ratio {o_ms / b_ms:.3f}   (other processes: up to {other:.2f} cores busy)"
        )

    med_ours = statistics.median(row["ours_ms_per_step"] for row in rows)
    med_bare = statistics.median(row["bare_ms_per_step"] for row in rows)
    rows.append(
        {
            "round": "median",
            "first": "alternating" if args.alternate and args.repeats > 1 else "ours",
            "ours_short_s": statistics.median(row["ours_short_s"] for row in rows),
            "ours_long_s": statistics.median(row["ours_long_s"] for row in rows),
            "ours_ms_per_step": med_ours,
            "bare_short_s": statistics.median(row["bare_short_s"] for row in rows),
            "bare_long_s": statistics.median(row["bare_long_s"] for row in rows),
            "bare_ms_per_step": med_bare,
            "ratio": med_ours / med_bare,
            "other_cores_max": _nanmax(row["other_cores_max"] for row in rows),
        }
    )

    print()
    print(f"{'':<22}{'ms/step (median of ' + str(args.repeats) + ')':>26}")
    print(f"{'ours (map backend)':<22}{med_ours:>26.2f}")
    print(f"{'bare Pyro SVI loop':<22}{med_bare:>26.2f}")
    print(f"{'ratio ours / bare':<22}{med_ours / med_bare:>26.3f}")
    noisy = rows[-1]["other_cores_max"]
    if noisy > args.quiet:
        print(
            f"warning: other processes kept up to {noisy:.2f} cores busy during some timed runs; "
            "those timings are unreliable (see other_cores_max in the CSV)"
        )

    stamp = dt.datetime.now().isoformat(timespec="seconds")
    meta = {
        "timestamp": stamp,
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "threads": args.threads,
        "steps_short": short,
        "steps_long": long,
        "repeats": args.repeats,
        "quiet": args.quiet,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        **check,
    }
    frame = pd.DataFrame([{**meta, **row} for row in rows])
    if args.out.exists():
        frame = pd.concat([pd.read_csv(args.out, dtype={"round": str}), frame], ignore_index=True)
    write_csv(args.out, frame)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
