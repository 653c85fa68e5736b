"""Does batch EM scale linearly in N, with bounded memory (part 1)? And does one pass of online EM
get as close as batch EM sooner (part 2)? Method and history: benchmarks/README.md, section "scaling".

    .venv/bin/python -m benchmarks.scaling --threads 1           # 10k … 10M, D=16, K=16, float64
    .venv/bin/python -m benchmarks.scaling --max-n 1000000 --skip-online
    .venv/bin/python -m benchmarks.scaling --dtype float32 --also 16,16,5,0

Prints each part's table and the targets; appends to results/scaling.csv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_gmm.backends.base import StepInfo
from ppl_gmm.backends.em import EM, EMOptions, block_rows_for
from ppl_gmm.backends.online_em import OnlineEM, OnlineEMOptions
from ppl_gmm.config import InitConfig
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture, GMMOptions

from ._common import (
    DTYPES,
    RESULTS,
    Measured,
    add_quiet_options,
    append_csv,
    fmt_n,
    machine,
    maxrss_mb,
    measure_quietly,
    mixture_chunks,
    reset_peak,
    rss_mb,
    run_worker,
    serve_job,
    synthetic,
)

MODULE = "benchmarks.scaling"
INIT_ROWS = 20_000  # k-means++ runs on this many rows
SMALLEST_N = 10_000
ONLINE = [
    (OnlineEMOptions().batch_size, OnlineEMOptions().step_power),
    (4096, 0.6),
    (16384, 0.7),
    (16384, 0.9),
]
ONLINE += [(65536, 0.7)]
ONLINE_HELP = (
    "online EM settings, batch_size:step_power (default: the backend's, then 4096:0.6 16384:0.7 ...)"
)
ITERS_HELP = "the two run lengths timed at N >= 1M (default 2 5); below, both times 1M / N"
CASE = "D,K[,SEP,SEED]"
FALLBACK_HELP = (
    "part 2 again on these where the main data set misses a target (default 8,8,3,2; none if bare)"
)


@dataclass(frozen=True)
class Case:
    """A synthetic data set: D, K, the true means' separation and the seed (data and init)."""

    dim: int
    k: int
    separation: float
    seed: int

    @property
    def label(self) -> str:
        return f"D={self.dim}, K={self.k}, separation {self.separation:g}, seed {self.seed}"

    def columns(self) -> dict[str, Any]:
        return {"dim": self.dim, "k": self.k, "separation": self.separation, "seed": self.seed}


def _online_setting(text: str) -> tuple[int, float]:
    try:
        size, power = text.split(":")
        return int(size), float(power)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BATCH_SIZE:KAPPA, e.g. 16384:0.8, but found {text!r}"
        ) from None


def _case_spec(text: str) -> tuple[int, int, float | None, int | None]:
    parts = text.split(",")
    try:
        if len(parts) == 2:
            return int(parts[0]), int(parts[1]), None, None
        if len(parts) == 4:
            return int(parts[0]), int(parts[1]), float(parts[2]), int(parts[3])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected D,K or D,K,SEPARATION,SEED, e.g. 8,8,3,2, but found {text!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Batch-EM time per iteration as N grows 10x at a time; online EM against batch EM.",
    )
    add = parser.add_argument
    add("--max-n", type=int, default=10_000_000, help="largest N (default 10000000)")
    add("--dim", "-d", type=int, default=16, help="features D (default 16)")
    add("--k", "-k", type=int, default=16, help="components K, true and fitted (default 16)")
    add("--dtype", choices=sorted(DTYPES), default="float64", help="default float64")
    add("--separation", type=float, default=3.0, help="min distance of true means (default 3)")
    add("--seed", type=int, default=7, help="data and k-means++ seed (default 7: see benchmarks/README.md)")
    add("--iters", type=int, nargs=2, default=(2, 5), metavar=("A", "B"), help=ITERS_HELP)
    add("--repeats", type=int, default=3, help="timed A/B pairs per size (default 3)")
    add("--threads", type=int, default=2, help="torch.set_num_threads (default 2; 1 is steadier)")
    add("--skip-scaling", action="store_true", help="leave out part 1")
    add("--skip-online", action="store_true", help="leave out part 2")
    add("--batch-tol", type=float, default=1e-7, help="batch EM tol (default 1e-7)")
    add("--batch-max-iter", type=int, default=50, help="batch EM max_iter (default 50)")
    add("--online", type=_online_setting, nargs="+", metavar="B:KAPPA", default=ONLINE, help=ONLINE_HELP)
    add("--step-offset", type=float, default=2.0, help="online EM t0 (default 2, its default)")
    add("--gap", type=float, default=1e-3, help="target gap per point (default 1e-3)")
    add("--fallback", type=_case_spec, nargs="*", default=[(8, 8, 3.0, 2)], metavar=CASE, help=FALLBACK_HELP)
    add("--fallback-always", action="store_true", help="run the fallback comparisons anyway")
    add(
        "--also",
        type=_case_spec,
        nargs="*",
        default=[],
        metavar=CASE,
        help="part 2 on these too (e.g. 16,16,5,0)",
    )
    add_quiet_options(parser, quiet=0.25, max_wait=5.0)
    add("--out", type=Path, default=RESULTS / "scaling.csv", help="CSV to append to")
    add("--worker", choices=["scaling", "online"], help=argparse.SUPPRESS)
    add("--job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    a, b = args.iters
    if not 0 <= a < b:
        parser.error("--iters: need 0 <= A < B")
    if args.max_n < SMALLEST_N:
        parser.error(f"--max-n: at least {SMALLEST_N}")
    if min(args.repeats, args.threads, args.dim, args.k, args.batch_max_iter) < 1:
        parser.error("--repeats, --threads, --dim, --k and --batch-max-iter must be at least 1")
    for size, power in args.online:
        if size < 1 or not 0.5 < power <= 1.0:
            parser.error(f"--online {size}:{power}: need batch_size >= 1 and 0.5 < kappa <= 1")

    def case(spec: tuple[int, int, float | None, int | None]) -> Case:
        d, k, sep, seed = spec
        return Case(d, k, args.separation if sep is None else sep, args.seed if seed is None else seed)

    args.main_case = Case(args.dim, args.k, args.separation, args.seed)
    args.fallback_cases = [case(spec) for spec in args.fallback]
    args.also_cases = [case(spec) for spec in args.also]
    return args


def sizes(max_n: int) -> list[int]:
    out, n = [], SMALLEST_N
    while n < max_n:
        out.append(n)
        n *= 10
    return [*out, max_n]


def iterations(n: int, iters: tuple[int, int]) -> tuple[int, int]:
    """The run lengths at N = n: ``iters`` at 1M rows and above, scaled up by 1M / n below."""
    scale = max(1, round(1_000_000 / n))
    return iters[0] * scale, iters[1] * scale


# ---- data -----------------------------------------------------------------------------------


def mixture(case: Case) -> dict[str, np.ndarray]:
    """make_synthetic's random mixture (weights, means, covariances), drawn with n=1."""
    return synthetic(1, case.dim, case.k, case.separation, case.seed)[1]


def generate(n: int, truth: dict[str, np.ndarray], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """n points from the mixture, drawn chunk by chunk into one (n, D) tensor: chunk c from its own
    generators, so that each N is a prefix of the larger ones."""
    x = torch.empty((n, truth["means"].shape[1]), dtype=dtype)
    out = x.numpy()
    for start, block in mixture_chunks(truth, n, seed):
        out[start : start + block.shape[0]] = block
    return x


@functools.cache
def make_init(case: Case) -> tuple[dict[str, torch.Tensor], int]:
    """k-means++ parameters from the first INIT_ROWS rows, and how many of the K true means are the
    nearest true mean of some initial mean (K: every true component has an initial mean of its own;
    fewer: batch EM may stop in a local optimum, one component on two clusters and two on one)."""
    truth = mixture(case)
    x = generate(INIT_ROWS, truth, case.seed, torch.float64)
    model = GaussianMixture.from_config(GMMOptions(k=case.k), x)
    init = initialize(model, x, InitConfig(method="kmeans++"), case.seed)
    true_means = torch.from_numpy(truth["means"])
    covered = len(set(torch.cdist(init["means"], true_means).argmin(1).tolist()))
    min_gap = float(torch.pdist(true_means).min()) if case.k > 1 else math.inf
    print(
        f"init ({case.label}): k-means++ on {INIT_ROWS} rows; its means are nearest to {covered} of the "
        f"{case.k} true means (closest true means {min_gap:.1f} apart)"
        + ("" if covered == case.k else " -- WARNING: batch EM may stop in a local optimum")
    )
    return init, covered


# ---- workers (fresh processes) --------------------------------------------------------------


def _worker_data(job: dict) -> tuple[torch.Tensor, GaussianMixture, dict[str, torch.Tensor], dict, float]:
    torch.set_num_threads(job["threads"])
    case = Case(**job["case"])
    truth = mixture(case)
    began = time.perf_counter()
    x = generate(job["n"], truth, case.seed, DTYPES[job["dtype"]])
    seconds = time.perf_counter() - began
    model = GaussianMixture.from_config(GMMOptions(k=case.k), x)
    init = torch.load(job["init"], weights_only=True)
    return x, model, init, truth, seconds


def _timed_pair(job: dict, run: Any, r: int) -> tuple[dict, float]:
    """Repeat r: A and B iterations (B first in odd repeats); its CSV row and B's log-likelihood."""
    a, b = job["iters"]
    order = (a, b) if r % 2 == 0 else (b, a)
    got: dict[int, Measured] = {}
    for iters in order:
        got[iters], infos = measure_quietly(lambda iters=iters: run(iters), job["quiet"], job["max_wait"])
        if iters == b:
            final_ll = infos[-1].log_likelihood
    ma, mb = got[a], got[b]
    ms = 1000 * (mb.seconds - ma.seconds) / (b - a)
    row = {
        "repeat": r + 1,
        "order": f"{order[0]},{order[1]}",
        "seconds_a": ma.seconds,
        "seconds_b": mb.seconds,
        "ms_per_iter": ms,
        "cpu_ms_per_iter": 1000 * (mb.cpu_seconds - ma.cpu_seconds) / (b - a),
        "minflt_per_iter": (mb.minflt - ma.minflt) / (b - a),
        "other_cores_max": max(ma.other_cores, mb.other_cores),
    }
    print(
        f"    N={job['n']:>10,}  repeat {r + 1}: {a} iterations {ma.seconds:7.2f} s, "
        f"{b} iterations {mb.seconds:7.2f} s -> {ms:9.1f} ms/iter (CPU {row['cpu_ms_per_iter']:9.1f})  "
        f"(other processes: {row['other_cores_max']:.2f} cores)",
        flush=True,
    )
    return row, final_ll


def worker_scaling(job: dict) -> dict:
    after_imports = rss_mb()
    x, model, init, _, gen_seconds = _worker_data(job)
    gc.collect()
    peak_before_em = maxrss_mb()  # imports and drawing the data
    after_data = rss_mb()
    peak_reset = reset_peak()

    def run(iters: int) -> list[StepInfo]:
        infos: list[StepInfo] = []
        EM().fit(model, x, init, EMOptions(max_iter=iters, tol=0.0), infos.append)
        return infos

    run(1)  # warm-up
    runs, lls = zip(*(_timed_pair(job, run, r) for r in range(job["repeats"])), strict=True)
    return {
        "runs": list(runs),
        "generate_seconds": gen_seconds,
        "rss_after_imports_mb": after_imports,
        "rss_before_em_mb": after_data,
        "peak_rss_before_em_mb": peak_before_em,
        "peak_reset": peak_reset,
        "peak_rss_mb": maxrss_mb(),
        "data_mb": x.numel() * x.element_size() / 2**20,
        "final_ll": lls[-1],
    }


def _online_setting_run(
    job: dict, model: GaussianMixture, x: torch.Tensor, init: dict, setting: list
) -> dict:
    """One epoch of online EM at (batch_size, step_power), exactly evaluated at the end."""
    size, power = setting
    infos: list[StepInfo] = []
    torch.manual_seed(job["case"]["seed"])  # OnlineEM draws its shuffling seed from torch's generator
    options = OnlineEMOptions(
        batch_size=size, epochs=1, step_power=power, step_offset=job["step_offset"], eval_every=10**9
    )
    got, result = measure_quietly(
        lambda: OnlineEM().fit(model, x, init, options, infos.append), job["quiet"], job["max_wait"]
    )
    ll = infos[-1].log_likelihood
    print(
        f"    online EM batch {size:>6} kappa {power:.2f}: {result.n_steps} steps, "
        f"{result.fit_seconds:6.1f} s "
        f"(with the final evaluation {got.seconds:6.1f} s), log-likelihood {ll:.8f}  "
        f"(other processes: {got.other_cores:.2f} cores)",
        flush=True,
    )
    return {
        "batch_size": size,
        "step_power": power,
        "n_steps": result.n_steps,
        "fit_seconds": result.fit_seconds,
        "wall_seconds": got.seconds,
        "log_likelihood": ll,
        "other_cores_max": got.other_cores,
    }


def worker_online(job: dict) -> dict:
    x, model, init, truth, gen_seconds = _worker_data(job)
    print(f"    drew {x.shape[0]:,} x {x.shape[1]} points in {gen_seconds:.1f} s", flush=True)
    # the exact log-likelihood at the generating parameters: at the global optimum, batch EM's final
    # value exceeds it by about (number of parameters) / (2 N); below it means a local optimum
    at_truth: list[StepInfo] = []
    true_params = {name: torch.from_numpy(value) for name, value in truth.items()}
    EM().fit(model, x, true_params, EMOptions(max_iter=0), at_truth.append)
    batch: list[StepInfo] = []
    options = EMOptions(max_iter=job["batch_max_iter"], tol=job["batch_tol"])
    batch_time, _ = measure_quietly(
        lambda: EM().fit(model, x, init, options, batch.append), job["quiet"], job["max_wait"]
    )
    print(
        f"    batch EM: {len(batch) - 1} iterations in {batch_time.seconds:.1f} s, final log-likelihood "
        f"{batch[-1].log_likelihood:.8f}  (other processes: {batch_time.other_cores:.2f} cores)",
        flush=True,
    )
    return {
        "generate_seconds": gen_seconds,
        "truth_ll": at_truth[0].log_likelihood,
        "batch_seconds": batch_time.seconds,
        "batch_other_cores": batch_time.other_cores,
        "trajectory": [
            {"step": i.step, "wall_seconds": i.wall_seconds, "log_likelihood": i.log_likelihood}
            for i in batch
        ],
        "online": [_online_setting_run(job, model, x, init, setting) for setting in job["online"]],
        "peak_rss_mb": maxrss_mb(),
        "data_mb": x.numel() * x.element_size() / 2**20,
    }


# ---- part 1: scaling ------------------------------------------------------------------------


def _size_summary(got: dict, n: int, previous: dict | None, block_mb: float) -> dict:
    """One size's medians and memory, with its ratios to the previous size."""
    ms = [r["ms_per_iter"] for r in got["runs"]]
    med = statistics.median(ms)
    cpu = statistics.median(r["cpu_ms_per_iter"] for r in got["runs"])
    return {
        "kind": "median",
        "ms_per_iter": med,
        "ms_min": min(ms),
        "ms_max": max(ms),
        "minflt_per_iter": statistics.median(r["minflt_per_iter"] for r in got["runs"]) + 0.0,
        "other_cores_max": max(r["other_cores_max"] for r in got["runs"]),
        "ratio_to_previous": med / previous["ms_per_iter"] if previous else math.nan,
        "cpu_ms_per_iter": cpu,
        "cpu_ratio_to_previous": cpu / previous["cpu_ms_per_iter"] if previous else math.nan,
        "ns_per_point_iter": 1e6 * med / n,
        **{key: got[key] for key in ("data_mb", "rss_after_imports_mb", "rss_before_em_mb")},
        **{key: got[key] for key in ("peak_rss_before_em_mb", "peak_reset", "peak_rss_mb")},
        "extra_mb": got["peak_rss_mb"] - got["rss_before_em_mb"],
        "block_estimate_mb": block_mb,
        "generate_seconds": got["generate_seconds"],
        "final_ll": got["final_ll"],
    }


def _ratio(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}"


def _print_scaling_table(summary: list[dict], repeats: int, block_rows: int, block_mb: float) -> None:
    print(
        f"\n{'N':>5} {'A/B':>7} {'ms/iter':>9} {'min-max':>17} {'x prev':>6} {'ns/pt':>5} {'CPU ms/it':>9} "
        f"{'x prev':>6} {'data MB':>8} {'before EM':>9} {'EM peak':>8} {'extra MB':>8} {'proc peak':>9} "
        f"{'other':>5} {'minflt/it':>9}"
    )
    for s in summary:
        print(
            f"{fmt_n(s['n']):>5} {str(s['iters_a']) + '/' + str(s['iters_b']):>7} {s['ms_per_iter']:>9.1f} "
            f"{s['ms_min']:>8.1f}-{s['ms_max']:<8.1f} {_ratio(s['ratio_to_previous']):>6} "
            f"{s['ns_per_point_iter']:>5.0f} {s['cpu_ms_per_iter']:>9.1f} "
            f"{_ratio(s['cpu_ratio_to_previous']):>6} {s['data_mb']:>8.1f} {s['rss_before_em_mb']:>9.0f} "
            f"{s['peak_rss_mb']:>8.0f} {s['extra_mb']:>8.1f} "
            f"{max(s['peak_rss_mb'], s['peak_rss_before_em_mb']):>9.0f} {s['other_cores_max']:>5.2f} "
            f"{s['minflt_per_iter']:>9.0f}"
        )
    print(
        f"(wall ms per iteration, median of {repeats}, and its range; x prev: ratio to the previous "
        "size; CPU ms/it: the same in process CPU time, which other processes' load distorts less; "
        "before EM: RSS with the data drawn (imports + data); EM peak: ru_maxrss over the EM runs, its mark "
        "reset once the data were drawn; extra = EM peak - before EM: what EM added, against "
        f"~{block_mb:.1f} MB of temporaries per {block_rows}-row block; proc peak: ru_maxrss of the whole "
        "process, drawing the data included; other: most cores other processes kept busy during a timed run)"
    )


def _scaling_verdict(summary: list[dict]) -> str:
    def steps(key: str) -> tuple[str, bool]:
        ratios = [s[key] for s in summary[1:]]
        text = ", ".join(
            f"{fmt_n(p['n'])}->{fmt_n(s['n'])} {s[key]:.2f}x"
            for p, s in zip(summary, summary[1:], strict=False)
        )
        return text, bool(ratios) and all(8 <= r <= 12 for r in ratios)

    wall_text, wall_held = steps("ratio_to_previous")
    cpu_text, cpu_held = steps("cpu_ratio_to_previous")
    worst_extra = max(s["extra_mb"] for s in summary)
    if not all(s["peak_reset"] for s in summary):
        print(
            "note: the peak-RSS mark could not be reset here, so EM peak includes imports and drawing "
            "the data"
        )
    return (
        f"linear scaling, 8-12x per 10x in N (wall time): {wall_text} -> {'HOLDS' if wall_held else 'MISSED'}"
        f"\n  (in CPU time: {cpu_text} -> {'holds' if cpu_held else 'missed'})"
        f"\nmemory: peak RSS during EM = imports + data + at most {worst_extra:.0f} MB at every size "
        f"(data up to {summary[-1]['data_mb']:.0f} MB)"
    )


def part_scaling(args: argparse.Namespace, tmp: Path, init_path: Path, base: dict) -> tuple[list[dict], str]:
    case, dtype = args.main_case, DTYPES[args.dtype]
    # per block and lane: the design (features, centered rows, ones) and the log-joint/responsibilities
    model = GaussianMixture(case.k, case.dim, "full", None)
    block_rows = block_rows_for(model, torch.empty(0, case.dim, dtype=dtype))
    block_mb = block_rows * (model.design_rows() + case.k) * dtype.itemsize / 2**20
    print(
        f"\nPart 1: ms per batch-EM iteration ({case.label}, {args.dtype}), "
        f"{args.repeats} A/B repeats per size, "
        f"A/B = {args.iters[0]}/{args.iters[1]} iterations at N >= 1M, scaled by 1M/N below"
    )
    rows, summary = [], []
    for n in sizes(args.max_n):
        a, b = iterations(n, args.iters)
        job = {"n": n, "case": asdict(case), "dtype": args.dtype, "threads": args.threads, "iters": [a, b]}
        job.update(repeats=args.repeats, init=str(init_path), quiet=args.quiet, max_wait=args.max_wait)
        got = run_worker(MODULE, "scaling", tmp, job)
        common = {**base, **case.columns(), "part": "scaling", "n": n, "iters_a": a, "iters_b": b}
        rows += [{**common, "kind": "run", **r} for r in got["runs"]]
        summary.append({**common, **_size_summary(got, n, summary[-1] if summary else None, block_mb)})
    _print_scaling_table(summary, args.repeats, block_rows, block_mb)
    verdict = _scaling_verdict(summary)
    print(verdict)
    return rows + summary, verdict


# ---- part 2: online against batch EM --------------------------------------------------------


def _batch_time_to(trajectory: list[dict], final: float, gap: float) -> dict | None:
    """The first batch-EM iteration within ``gap`` of its final log-likelihood (None: never)."""
    for i, step in enumerate(trajectory):
        if final - step["log_likelihood"] <= gap:
            previous = trajectory[i - 1]["wall_seconds"] if i > 0 else 0.0
            return {"step": step["step"], "wall_seconds": step["wall_seconds"], "previous_seconds": previous}
    return None


def _print_batch(args: argparse.Namespace, case: Case, n: int, got: dict) -> None:
    trajectory = got["trajectory"]
    final = trajectory[-1]["log_likelihood"]
    per_iter = (trajectory[-1]["wall_seconds"] - trajectory[0]["wall_seconds"]) / max(len(trajectory) - 1, 1)
    n_params = GaussianMixture(case.k, case.dim, "full", None).n_params()
    over_truth = final - got["truth_ll"]
    print(
        f"\nbatch EM: {len(trajectory) - 1} iterations, {trajectory[-1]['wall_seconds']:.1f} s "
        f"({1000 * per_iter:.0f} ms per iteration), final log-likelihood per point {final:.8f}; "
        f"peak RSS {got['peak_rss_mb']:.0f} MB (data {got['data_mb']:.0f} MB)"
    )
    print(
        f"at the true parameters: {got['truth_ll']:.8f}; batch EM's final value is {over_truth:+.2e} "
        "above it "
        f"(at the global optimum about +p/(2N) = {n_params / (2 * n):.1e})"
        + ("" if over_truth > 0 else " -- WARNING: below the truth, so batch EM stopped in a local optimum")
    )
    print(f"{'iter':>5} {'wall s':>8} {'log-lik/pt':>15} {'gap to final':>13}")
    for step in trajectory:
        print(
            f"{step['step']:>5} {step['wall_seconds']:>8.2f} {step['log_likelihood']:>15.8f} "
            f"{final - step['log_likelihood']:>13.2e}"
        )
    within_target = _batch_time_to(trajectory, final, args.gap)
    if within_target:
        print(
            f"batch EM is within {args.gap:g} of its final value from iteration {within_target['step']}, "
            f"at {within_target['wall_seconds']:.1f} s"
        )


ONLINE_HEAD = (
    f"\n{'batch':>6} {'kappa':>5} {'steps':>5} {'log-lik/pt':>15} {'gap':>9} {{within:>6}} {'online s':>8} "
    f"{'+eval s':>8} {'batch it':>8} {'batch s':>8} {'-eval s':>8} {'faster':>6} {'other':>5}"
)
ONLINE_NOTE = (
    "(gap: batch EM's final log-likelihood per point minus online's. online s: online's own clock, its "
    "final exact evaluation left out; +eval s: its wall time with it. batch it / batch s: the first "
    "batch-EM iteration within the same gap and its wall time, which includes evaluating it; -eval s: "
    "batch EM's wall time one iteration earlier, when that θ had been computed but not evaluated. "
    "faster: online wins both comparisons. other: cores other processes kept busy meanwhile)"
)


def _online_row(args: argparse.Namespace, trajectory: list[dict], o: dict) -> dict:
    """One online setting against batch EM, printed; its CSV columns."""
    final = trajectory[-1]["log_likelihood"]
    gap = final - o["log_likelihood"]
    reach = _batch_time_to(trajectory, final, gap)
    within = gap <= args.gap
    if reach is None:  # online ended above batch EM's final value: batch never gets there
        faster = True
        b_iter, b_wall, b_prev = "never", math.nan, math.nan
    else:
        b_iter, b_wall, b_prev = str(reach["step"]), reach["wall_seconds"], reach["previous_seconds"]
        # like for like: both with one exact evaluation of their final θ, and both without it
        faster = o["wall_seconds"] < b_wall and o["fit_seconds"] < b_prev
    print(
        f"{o['batch_size']:>6} {o['step_power']:>5.2f} {o['n_steps']:>5} {o['log_likelihood']:>15.8f} "
        f"{gap:>9.2e} {'yes' if within else 'NO':>6} {o['fit_seconds']:>8.1f} {o['wall_seconds']:>8.1f} "
        f"{b_iter:>8} {b_wall:>8.1f} {b_prev:>8.1f} {'yes' if faster else 'NO':>6} "
        f"{o['other_cores_max']:>5.2f}"
    )
    return {
        **o,
        "step_offset": args.step_offset,
        "gap_to_batch": gap,
        "within_gap": within,
        "batch_iter_to_same_gap": b_iter,
        "batch_seconds_to_same_gap": b_wall,
        "batch_seconds_to_same_gap_without_eval": b_prev,
        "faster": faster,
    }


def part_online(args: argparse.Namespace, tmp: Path, base: dict, case: Case) -> tuple[list[dict], bool, str]:
    n = args.max_n
    print(
        f"\nPart 2: one epoch of online EM against batch EM to convergence (tol {args.batch_tol:g}, at most "
        f"{args.batch_max_iter} iterations), N={fmt_n(n)}, {case.label}, {args.dtype}"
    )
    init, covered = make_init(case)
    init_path = tmp / f"init_{case.dim}_{case.k}_{case.separation:g}_{case.seed}.pt"
    torch.save(init, init_path)
    job = {"n": n, "case": asdict(case), "dtype": args.dtype, "threads": args.threads, "init": str(init_path)}
    job.update(
        batch_tol=args.batch_tol, batch_max_iter=args.batch_max_iter, online=[list(s) for s in args.online]
    )
    job.update(step_offset=args.step_offset, quiet=args.quiet, max_wait=args.max_wait)
    got = run_worker(MODULE, "online", tmp, job)
    trajectory = got["trajectory"]
    final = trajectory[-1]["log_likelihood"]
    per_iter = (trajectory[-1]["wall_seconds"] - trajectory[0]["wall_seconds"]) / max(len(trajectory) - 1, 1)
    common = {**base, **case.columns(), "n": n, "init_covered": covered, "truth_ll": got["truth_ll"]}
    rows = [
        {**common, "part": "batch_em", "kind": "step", **step, "gap_to_final": final - step["log_likelihood"]}
        for step in trajectory
    ]
    _print_batch(args, case, n, got)
    print(ONLINE_HEAD.format(within="<=" + format(args.gap, "g")))
    batch = {
        "batch_final_ll": final,
        "batch_iters": len(trajectory) - 1,
        "batch_ms_per_iter": 1000 * per_iter,
    }
    batch["target_gap"] = args.gap
    online = [
        {**common, "part": "online_em", "kind": "setting", **_online_row(args, trajectory, o), **batch}
        for o in got["online"]
    ]
    rows += online
    print(ONLINE_NOTE)
    passing = [f"{o['batch_size']}:{o['step_power']:g}" for o in online if o["within_gap"] and o["faster"]]
    verdict = f"online EM, N={fmt_n(n)}, {case.label}: within {args.gap:g} of batch EM in less time -> " + (
        f"HOLDS for {', '.join(passing)} ({len(passing)} of {len(got['online'])} settings)"
        if passing
        else f"MISSED by all {len(got['online'])} settings"
    )
    if final - got["truth_ll"] <= 0:
        verdict += " (batch EM in a local optimum: comparison not meaningful)"
    print(verdict)
    return rows, bool(passing), verdict


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return serve_job(args.job, worker_scaling if args.worker == "scaling" else worker_online)
    torch.set_num_threads(args.threads)
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    base = {"timestamp": stamp, "dtype": args.dtype, "threads": args.threads, "torch": torch.__version__}
    print(
        f"scaling: N up to {args.max_n:,}, {args.main_case.label}, full covariance, {args.dtype}, "
        f"threads={args.threads} (torch {torch.__version__}, {machine()})"
    )
    began = time.perf_counter()
    rows: list[dict] = []
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scaling_") as name:
        tmp = Path(name)
        if not args.skip_scaling:
            init_path = tmp / "init_scaling.pt"
            torch.save(make_init(args.main_case)[0], init_path)
            got, verdict = part_scaling(args, tmp, init_path, base)
            rows += got
            verdicts.append(verdict)
        if not args.skip_online:
            got, passed, verdict = part_online(args, tmp, base, args.main_case)
            rows += got
            verdicts.append(verdict)
            cases = list(args.also_cases)
            if args.fallback_always or not passed:
                cases += [c for c in args.fallback_cases if c != args.main_case and c not in cases]
            for case in cases:
                got, _, verdict = part_online(args, tmp, base, case)
                rows += got
                verdicts.append(verdict)
    append_csv(args.out, rows)
    print("\nTargets:")
    for verdict in verdicts:
        print("  " + verdict.replace("\n", "\n  "))
    print(f"\nwrote {args.out}  ({time.perf_counter() - began:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
