"""Does the ``map`` backend add overhead on top of Pyro? Per-step time of ``MAP().fit`` against a
bare Pyro SVI loop on the same model and start, after checking that their losses agree. Method:
benchmarks/README.md, section "svi_overhead".

    .venv/bin/python -m benchmarks.svi_overhead            # N=100_000, D=8, K=8
    .venv/bin/python -m benchmarks.svi_overhead --quick    # N=10_000

Prints the loss check, each round and the medians; appends to results/svi_overhead.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
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
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions

from ._common import RESULTS, Measured, add_quiet_options, append_csv, machine, measure_quietly, synthetic

LR = 0.05  # MAPOptions' default; the bare loop uses the same


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.svi_overhead",
        description="Per-step time of the map backend against a bare Pyro SVI loop.",
    )
    add = parser.add_argument
    add("--n", type=int, default=100_000, help="points (default 100000)")
    add("--quick", action="store_true", help="N=10000 (overrides --n)")
    add("--dim", "-d", type=int, default=8, help="features D (default 8)")
    add("--k", "-k", type=int, default=8, help="components K, true and fitted (default 8)")
    add("--steps", type=int, nargs=2, default=(20, 120), metavar=("SHORT", "LONG"), help="timed (20 120)")
    add("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    add("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    add("--check-steps", type=int, default=5, help="steps compared for the loss trajectory")
    add("--alternate", action="store_true", help="bare first every other round, to expose order effects")
    add("--seed", type=int, default=0, help="data and k-means++ seed (default 0)")
    add_quiet_options(parser, quiet=0.25, max_wait=300.0)
    add("--out", type=Path, default=RESULTS / "svi_overhead.csv", help="CSV to append to")
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


# ---- timing -------------------------------------------------------------------------------


def timed(fn: Callable[[], object], args: argparse.Namespace) -> Measured:
    return measure_quietly(fn, args.quiet, args.max_wait, sample=0.5)[0]


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


def problem(args: argparse.Namespace) -> tuple[GaussianMixture, Tensor, Params]:
    """Synthetic data (float64, as the experiments use), the full-covariance model without prior
    (MLE) and k-means++ initial parameters."""
    x = torch.from_numpy(synthetic(args.n, args.dim, args.k, 4.0, args.seed)[0])
    model = GaussianMixture.from_config(GMMOptions(k=args.k), x)
    assert isinstance(model, GaussianMixture)
    return model, x, initialize(model, x, InitConfig(method="kmeans++"), args.seed)


def time_round(args: argparse.Namespace, model: GaussianMixture, x: Tensor, init: Params, r: int) -> dict:
    """Round r: ours and bare, each a short and a long run (bare first in even rounds with
    ``--alternate``); printed, and its CSV row."""
    short, long = args.steps
    pyro.set_rng_seed(args.seed)
    bare_first = args.alternate and r % 2 == 0
    pairs = [
        ("ours", lambda steps: lambda: run_ours(model, x, init, steps, lambda s: None)),
        ("bare", lambda steps: lambda: run_bare(model, x, init, steps)),
    ]
    times = {}
    for name, make in reversed(pairs) if bare_first else pairs:
        times[name] = [timed(make(steps), args) for steps in (short, long)]
    runs = times["ours"] + times["bare"]
    (o_short, o_long, b_short, b_long) = (run.seconds for run in runs)
    other = _nanmax(run.other_cores for run in runs)
    o_ms = 1000 * (o_long - o_short) / (long - short)
    b_ms = 1000 * (b_long - b_short) / (long - short)
    row = {"round": str(r), "first": "bare" if bare_first else "ours"}
    row.update(ours_short_s=o_short, ours_long_s=o_long, ours_ms_per_step=o_ms)
    row.update(bare_short_s=b_short, bare_long_s=b_long, bare_ms_per_step=b_ms)
    row.update(ratio=o_ms / b_ms, other_cores_max=other)
    print(
        f"  round {r} ({row['first']} first): ours {o_ms:8.2f} ms/step   bare {b_ms:8.2f} "
        f"ms/step   ratio {o_ms / b_ms:.3f}   (other processes: up to {other:.2f} cores busy)"
    )
    return row


def median_row(rows: list[dict], args: argparse.Namespace) -> dict:
    def median(key: str) -> float:
        return statistics.median(row[key] for row in rows)

    out = {"round": "median", "first": "alternating" if args.alternate and args.repeats > 1 else "ours"}
    out.update({key: median(key) for key in ("ours_short_s", "ours_long_s", "ours_ms_per_step")})
    out.update({key: median(key) for key in ("bare_short_s", "bare_long_s", "bare_ms_per_step")})
    out.update(ratio=out["ours_ms_per_step"] / out["bare_ms_per_step"])
    out.update(other_cores_max=_nanmax(row["other_cores_max"] for row in rows))
    return out


def print_medians(median: dict, args: argparse.Namespace) -> None:
    print()
    print(f"{'':<22}{'ms/step (median of ' + str(args.repeats) + ')':>26}")
    print(f"{'ours (map backend)':<22}{median['ours_ms_per_step']:>26.2f}")
    print(f"{'bare Pyro SVI loop':<22}{median['bare_ms_per_step']:>26.2f}")
    print(f"{'ratio ours / bare':<22}{median['ratio']:>26.3f}")
    if median["other_cores_max"] > args.quiet:
        print(
            f"warning: other processes kept up to {median['other_cores_max']:.2f} cores busy during some "
            "timed runs; those timings are unreliable (see other_cores_max in the CSV)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    short, long = args.steps
    model, x, init = problem(args)
    print(
        f"svi_overhead: N={args.n} D={args.dim} K={args.k} dtype={x.dtype} threads="
        f"{torch.get_num_threads()} steps {short}->{long} repeats={args.repeats} "
        f"(torch {torch.__version__}, pyro {pyro.__version__}, {machine()})"
    )
    check = check_trajectories(model, x, init, args.check_steps)  # doubles as a warm-up of both
    rows = [time_round(args, model, x, init, r) for r in range(1, args.repeats + 1)]
    rows.append(median_row(rows, args))
    print_medians(rows[-1], args)
    meta = {"timestamp": dt.datetime.now().isoformat(timespec="seconds"), "n": args.n, "dim": args.dim}
    meta.update(k=args.k, threads=args.threads, steps_short=short, steps_long=long, repeats=args.repeats)
    meta.update(quiet=args.quiet, torch=torch.__version__, pyro=pyro.__version__, **check)
    append_csv(args.out, [{**meta, **row} for row in rows])
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
