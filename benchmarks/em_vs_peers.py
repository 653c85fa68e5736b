"""Our Gaussian mixture's EM against scikit-learn (numpy and array API) and pomegranate: ms per EM
iteration from the same data and initial parameters, with the GEMM floor, our peak memory and the
issue's targets. Method and history: benchmarks/README.md, section "em_vs_peers".

    .venv/bin/python -m benchmarks.em_vs_peers            # 10k,2,3  100k,8,8  1M,16,16 (15-25 min)
    .venv/bin/python -m benchmarks.em_vs_peers --quick    # 10k,2,3  100k,8,8

Prints a table per configuration, then the targets; writes results/em_vs_peers.csv (overwritten).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_gmm.backends.em import EM, EMOptions
from ppl_gmm.config import InitConfig
from ppl_gmm.init import initialize
from ppl_gmm.models.gmm import GaussianMixture

from ._common import (
    DTYPES,
    MALLOC_ENV,
    REPO,
    RESULTS,
    LineWorker,
    Measured,
    add_quiet_options,
    fmt_n,
    machine,
    measure,
    peak_rss_mb,
    reexec_with_malloc_env,
    run_worker,
    serve_job,
    settle,
    synthetic,
)

MODULE = "benchmarks.em_vs_peers"
SIZES_HELP = "default 10000,2,3 100000,8,8 1000000,16,16"
MALLOC_HELP = "run with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + " (default)"
QUICK_MAX_N = 100_000
TARGET_MIN_N = 100_000  # the speed targets concern its table's sizes
REG_COVAR = 1e-6
SEPARATION = 4.0  # as benchmarks/svi_overhead
PEERS = ("sklearn", "sklearn-array-api", "pomegranate")
LABELS = {
    "ours": "ours (ppl_gmm EM)",
    "sklearn": "scikit-learn numpy",
    "sklearn-array-api": "scikit-learn array API (torch)",
    "pomegranate": "pomegranate",
}


@dataclass(frozen=True)
class Size:
    n: int
    d: int
    k: int

    @property
    def label(self) -> str:
        return f"{fmt_n(self.n)},{self.d},{self.k}"


def _size(text: str) -> Size:
    try:
        n, d, k = (int(part.replace("_", "")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,D,K (e.g. 100000,8,8), got {text!r}") from None
    if n < 2 or d < 1 or k < 1 or k > n:
        raise argparse.ArgumentTypeError(f"need N >= 2, D >= 1 and 1 <= K <= N, got {text!r}")
    return Size(n, d, k)


DEFAULT_SIZES = [Size(10_000, 2, 3), Size(100_000, 8, 8), Size(1_000_000, 16, 16)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="ms per EM iteration: ours against scikit-learn (numpy, array API) and pomegranate.",
    )
    add = parser.add_argument
    add("--sizes", type=_size, nargs="+", default=DEFAULT_SIZES, metavar="N,D,K", help=SIZES_HELP)
    add("--quick", action="store_true", help=f"only the sizes with N <= {QUICK_MAX_N}")
    add("--covariance", nargs="+", choices=("full", "diag"), default=["full", "diag"])
    add("--dtype", nargs="+", choices=tuple(DTYPES), default=["float64", "float32"])
    lengths = {"type": int, "nargs": 2, "metavar": ("A", "B")}
    add("--iters", **lengths, default=(3, 23), help="A < B, the run lengths timed (default 3 23)")
    add("--iters-large", **lengths, default=(1, 3), help="the run lengths where N >= --large (default 1 3)")
    add("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    add("--repeats-large", type=int, default=3, help="repeats where N >= --large (default 3)")
    add("--large", type=int, default=1_000_000, help="what N counts as large (default 1e6)")
    add("--threads", type=int, nargs="+", default=(1, 2), help="ours' thread settings, fastest kept (1 2)")
    add(
        "--peer-threads", type=int, nargs="+", default=(1, 2), help="the peers' thread settings (default 1 2)"
    )
    add("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    add("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    add("--seed", type=int, default=0, help="data and k-means++ seed (default 0)")
    add_quiet_options(parser, quiet=0.5, max_wait=0.1)
    add("--min-run-time", type=float, default=0.2, help="shorter runs are repeated, fastest kept (0.2 s)")
    add("--malloc-env", action=argparse.BooleanOptionalAction, default=True, help=MALLOC_HELP)
    add("--out", type=Path, default=RESULTS / "em_vs_peers.csv", help="CSV to write (overwritten)")
    add("--worker", choices=("array-api", "memory"), help=argparse.SUPPRESS)
    add("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.quick:
        args.sizes = [s for s in args.sizes if s.n <= QUICK_MAX_N]
        if not args.sizes:
            parser.error(f"--quick: no size with N <= {QUICK_MAX_N}")
    for name in ("iters", "iters_large"):
        a, b = getattr(args, name)
        if not 1 <= a < b:
            parser.error(f"--{name.replace('_', '-')}: need 1 <= A < B")
    if min(args.repeats, args.repeats_large, *args.threads, *args.peer_threads) < 1:
        parser.error("--repeats, --repeats-large, --threads and --peer-threads must be >= 1")
    args.threads = tuple(sorted(set(args.threads)))
    args.peer_threads = tuple(sorted(set(args.peer_threads)))
    return args


# ---- the contenders ---------------------------------------------------------------------------

Run = tuple[Measured, float | None]  # the timing, and the final mean log-likelihood when asked


def sklearn_inits(init: dict[str, torch.Tensor], covariance: str) -> dict[str, np.ndarray]:
    """weights_init, means_init, precisions_init (float64) in the covariance type's native shapes."""
    cov = init["covariances"].numpy()
    if covariance == "full":
        prec = np.linalg.inv(cov)
        prec = 0.5 * (prec + np.swapaxes(prec, 1, 2))
    else:
        prec = 1.0 / np.diagonal(cov, axis1=1, axis2=2)
    return {"weights": init["weights"].numpy(), "means": init["means"].numpy(), "precisions": prec}


def run_ours(model: GaussianMixture, x: torch.Tensor, init: dict, iters: int, threads: int) -> Run:
    torch.set_num_threads(threads)
    last: list[float] = []
    options = EMOptions(max_iter=iters, tol=0.0, reg_covar=REG_COVAR)
    measured, _ = measure(
        lambda: EM().fit(model, x, init, options, report=lambda info: last.append(info.log_likelihood))
    )
    return measured, last[-1]  # the log-likelihood at the parameters after `iters` M-steps


def _sk_mixture(k: int, covariance: str, iters: int, inits: dict, **extra: Any) -> Any:
    """scikit-learn's GaussianMixture started from ``inits``, with our tol and reg_covar."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    start = {f"{name}_init": inits[name] for name in ("weights", "means", "precisions")}
    options = {"covariance_type": covariance, "tol": 0.0, "reg_covar": REG_COVAR, "max_iter": iters}
    return SkGaussianMixture(k, **options, **start, random_state=0, **extra)


def _sk_fit(gm: Any, x: Any, want_ll: bool) -> Run:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        measured, _ = measure(lambda: gm.fit(x))
    return measured, float(gm.score(x)) if want_ll else None


def run_sklearn(
    x: np.ndarray, k: int, covariance: str, inits: dict, iters: int, threads: int, want_ll: bool
) -> Run:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return _sk_fit(_sk_mixture(k, covariance, iters, inits), x, want_ll)


def run_pomegranate(
    x: torch.Tensor, covariance: str, init: dict, iters: int, threads: int, want_ll: bool
) -> Run:
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel

    torch.set_num_threads(threads)
    cov = init["covariances"]
    if covariance == "diag":
        cov = torch.diagonal(cov, dim1=1, dim2=2)

    def fit() -> GeneralMixtureModel:
        # building the model is a fixed cost, which cancels
        dists = [
            Normal(means=init["means"][j].clone(), covs=cov[j].clone(), covariance_type=covariance)
            for j in range(init["means"].shape[0])
        ]
        gmm = GeneralMixtureModel(dists, priors=init["weights"].clone(), max_iter=iters, tol=-math.inf)
        return gmm.to(x.dtype).fit(x)

    measured, gmm = measure(fit)
    ll = float(gmm.log_probability(x).double().mean()) if want_ll else None
    return measured, ll


def start_array_api() -> tuple[LineWorker | None, str]:
    """scikit-learn in array-API mode in its own process (SCIPY_ARRAY_API=1 before any import), or
    None and why not."""
    command = [sys.executable, "-m", MODULE, "--worker", "array-api"]
    worker = LineWorker("array-API worker", command, dict(os.environ, SCIPY_ARRAY_API="1"), REPO)
    hello = worker.read()
    if hello.get("available"):
        return worker, ""
    worker.close()
    return None, hello.get("reason", "")


def run_array_api(worker: LineWorker, **command: Any) -> Run:
    reply = worker.ask(command)
    if "error" in reply:
        raise RuntimeError(reply["error"])
    return Measured(**{key: reply[key] for key in Measured._fields}), reply["ll"]


def _array_api_worker() -> int:
    protocol = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol

    def send(obj: dict) -> None:
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    try:
        import sklearn
        import sklearn.mixture  # noqa: F401

        sklearn.set_config(array_api_dispatch=True)
    except Exception as exc:  # noqa: BLE001  (whatever fails, array-API mode is unavailable here)
        send({"available": False, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        return 0
    send({"available": True})
    cache: dict[tuple[str, str], torch.Tensor] = {}
    for line in sys.stdin:
        try:
            measured, ll = _array_api_fit(json.loads(line), cache)
            send({**measured._asdict(), "ll": ll})
        except Exception as exc:  # noqa: BLE001  (reported to the parent, which carries on)
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def _array_api_fit(cmd: dict, cache: dict[tuple[str, str], torch.Tensor]) -> Run:
    dtype = DTYPES[cmd["dtype"]]
    key = (cmd["data"], cmd["dtype"])
    if key not in cache:
        if len(cache) >= 2:  # both dtypes of one data set at most
            cache.clear()
        cache[key] = torch.from_numpy(np.load(cmd["data"])).to(dtype)
    x = cache[key] if cmd.get("rows") is None else cache[key][: cmd["rows"]]
    inits = {name: torch.from_numpy(v).to(dtype) for name, v in np.load(cmd["init"]).items()}
    torch.set_num_threads(cmd["threads"])
    # "random_from_data" only to pass the array-API check: all three *_init are given, so it is unused
    gm = _sk_mixture(cmd["k"], cmd["covariance"], cmd["iters"], inits, init_params="random_from_data")
    return _sk_fit(gm, x, bool(cmd.get("score")))


def _memory_worker(job: dict) -> dict:
    """Peak memory of one EM fit in a fresh process."""
    torch.set_num_threads(job["threads"])
    after_imports = peak_rss_mb()
    x = torch.from_numpy(np.load(job["data"]))
    data_mb = x.numel() * x.element_size() / 2**20
    init = {
        name: torch.from_numpy(np.load(job["init"])[name]) for name in ("weights", "means", "covariances")
    }
    model = GaussianMixture(job["k"], x.shape[1], job["covariance"], None)
    options = EMOptions(max_iter=job["iters"], tol=0.0, reg_covar=REG_COVAR)
    EM().fit(model, x, init, options, report=lambda info: None)
    peak = peak_rss_mb()
    result = {"rss_after_imports_mb": after_imports, "data_mb": data_mb, "peak_rss_mb": peak}
    return {**result, "peak_ratio": peak / (after_imports + data_mb)}


def measure_memory(tmp: Path, job: dict[str, Any]) -> dict:
    try:
        return run_worker(MODULE, "memory", tmp, job)
    except RuntimeError as exc:
        return {"error": str(exc)}


# ---- the GEMM floor ---------------------------------------------------------------------------


def gemm_rate(m: int, kk: int, n: int, dtype: torch.dtype, threads: int, budget: float = 0.05) -> float:
    """GFLOP/s of torch.mm (m, kk) @ (kk, n) on ``threads`` threads: the best of 7 timed batches."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, kk, dtype=dtype, generator=gen)
    b = torch.randn(kk, n, dtype=dtype, generator=gen)
    out = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=out)
    began = time.perf_counter()
    torch.mm(a, b, out=out)
    reps = max(1, int(budget / max(time.perf_counter() - began, 1e-7)))
    best = math.inf
    for _ in range(7):
        began = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        best = min(best, (time.perf_counter() - began) / reps)
    return 2.0 * m * kk * n / best / 1e9


class GemmRates:
    """The best plain-GEMM rate seen so far per dtype, over ``threads`` settings and measurements."""

    def __init__(self, dtypes: list[str], threads: tuple[int, ...]) -> None:
        self.dtypes, self.threads = dtypes, threads
        self.best: dict[str, float] = dict.fromkeys(dtypes, 0.0)
        self.best_threads: dict[str, int] = {}

    def update(self) -> None:
        for name in self.dtypes:
            for t in self.threads:
                rate = gemm_rate(1024, 1024, 1024, DTYPES[name], t)
                if rate > self.best[name]:
                    self.best[name], self.best_threads[name] = rate, t

    def em_shapes(self, size: Size, name: str, block: int = 4096) -> float:
        """GFLOP/s of the GEMM form's two products on a row block (equal flops each): the data
        against the stacked inverse Cholesky factors (B, D) @ (D, K·D), and the M-step's outer
        products (K·D, B) @ (B, D); at the best thread setting."""
        t = self.best_threads.get(name, max(self.threads))
        t1 = 1.0 / gemm_rate(block, size.d, size.k * size.d, DTYPES[name], t)
        t2 = 1.0 / gemm_rate(size.k * size.d, block, size.d, DTYPES[name], t)
        return 2.0 / (t1 + t2)


def floor_ms(size: Size, gflops: float) -> float:
    return 4.0 * size.n * size.k * size.d**2 / (gflops * 1e9) * 1000


# ---- timing one configuration -----------------------------------------------------------------


@dataclass
class Contender:
    impl: str
    dtype: str
    threads: tuple[int, ...]
    run: Callable[[int, int, bool, int | None], Run]  # (iters, threads, want_ll, rows)
    note: str = ""
    chosen: int | None = None
    tried: dict[int, float] = field(default_factory=dict)  # median ms per iteration per setting
    runs: list[dict] = field(default_factory=list)
    ll: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Config:
    """One configuration: a size and covariance type, its run lengths A < B and its repeats."""

    size: Size
    covariance: str
    a: int
    b: int
    repeats: int


@dataclass
class Bench:
    """What the configurations of one run share."""

    args: argparse.Namespace
    tmp: Path
    peers: list[str]
    worker: LineWorker | None
    rates: GemmRates
    stamp: str
    summary: dict[tuple[str, str, str, str], dict] = field(default_factory=dict)  # (size, cov, dtype, impl)


@dataclass(frozen=True)
class Data:
    """One size's data: tensors per dtype and the .npy files the worker processes read."""

    xs: dict[str, torch.Tensor]
    paths: dict[str, Path]
    seconds: float


def _progress(text: str) -> None:
    """What is being timed, on one line of a terminal's stderr (nothing when stderr is a file)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{text}")
        sys.stderr.flush()


def _fmt_ms(ms: float | None) -> str:
    if ms is None or not math.isfinite(ms):
        return "—"
    return f"{ms:.0f}" if abs(ms) >= 100 else f"{ms:.1f}" if abs(ms) >= 10 else f"{ms:.2f}"


def _rel(a: float | None, b: float | None) -> float:
    return math.nan if a is None or b is None else abs(a - b) / abs(b)


def _error(exc: Exception) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0]


def _fastest_run(c: Contender, iters: int, threads: int, want_ll: bool, args: argparse.Namespace) -> tuple:
    """A run of ``iters`` iterations, repeated until ``--min-run-time`` is spent (at most 10 runs):
    the fastest, and how many ran. Preemption only ever adds time, so the minimum of a few short
    runs is robust where one run is not."""
    spent, best, count = 0.0, None, 0
    settle(args.quiet, args.max_wait)  # fast: the objects of the imports are frozen (see main)
    while count < 10 and (count == 0 or spent < args.min_run_time):
        want = want_ll and c.ll is None
        measured, ll = c.run(iters, threads, want, None)
        if want:
            c.ll = ll
        spent, count = spent + measured.seconds, count + 1
        if best is None or measured.seconds < best.seconds:
            best = measured
    return best, count


def time_pair(c: Contender, a: int, b: int, threads: int, flip: bool, args: argparse.Namespace) -> dict:
    """Runs of A and B iterations (B first when ``flip``); the final log-likelihood is kept from the
    first B run."""
    for _ in range(3):  # a B run faster than its A run was disturbed: both are run again
        got = {n_it: _fastest_run(c, n_it, threads, n_it == b, args) for n_it in ((b, a) if flip else (a, b))}
        if got[b][0].seconds > got[a][0].seconds:
            break
    (ma, count_a), (mb, count_b) = got[a], got[b]
    return {
        "threads": threads,
        "seconds_a": ma.seconds,
        "seconds_b": mb.seconds,
        "runs_a": count_a,
        "runs_b": count_b,
        "ms_per_iter": 1000 * (mb.seconds - ma.seconds) / (b - a),
        "minflt_per_iter": (mb.minflt - ma.minflt) / (b - a),
        "other_cores_max": max(ma.other_cores, mb.other_cores),
    }


ARRAY_API_NOTE = "own process, SCIPY_ARRAY_API=1; started from our parameters via *_init"


def _contenders(
    bench: Bench, cfg: Config, model: GaussianMixture, data: Data, init: dict, inits: dict, init_path: Path
) -> list[Contender]:
    args, peers, k, cov = bench.args, bench.peers, cfg.size.k, cfg.covariance

    def ours(x: torch.Tensor) -> Callable:
        return lambda it, t, want, rows: run_ours(model, x[:rows], init, it, t)

    def sklearn(x: np.ndarray) -> Callable:
        return lambda it, t, want, rows: run_sklearn(x[:rows], k, cov, inits, it, t, want)

    def array_api(name: str) -> Callable:
        job = {
            "data": str(data.paths[name]),
            "init": str(init_path),
            "dtype": name,
            "k": k,
            "covariance": cov,
        }
        return lambda it, t, want, rows: run_array_api(
            bench.worker, **job, iters=it, threads=t, score=want, rows=rows
        )

    def pomegranate(x: torch.Tensor) -> Callable:
        return lambda it, t, want, rows: run_pomegranate(x[:rows], cov, init, it, t, want)

    out = [Contender("ours", name, args.threads, ours(data.xs[name])) for name in args.dtype]
    if "sklearn" in peers and "float64" in args.dtype:
        out.append(Contender("sklearn", "float64", args.peer_threads, sklearn(data.xs["float64"].numpy())))
    for name in args.dtype:
        if "sklearn-array-api" in peers:
            out.append(
                Contender("sklearn-array-api", name, args.peer_threads, array_api(name), ARRAY_API_NOTE)
            )
        if "pomegranate" in peers:
            out.append(
                Contender("pomegranate", name, args.peer_threads, pomegranate(data.xs[name]), "no reg_covar")
            )
    return out


def _warm_up(contenders: list[Contender], size: Size) -> None:
    """Code paths, thread pools, lazy imports: untimed."""
    for c in contenders:
        for t in c.threads:
            try:
                c.run(1, t, False, min(size.n, 20_000))
            except Exception as exc:  # noqa: BLE001
                c.error = _error(exc)


def _time_repeats(args: argparse.Namespace, cfg: Config, contenders: list[Contender]) -> None:
    """Every contender at every thread setting in every repeat; the contenders' order rotates, the
    settings' and the A/B order alternate."""
    for r in range(cfg.repeats):
        shift = r % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            if c.error:
                continue
            for t in c.threads if r % 2 == 0 else c.threads[::-1]:
                _progress(
                    f"{cfg.size.label} {cfg.covariance}: repeat {r + 1}/{cfg.repeats}, "
                    f"{LABELS[c.impl]} {c.dtype} at {t} thread(s)"
                )
                try:
                    pair = time_pair(c, cfg.a, cfg.b, t, r % 2 == 1, args)
                except Exception as exc:  # noqa: BLE001
                    c.error = _error(exc)
                    break
                c.runs.append({"repeat": r + 1, **pair})
    _progress("")


def _choose_threads(contenders: list[Contender]) -> None:
    """Each contender keeps the thread setting with the fastest median."""
    for c in contenders:
        for run in c.runs:
            run["used"] = False
        if c.error or not c.runs:
            continue
        c.tried = {
            t: statistics.median(run["ms_per_iter"] for run in c.runs if run["threads"] == t)
            for t in c.threads
        }
        c.chosen = min(c.tried, key=c.tried.get)
        for run in c.runs:
            run["used"] = run["threads"] == c.chosen


def _memory(bench: Bench, cfg: Config, contenders: list[Contender], data: Data, init_path: Path) -> dict:
    """Our peak memory per dtype, each in a fresh process at the chosen thread setting."""
    if bench.args.no_memory:
        return {}
    job = {"init": str(init_path), "k": cfg.size.k, "covariance": cfg.covariance, "iters": cfg.a}
    return {
        c.dtype: measure_memory(bench.tmp, {**job, "data": str(data.paths[c.dtype]), "threads": c.chosen})
        for c in contenders
        if c.impl == "ours" and c.chosen is not None
    }


def run_config(bench: Bench, cfg: Config, data: Data) -> list[dict]:
    """Times one configuration and prints its table; its CSV rows (the timed pairs, then the medians)."""
    args, size = bench.args, cfg.size
    model = GaussianMixture(size.k, size.d, cfg.covariance, None)
    began = time.perf_counter()
    init = initialize(
        model, data.xs["float64"], InitConfig(method="kmeans++", reg_covar=REG_COVAR), args.seed
    )
    init_seconds = time.perf_counter() - began
    inits = sklearn_inits(init, cfg.covariance)
    init_path = bench.tmp / "init.npz"
    np.savez(init_path, **inits, covariances=init["covariances"].numpy())
    bench.rates.update()
    em_rates = {name: bench.rates.em_shapes(size, name) for name in bench.rates.dtypes}
    print(
        f"\n== N={size.n:,} D={size.d} K={size.k} {cfg.covariance} ==  iterations {cfg.a}->{cfg.b}, "
        f"{cfg.repeats} repeat(s); data {data.seconds:.1f} s, k-means++ init {init_seconds:.1f} s"
    )
    contenders = _contenders(bench, cfg, model, data, init, inits, init_path)
    _warm_up(contenders, size)
    _time_repeats(args, cfg, contenders)
    _choose_threads(contenders)
    memory = _memory(bench, cfg, contenders, data, init_path)
    medians = _summarize(bench, cfg, contenders, em_rates, memory)
    return [_row(bench.stamp, cfg, c, "run", **run) for c in contenders for run in c.runs] + medians


def run_size(bench: Bench, size: Size) -> list[dict]:
    args = bench.args
    large = size.n >= args.large
    a, b = args.iters_large if large else args.iters
    repeats = args.repeats_large if large else args.repeats
    began = time.perf_counter()
    x64 = torch.from_numpy(synthetic(size.n, size.d, size.k, SEPARATION, args.seed)[0])
    xs = {"float64": x64, "float32": x64.to(torch.float32)}
    paths = {name: bench.tmp / f"x_{size.n}_{size.d}_{size.k}_{name}.npy" for name in args.dtype}
    for name, path in paths.items():
        np.save(path, xs[name].numpy())
    data = Data(xs, paths, time.perf_counter() - began)
    return [
        row for cov in args.covariance for row in run_config(bench, Config(size, cov, a, b, repeats), data)
    ]


# ---- reporting --------------------------------------------------------------------------------


def _row(stamp: str, cfg: Config, c: Contender, kind: str, **values: Any) -> dict:
    where = {"timestamp": stamp, "kind": kind, "n": cfg.size.n, "d": cfg.size.d, "k": cfg.size.k}
    what = {"covariance": cfg.covariance, "dtype": c.dtype, "implementation": c.impl}
    return {**where, **what, "iters_a": cfg.a, "iters_b": cfg.b, **values}


TABLE_HEAD = (
    f"  {'implementation':<31}{'dtype':<8}{'thr':>3}{'ms/iter':>9}  {'min–max':<13}{'ours ×':>7}"
    f"  {'median by threads':<28}{'final mean log-lik.':>20}  {'vs sklearn':>10}{'faults/it':>10}{'busy':>6}"
)


def _median_row(bench: Bench, cfg: Config, c: Contender, meds: dict, sk_ll: float | None) -> dict:
    """A contender's line of the table, and its median row (kept in ``bench.summary`` too)."""
    chosen_runs = [run for run in c.runs if run["used"]]
    thr = str(c.chosen) if c.chosen is not None else "—"
    values = [run["ms_per_iter"] for run in chosen_runs]
    ms = meds.get((c.impl, c.dtype), math.nan)
    lo, hi = (min(values), max(values)) if values else (math.nan, math.nan)
    faults = statistics.median([run["minflt_per_iter"] for run in chosen_runs]) if chosen_runs else math.nan
    other = max((run["other_cores_max"] for run in chosen_runs), default=math.nan)
    tried = " / ".join(f"{t}t {_fmt_ms(v)}" for t, v in sorted(c.tried.items()))
    rel = _rel(c.ll, sk_ll)
    speed = ms / meds.get(("ours", c.dtype), math.nan)
    if c.error:
        print(f"  {LABELS[c.impl]:<31}{c.dtype:<8}  failed: {c.error}")
    else:
        ll_text = f"{c.ll:.12f}" if c.ll is not None else "—"
        print(
            f"  {LABELS[c.impl]:<31}{c.dtype:<8}{thr:>3}{_fmt_ms(ms):>9}  "
            f"{_fmt_ms(lo) + '–' + _fmt_ms(hi):<13}{speed:>7.2f}  {tried:<28}{ll_text:>20}  {rel:>10.1e}"
            f"{faults:>10.0f}{other:>6.2f}"
        )
    row = _row(bench.stamp, cfg, c, "median", threads=thr, ms_per_iter_by_threads=tried)
    row.update(repeats=len(chosen_runs), ms_per_iter=ms, ms_min=lo, ms_max=hi, minflt_per_iter=faults)
    row.update(other_cores_max=other, final_ll=c.ll, ll_rel_diff_vs_sklearn=rel, ours_speedup=speed)
    row["note"] = c.error or c.note
    bench.summary[(cfg.size.label, cfg.covariance, c.dtype, c.impl)] = row
    return row


def _ours_line(bench: Bench, cfg: Config, name: str, meds: dict, em_rates: dict, memory: dict) -> None:
    """Ours in ``name`` against the fastest peer, the floor, itself in the other precision; its memory."""
    ours_ms = meds[("ours", name)]
    peer_ms = {impl: v for (impl, dtype), v in meds.items() if dtype == name and impl != "ours"}
    row = bench.summary[(cfg.size.label, cfg.covariance, name, "ours")]
    parts = []
    if peer_ms:
        fastest = min(peer_ms, key=peer_ms.get)
        row.update(
            fastest_peer=fastest,
            fastest_peer_ms=peer_ms[fastest],
            speedup_vs_fastest_peer=peer_ms[fastest] / ours_ms,
        )
        parts.append(f"{peer_ms[fastest] / ours_ms:.2f}× the speed of the fastest peer ({fastest})")
    if "sklearn" in peer_ms:
        row["speedup_vs_sklearn_numpy"] = peer_ms["sklearn"] / ours_ms
    rate = bench.rates.best[name]
    row.update(gemm_gflops=rate, gemm_em_shapes_gflops=em_rates.get(name))
    if cfg.covariance == "full":
        fl = floor_ms(cfg.size, rate)
        row.update(floor_ms=fl, ratio_to_floor=ours_ms / fl)
        parts.append(f"{ours_ms / fl:.2f}× the GEMM floor ({_fmt_ms(fl)} ms at {rate:.0f} GFLOP/s)")
    if name == "float32" and ("ours", "float64") in meds:
        row["f32_speedup"] = meds[("ours", "float64")] / ours_ms
        parts.append(f"{row['f32_speedup']:.2f}× our float64")
    mem = memory.get(name)
    if mem and "error" not in mem:
        row.update(mem)
        parts.append(
            f"peak RSS {mem['peak_rss_mb']:.0f} MB = {mem['peak_ratio']:.2f}× (after imports "
            f"{mem['rss_after_imports_mb']:.0f} MB + data {mem['data_mb']:.0f} MB)"
        )
    elif mem:
        parts.append(f"memory measurement failed: {mem['error']}")
    print(f"  ours {name}: " + "; ".join(parts))


def _summarize(
    bench: Bench, cfg: Config, contenders: list[Contender], em_rates: dict, memory: dict
) -> list[dict]:
    """Prints the configuration's table; returns its median rows."""
    meds: dict[tuple[str, str], float] = {}
    for c in contenders:
        values = [run["ms_per_iter"] for run in c.runs if run["used"]]
        if values and not c.error:
            meds[(c.impl, c.dtype)] = statistics.median(values)
    sk_ll = next((c.ll for c in contenders if c.impl == "sklearn"), None)
    print(TABLE_HEAD)
    rows = [_median_row(bench, cfg, c, meds, sk_ll) for c in contenders]
    for name in [n for n in ("float64", "float32") if ("ours", n) in meds]:
        _ours_line(bench, cfg, name, meds, em_rates, memory)
    return rows


def _floors_at_best_rate(summary: dict, rates: GemmRates) -> None:
    for (_, covariance, name, impl), row in summary.items():
        if impl == "ours" and covariance == "full" and "ratio_to_floor" in row:
            row["gemm_gflops"] = rates.best[name]
            row["floor_ms"] = floor_ms(Size(row["n"], row["d"], row["k"]), rates.best[name])
            row["ratio_to_floor"] = row["ms_per_iter"] / row["floor_ms"]


def _targets(args: argparse.Namespace, summary: dict) -> list[tuple[str, float | None, str, float]]:
    """The issue's speed targets: (what, this run's value or None, ">=" or "<=", bound)."""
    big, mid, fastest, f64, f32 = "1M,16,16", "100k,8,8", "speedup_vs_fastest_peer", "float64", "float32"
    wanted = [  # (what, size, covariance, dtype, column of ours' median row, op, bound)
        (f"{big} full f64: ours vs the fastest f64 peer", big, "full", f64, fastest, ">=", 6.0),
        (f"{big} full f64: ours / GEMM floor", big, "full", f64, "ratio_to_floor", "<=", 2.5),
        (f"{mid} full f64: ours vs the fastest f64 peer", mid, "full", f64, fastest, ">=", 1.8),
        (
            f"{mid} full f64: ours vs scikit-learn numpy",
            mid,
            "full",
            f64,
            "speedup_vs_sklearn_numpy",
            ">=",
            4.0,
        ),
    ]
    labels = [s.label for s in args.sizes if s.n >= TARGET_MIN_N]
    for label, cov in itertools.product(labels, args.covariance):
        wanted.append((f"{label} {cov}: ours f32 vs ours f64", label, cov, f32, "f32_speedup", ">=", 1.6))
        wanted.append(
            (f"{label} {cov} f32: ours vs the fastest f32 peer", label, cov, f32, fastest, ">=", 3.0)
        )
    if "diag" in args.covariance:
        for label, name in itertools.product(labels, args.dtype):
            what = f"{label} diag f{name[-2:]}: ours vs the fastest peer"
            wanted.append((what, label, "diag", name, fastest, ">=", 1.5))

    def value(size: str, cov: str, dtype: str, key: str) -> float | None:
        got = summary.get((size, cov, dtype, "ours"), {}).get(key)
        return None if isinstance(got, float) and math.isnan(got) else got

    checks = [(what, value(*where), op, bound) for what, *where, op, bound in wanted]
    diffs = [
        row["ll_rel_diff_vs_sklearn"]
        for (_, _, dtype, impl), row in summary.items()
        if impl == "ours" and dtype == f64 and not math.isnan(row.get("ll_rel_diff_vs_sklearn", math.nan))
    ]
    what = "final log-lik., ours f64 vs scikit-learn (worst config)"
    return [*checks, (what, max(diffs, default=None), "<=", 1e-8)]


def _print_targets(args: argparse.Namespace, summary: dict, rates: GemmRates) -> None:
    print(
        "\nThe issue's speed targets on this run's medians (GEMM floor at the best rate seen: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.best.items())
        + "):"
    )
    for what, value, op, bound in _targets(args, summary):
        if value is None:
            print(f"  n/a   {what} (not measured in this run)")
            continue
        ok = value >= bound if op == ">=" else value <= bound
        shown = f"{value:.1e}" if bound < 1e-3 else f"{value:.2f}"
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {shown} (target {op} {bound:g})")


# ---- main -------------------------------------------------------------------------------------


def _versions_and_peers(args: argparse.Namespace) -> tuple[dict[str, str], list[str], list[str]]:
    """Library versions, the peers that can run here, and notes on those that cannot."""
    import sklearn

    versions = {"torch": torch.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__}
    notes: list[str] = []
    peers = list(args.peers)
    if "pomegranate" in peers:
        try:
            from importlib.metadata import version

            import pomegranate  # noqa: F401

            versions["pomegranate"] = version("pomegranate")
            if not versions["pomegranate"].startswith("1.1."):
                notes.append(f"pomegranate {versions['pomegranate']} is not 1.1.x")
            notes.append("pomegranate has no reg_covar: its final log-likelihood differs slightly")
        except ImportError:
            peers.remove("pomegranate")
            notes.append(
                "pomegranate: not installed, skipped (.venv/bin/pip install pomegranate==1.1.2, after "
                "checking with --dry-run that it keeps this torch)"
            )
    return versions, peers, notes


def _array_api_or_note(peers: list[str], notes: list[str]) -> LineWorker | None:
    """The array-API worker, when that peer is wanted and available (else it leaves ``peers``)."""
    if "sklearn-array-api" not in peers:
        return None
    worker, reason = start_array_api()
    if worker is None:
        notes.append(f"scikit-learn array-API mode: unavailable ({reason}), skipped")
        peers.remove("sklearn-array-api")
    else:
        notes.append(
            "scikit-learn array-API mode allows only init_params 'random'/'random_from_data': "
            "'random_from_data' is passed to get past that check, but weights_init, means_init "
            "and precisions_init are all given, so it starts from our parameters"
        )
    return worker


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw_argv)
    if args.worker == "array-api":
        return _array_api_worker()
    if args.worker == "memory":
        return serve_job(args.job, _memory_worker)
    if args.malloc_env:
        reexec_with_malloc_env(MODULE, raw_argv)
    malloc_env = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "unset"
    started = time.perf_counter()
    versions, peers, notes = _versions_and_peers(args)
    worker = _array_api_or_note(peers, notes)
    gc.collect()
    gc.freeze()  # the ~360k objects of the imports (numba, sympy, ...) made each collection take 0.2 s
    rates = GemmRates(sorted(set(args.dtype) | {"float64"}), args.threads)
    rates.update()
    print(
        f"em_vs_peers: ours at torch threads {list(args.threads)}, peers at {list(args.peer_threads)} "
        f"(fastest kept); {', '.join(f'{k} {v}' for k, v in versions.items())}; malloc env {malloc_env}; "
        f"{machine()}"
    )
    print(
        "GEMM rate at start (1024³ torch.mm, best of 7): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s ({rates.best_threads[k]}t)" for k, v in rates.best.items())
    )
    for note in notes:
        print(f"note: {note}")
    stamp = dt.datetime.now().isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="em_vs_peers_") as tmp:
        bench = Bench(args, Path(tmp), peers, worker, rates, stamp)
        try:
            rows = [row for size in args.sizes for row in run_size(bench, size)]
        finally:
            if worker is not None:
                worker.close()
    _floors_at_best_rate(bench.summary, rates)
    _print_targets(args, bench.summary, rates)
    import pandas as pd

    from ppl_gmm.runs import write_csv

    meta = {"malloc_env": malloc_env, **{f"version_{k}": v for k, v in versions.items()}}
    write_csv(args.out, pd.DataFrame([{**row, **meta} for row in rows]))
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
