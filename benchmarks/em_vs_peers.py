"""Our EM against its peers: milliseconds per EM iteration from the same data and initial parameters.

For each size (N, D, K), covariance type (full, diag) and dtype (float64, float32), on the same
synthetic data (``ppl_gmm.data.make_synthetic``) and from the same initial parameters (k-means++
seeding on the data, ``ppl_gmm.init.initialize``), this times

  ours                 ``EM().fit(model, x, init, EMOptions(max_iter=n, tol=0))`` with data and init
                       in the dtype, at torch threads t for each t of ``--threads``
  sklearn              scikit-learn ``GaussianMixture`` on numpy float64 arrays (float64 only),
                       started from weights_init / means_init / precisions_init (native shapes of the
                       covariance type), tol=0, reg_covar=1e-6, max_iter=n, inside
                       ``threadpoolctl.threadpool_limits(t)`` for each t of ``--peer-threads``
  sklearn-array-api    the same on torch tensors with ``sklearn.set_config(array_api_dispatch=True)``,
                       in a separate process started with ``SCIPY_ARRAY_API=1`` (driven over a pipe,
                       so its runs interleave with the others), float64 and float32, torch threads t.
                       Array-API mode accepts only ``init_params`` "random" or "random_from_data";
                       "random_from_data" is passed to get past that check, and since all three
                       ``*_init`` are given, scikit-learn never uses it and starts from ours (the
                       final log-likelihoods agree with the numpy run to rounding).
  pomegranate          ``GeneralMixtureModel`` of initialised ``Normal`` distributions (pomegranate
                       1.1.x, when installed), ``tol=-inf``, ``max_iter=n``, ``.to(dtype)``, torch
                       threads t. pomegranate has no ``reg_covar``, so its log-likelihood differs at
                       the 1e-8 level.

Each is run for two lengths A < B; ms per iteration = (t_B - t_A) / (B - A), so fixed costs (set-up,
validation, our initial E-step, scikit-learn's final E-step) cancel; a run shorter than
``--min-run-time`` is repeated and its fastest time kept (``runs_a``, ``runs_b``); a pair whose B
run was not slower than its A run was disturbed, and is run again (at most three times in all).
Repeats are interleaved (the order of the implementations rotates, the A/B order alternates) and
medians reported. By default the timed difference is 20 iterations below ``--large``. With 5
(3 -> 8), our float32 at N = 100k was a difference of only ~15-30 ms. In one run on the README's
AMD machine its repeats then ranged over 0.87-3.31 ms per iteration (D = K = 8, diag) and
5.33-6.82 (full).

Thread settings: every implementation, ours included, is timed at each of its settings in every
repeat (the settings' order alternates between repeats) and keeps the setting with the fastest median
(column ``thr``; column ``median by threads`` gives each setting's median ms per iteration; CSV rows
``kind=run`` carry ``used`` for the chosen setting's runs). Choosing on the measure that is reported,
in the same interleaved repeats, replaced short probes before the timed runs: on a noisy 2-core
machine a probe of one or two iterations picked the slower setting for our float64 and float32 at
N = 100k, D = K = 8 in successive runs (two lanes were 1.15-1.4x faster per iteration when timed
interleaved), and any probe that sums run times counts fixed costs, such as starting our lanes' worker
threads, that a longer fit pays once. Before each timed run the script waits (at most ``--max-wait``
s) for other processes to go quiet, and records how many cores they kept busy (``other_cores_max``,
column ``busy``) and the minor page faults per iteration (``minflt_per_iter``, from ``getrusage``;
for array-API mode, its own process's). Where N >= ``--large``, ``--iters-large`` and
``--repeats-large`` apply.

The GEMM floor is 4·N·K·D² flops (E-step quadratic forms and M-step outer products) at the rate of a
plain 1024×1024×1024 ``torch.mm`` in that dtype, measured on the spot: at start-up and again before
each configuration, at each of ``--threads``, best of several batches, and the best rate seen so far
is used. (The rates of the EM-shaped GEMMs, (4096, D) @ (D, K·D) and (K·D, 4096) @ (4096, D), are
written to the CSV for reference; at small D they are far below the peak.) Full covariances only.

Peak memory of ours is measured in a fresh process per configuration (``--worker memory``): it
imports what a fit needs, records its peak resident memory ("after imports"), loads the data from a
.npy file in the configuration's dtype, runs ``EM`` for A iterations at the chosen thread setting
and records the peak again ("peak"); ``peak_ratio`` = peak / (after imports + data size). The peak
is VmHWM from /proc/self/status, not ``getrusage().ru_maxrss``, which Linux carries over fork and
exec (the worker would report this process's peak, ~2.7 GB after generating the 1M data set).

    .venv/bin/python -m benchmarks.em_vs_peers            # 10k,2,3  100k,8,8  1M,16,16
    .venv/bin/python -m benchmarks.em_vs_peers --quick    # 10k,2,3  100k,8,8

The script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=2**30`` and ``MALLOC_TRIM_THRESHOLD_=2**31``
(``--no-malloc-env`` leaves the environment alone). They matter for the peers, not for ours: at
N = 1M, D = K = 16 without them glibc hands scikit-learn's and pomegranate's large temporaries back
to the OS after each use, and pomegranate paid ~3.6 million minor page faults per iteration (about
3x slower), scikit-learn ~40 thousand; ours, which reuses its block buffers, paid none either way
(see ``minflt_per_iter``). Results are written (overwritten) to benchmarks/results/em_vs_peers.csv:
one row per timed pair (``kind=run``, every thread setting) and one per configuration and
implementation (``kind=median``, at the chosen setting). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import resource
import statistics
import subprocess
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
from ppl_gmm.models.gmm import GaussianMixture, make_synthetic

from ._common import Measured, machine, measure, wait_until_quiet

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "em_vs_peers.csv"
DEFAULT_SIZES = ("10000,2,3", "100000,8,8", "1000000,16,16")
QUICK_MAX_N = 100_000
TARGET_MIN_N = 100_000  # the speed targets concern its table's sizes
REG_COVAR = 1e-6
SEPARATION = 4.0  # as benchmarks/svi_overhead
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**31)}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
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
        if self.n % 1_000_000 == 0:
            n = f"{self.n // 1_000_000}M"
        elif self.n % 1000 == 0:
            n = f"{self.n // 1000}k"
        else:
            n = str(self.n)
        return f"{n},{self.d},{self.k}"


def _size(text: str) -> Size:
    try:
        n, d, k = (int(part.replace("_", "")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,D,K (e.g. 100000,8,8), got {text!r}") from None
    if n < 2 or d < 1 or k < 1 or k > n:
        raise argparse.ArgumentTypeError(f"need N >= 2, D >= 1 and 1 <= K <= N, got {text!r}")
    return Size(n, d, k)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.em_vs_peers",
        description="ms per EM iteration: ours against scikit-learn (numpy, array API) and pomegranate.",
    )
    parser.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=[_size(s) for s in DEFAULT_SIZES],
        metavar="N,D,K",
        help="sizes (default 10000,2,3 100000,8,8 1000000,16,16)",
    )
    parser.add_argument("--quick", action="store_true", help=f"only the sizes with N <= {QUICK_MAX_N}")
    parser.add_argument("--covariance", nargs="+", choices=("full", "diag"), default=["full", "diag"])
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["float64", "float32"])
    parser.add_argument(
        "--iters",
        type=int,
        nargs=2,
        default=(3, 23),
        metavar=("A", "B"),
        help="the two run lengths whose difference is timed (default 3 23)",
    )
    parser.add_argument(
        "--iters-large",
        type=int,
        nargs=2,
        default=(1, 3),
        metavar=("A", "B"),
        help="run lengths where N >= --large (default 1 3)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--repeats-large", type=int, default=3, help="repeats where N >= --large (default 3)")
    parser.add_argument("--large", type=int, default=1_000_000, help="what N counts as large (default 1e6)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=(1, 2),
        help="torch thread settings tried for ours; the fastest is kept (default 1 2)",
    )
    parser.add_argument(
        "--peer-threads",
        type=int,
        nargs="+",
        default=(1, 2),
        help="thread settings tried for each peer; the fastest is kept (default 1 2)",
    )
    parser.add_argument(
        "--peers",
        nargs="+",
        choices=("sklearn", "sklearn-array-api", "pomegranate"),
        default=["sklearn", "sklearn-array-api", "pomegranate"],
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--seed", type=int, default=0, help="data and k-means++ seed (default 0)")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.5,
        help="before each timed run, wait until other processes keep fewer than this many cores busy",
    )
    parser.add_argument("--max-wait", type=float, default=0.1, help="... but at most this many seconds")
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=0.2,
        help="a run shorter than this is repeated (up to 10 runs) and its fastest time kept (default 0.2 s)",
    )
    parser.add_argument(
        "--malloc-env",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + " (the default; "
        "without them the peers pay millions of page faults per iteration at N = 1M)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV to write (overwritten)")
    parser.add_argument("--worker", choices=("array-api", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
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


# ---- measuring ------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process image: VmHWM from /proc/self/status. Not
    ``getrusage().ru_maxrss``: Linux carries that over fork and exec, so a worker started by this
    (large) process would report the parent's peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


def run_sklearn(
    x: np.ndarray, k: int, covariance: str, inits: dict, iters: int, threads: int, want_ll: bool
) -> Run:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture as SkGaussianMixture
    from threadpoolctl import threadpool_limits

    gm = SkGaussianMixture(
        k,
        covariance_type=covariance,
        tol=0.0,
        reg_covar=REG_COVAR,
        max_iter=iters,
        weights_init=inits["weights"],
        means_init=inits["means"],
        precisions_init=inits["precisions"],
        random_state=0,
    )
    with threadpool_limits(limits=threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        measured, _ = measure(lambda: gm.fit(x))
        ll = float(gm.score(x)) if want_ll else None
    return measured, ll


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


class ArrayApiWorker:
    """scikit-learn in array-API mode in its own process (SCIPY_ARRAY_API=1 before any import)."""

    def __init__(self) -> None:
        env = dict(os.environ, SCIPY_ARRAY_API="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.em_vs_peers", "--worker", "array-api"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        hello = self._read()
        self.available: bool = bool(hello.get("available"))
        self.reason: str = hello.get("reason", "")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the array-API worker exited (code {self.proc.poll()})")
        return json.loads(line)

    def call(self, **command: Any) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _array_api_worker() -> int:
    protocol = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol

    def send(obj: dict) -> None:
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    try:
        import sklearn
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        sklearn.set_config(array_api_dispatch=True)
    except Exception as exc:  # noqa: BLE001  (whatever fails, array-API mode is unavailable here)
        send({"available": False, "reason": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        return 0
    send({"available": True})
    cache: dict[tuple[str, str], torch.Tensor] = {}
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
            dtype = DTYPES[cmd["dtype"]]
            key = (cmd["data"], cmd["dtype"])
            if key not in cache:
                if len(cache) >= 2:  # both dtypes of one data set at most
                    cache.clear()
                cache[key] = torch.from_numpy(np.load(cmd["data"])).to(dtype)
            x = cache[key] if cmd.get("rows") is None else cache[key][: cmd["rows"]]
            inits = {name: torch.from_numpy(v).to(dtype) for name, v in np.load(cmd["init"]).items()}
            torch.set_num_threads(cmd["threads"])
            gm = SkGaussianMixture(
                cmd["k"],
                covariance_type=cmd["covariance"],
                tol=0.0,
                reg_covar=REG_COVAR,
                max_iter=cmd["iters"],
                weights_init=inits["weights"],
                means_init=inits["means"],
                precisions_init=inits["precisions"],
                init_params="random_from_data",  # only to pass the array-API check; unused
                random_state=0,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                measured, _ = measure(lambda: gm.fit(x))  # noqa: B023
            ll = float(gm.score(x)) if cmd.get("score") else None
            send({**measured._asdict(), "ll": ll})
        except Exception as exc:  # noqa: BLE001  (reported to the parent, which carries on)
            send({"error": f"{type(exc).__name__}: {exc}"})
    return 0


def _memory_worker(job_path: str) -> int:
    """Peak memory of one EM fit in a fresh process (see the module docs)."""
    job = json.loads(Path(job_path).read_text())
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
    print(json.dumps({**result, "peak_ratio": peak / (after_imports + data_mb)}))
    return 0


def measure_memory(tmp: Path, **job: Any) -> dict:
    path = tmp / "memory_job.json"
    path.write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.em_vs_peers", "--worker", "memory", "--job", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


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


# ---- one configuration ------------------------------------------------------------------------


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


def time_pair(c: Contender, a: int, b: int, threads: int, flip: bool, args) -> dict:
    """Runs of A and B iterations (B first when ``flip``). A run shorter than ``--min-run-time`` is
    repeated until that much time is spent (at most 10 runs) and its fastest time kept: preemption
    only ever adds time, so the minimum of a few short runs is robust where one run is not. The
    final log-likelihood is kept from the first B run."""
    for _ in range(3):  # a B run faster than its A run was disturbed: both are run again
        got: dict[int, Measured] = {}
        count: dict[int, int] = {}
        for n_it in (b, a) if flip else (a, b):
            spent, best, count[n_it] = 0.0, None, 0
            gc.collect()  # fast: the objects of the imports are frozen (see main)
            wait_until_quiet(args.quiet, args.max_wait)
            while count[n_it] < 10 and (count[n_it] == 0 or spent < args.min_run_time):
                want = c.ll is None and n_it == b
                measured, ll = c.run(n_it, threads, want, None)
                if want:
                    c.ll = ll
                spent += measured.seconds
                count[n_it] += 1
                if best is None or measured.seconds < best.seconds:
                    best = measured
            got[n_it] = best
        if got[b].seconds > got[a].seconds:
            break
    ma, mb = got[a], got[b]
    return {
        "threads": threads,
        "seconds_a": ma.seconds,
        "seconds_b": mb.seconds,
        "runs_a": count[a],
        "runs_b": count[b],
        "ms_per_iter": 1000 * (mb.seconds - ma.seconds) / (b - a),
        "minflt_per_iter": (mb.minflt - ma.minflt) / (b - a),
        "other_cores_max": max(ma.other_cores, mb.other_cores),
    }


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker == "array-api":
        return _array_api_worker()
    if args.worker == "memory":
        return _memory_worker(args.job)
    if args.malloc_env and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        sys.stdout.flush()
        env = dict(os.environ, **MALLOC_ENV)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.em_vs_peers", *raw_argv], env)
    malloc_env = " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "unset"
    started = time.perf_counter()

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
    worker: ArrayApiWorker | None = None
    if "sklearn-array-api" in peers:
        worker = ArrayApiWorker()
        if worker.available:
            notes.append(
                "scikit-learn array-API mode allows only init_params 'random'/'random_from_data': "
                "'random_from_data' is passed to get past that check, but weights_init, means_init "
                "and precisions_init are all given, so it starts from our parameters"
            )
        else:
            notes.append(f"scikit-learn array-API mode: unavailable ({worker.reason}), skipped")
            worker.close()
            worker = None
            peers.remove("sklearn-array-api")

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
    rows: list[dict] = []
    summary: dict[tuple[str, str, str, str], dict] = {}  # (size label, cov, dtype, impl) -> median row
    tmp_dir = tempfile.TemporaryDirectory(prefix="em_vs_peers_")
    tmp = Path(tmp_dir.name)
    try:
        for size in args.sizes:
            large = size.n >= args.large
            a, b = args.iters_large if large else args.iters
            repeats = args.repeats_large if large else args.repeats
            began = time.perf_counter()
            rng = np.random.default_rng(np.random.SeedSequence([args.seed, 1]))
            x_np = np.ascontiguousarray(make_synthetic(size.n, size.d, size.k, SEPARATION, rng)[0])
            xs = {"float64": torch.from_numpy(x_np)}
            xs["float32"] = xs["float64"].to(torch.float32)
            data_paths = {}
            for name in args.dtype:
                data_paths[name] = tmp / f"x_{size.n}_{size.d}_{size.k}_{name}.npy"
                np.save(data_paths[name], xs[name].numpy())
            data_seconds = time.perf_counter() - began
            for covariance in args.covariance:
                model = GaussianMixture(size.k, size.d, covariance, None)
                began = time.perf_counter()
                init_cfg = InitConfig(method="kmeans++", reg_covar=REG_COVAR)
                init = initialize(model, xs["float64"], init_cfg, args.seed)
                init_seconds = time.perf_counter() - began
                inits = sklearn_inits(init, covariance)
                init_path = tmp / "init.npz"
                np.savez(init_path, **inits, covariances=init["covariances"].numpy())
                rates.update()
                em_rates = {name: rates.em_shapes(size, name) for name in rates.dtypes}
                print(
                    f"\n== N={size.n:,} D={size.d} K={size.k} {covariance} ==  iterations {a}->{b}, "
                    f"{repeats} repeat(s); data {data_seconds:.1f} s, k-means++ init {init_seconds:.1f} s"
                )
                contenders = _contenders(
                    args, peers, size, covariance, model, xs, init, inits, worker, data_paths, init_path
                )
                for c in contenders:  # warm-up (code paths, thread pools, lazy imports), untimed
                    for t in c.threads:
                        try:
                            c.run(1, t, False, min(size.n, 20_000))
                        except Exception as exc:  # noqa: BLE001
                            c.error = _error(exc)
                for r in range(repeats):
                    shift = r % len(contenders)
                    for c in contenders[shift:] + contenders[:shift]:
                        if c.error:
                            continue
                        for t in c.threads if r % 2 == 0 else c.threads[::-1]:
                            _progress(
                                f"{size.label} {covariance}: repeat {r + 1}/{repeats}, "
                                f"{LABELS[c.impl]} {c.dtype} at {t} thread(s)"
                            )
                            try:
                                pair = time_pair(c, a, b, t, r % 2 == 1, args)
                            except Exception as exc:  # noqa: BLE001
                                c.error = _error(exc)
                                break
                            c.runs.append({"repeat": r + 1, **pair})
                _progress("")
                for c in contenders:  # each keeps its fastest setting
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
                memory = {}
                if not args.no_memory:
                    for c in contenders:
                        if c.impl == "ours" and c.chosen is not None:
                            memory[c.dtype] = measure_memory(
                                tmp,
                                data=str(data_paths[c.dtype]),
                                init=str(init_path),
                                k=size.k,
                                covariance=covariance,
                                iters=a,
                                threads=c.chosen,
                            )
                medians = _summarize(
                    stamp, size, covariance, a, b, contenders, rates, em_rates, memory, summary
                )
                for c in contenders:
                    rows.extend(_row(stamp, size, covariance, c, a, b, "run", **run) for run in c.runs)
                rows.extend(medians)  # the same dicts as in `summary`
    finally:
        if worker is not None:
            worker.close()
        tmp_dir.cleanup()

    for (_, covariance, name, impl), row in summary.items():  # floors at the best rate of the run
        if impl == "ours" and covariance == "full" and "ratio_to_floor" in row:
            row["gemm_gflops"] = rates.best[name]
            row["floor_ms"] = floor_ms(_size(f"{row['n']},{row['d']},{row['k']}"), rates.best[name])
            row["ratio_to_floor"] = row["ms_per_iter"] / row["floor_ms"]
    _print_targets(args, summary, rates)
    import pandas as pd

    from ppl_gmm.runs import write_csv

    meta = {"malloc_env": malloc_env, **{f"version_{k}": v for k, v in versions.items()}}
    write_csv(args.out, pd.DataFrame([{**row, **meta} for row in rows]))
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s in all)")
    return 0


def _contenders(
    args, peers, size, covariance, model, xs, init, inits, worker, data_paths, init_path
) -> list[Contender]:
    out: list[Contender] = []
    for name in args.dtype:
        x = xs[name]
        out.append(
            Contender(
                "ours",
                name,
                args.threads,
                run=lambda it, t, want, rows, x=x: run_ours(model, x[:rows], init, it, t),
            )
        )
    if "sklearn" in peers and "float64" in args.dtype:
        x_np = xs["float64"].numpy()
        out.append(
            Contender(
                "sklearn",
                "float64",
                args.peer_threads,
                run=lambda it, t, want, rows: run_sklearn(
                    x_np[:rows], size.k, covariance, inits, it, t, want
                ),
            )
        )
    for name in args.dtype:
        if "sklearn-array-api" in peers:

            def run_aa(it, t, want, rows, name=name):
                reply = worker.call(
                    data=str(data_paths[name]),
                    init=str(init_path),
                    dtype=name,
                    k=size.k,
                    covariance=covariance,
                    iters=it,
                    threads=t,
                    score=want,
                    rows=rows,
                )
                return Measured(**{key: reply[key] for key in Measured._fields}), reply["ll"]

            out.append(
                Contender(
                    "sklearn-array-api",
                    name,
                    args.peer_threads,
                    run=run_aa,
                    note="own process, SCIPY_ARRAY_API=1; started from our parameters via *_init",
                )
            )
        if "pomegranate" in peers:
            x = xs[name]
            out.append(
                Contender(
                    "pomegranate",
                    name,
                    args.peer_threads,
                    run=lambda it, t, want, rows, x=x: run_pomegranate(
                        x[:rows], covariance, init, it, t, want
                    ),
                    note="no reg_covar",
                )
            )
    return out


def _row(stamp, size: Size, covariance: str, c: Contender, a: int, b: int, kind: str, **values) -> dict:
    return {
        "timestamp": stamp,
        "kind": kind,
        "n": size.n,
        "d": size.d,
        "k": size.k,
        "covariance": covariance,
        "dtype": c.dtype,
        "implementation": c.impl,
        "iters_a": a,
        "iters_b": b,
        **values,
    }


def _summarize(stamp, size, covariance, a, b, contenders, rates, em_rates, memory, summary) -> list[dict]:
    """Medians per implementation; prints the configuration's table; returns the median rows."""
    meds: dict[tuple[str, str], float] = {}
    for c in contenders:
        values = [run["ms_per_iter"] for run in c.runs if run["used"]]
        if values and not c.error:
            meds[(c.impl, c.dtype)] = statistics.median(values)
    sk_ll = next((c.ll for c in contenders if c.impl == "sklearn"), None)
    print(
        f"  {'implementation':<31}{'dtype':<8}{'thr':>3}{'ms/iter':>9}  {'min–max':<13}{'ours ×':>7}"
        f"  {'median by threads':<28}{'final mean log-lik.':>20}  {'vs sklearn':>10}"
        f"{'faults/it':>10}{'busy':>6}"
    )
    out_rows = []
    for c in contenders:
        key = (c.impl, c.dtype)
        chosen_runs = [run for run in c.runs if run["used"]]
        thr = str(c.chosen) if c.chosen is not None else "—"
        values = [run["ms_per_iter"] for run in chosen_runs]
        ms = meds.get(key, math.nan)
        lo, hi = (min(values), max(values)) if values else (math.nan, math.nan)
        faults = (
            statistics.median([run["minflt_per_iter"] for run in chosen_runs]) if chosen_runs else math.nan
        )
        other = max((run["other_cores_max"] for run in chosen_runs), default=math.nan)
        tried = " / ".join(f"{t}t {_fmt_ms(v)}" for t, v in sorted(c.tried.items()))
        rel = _rel(c.ll, sk_ll)
        ours_ms = meds.get(("ours", c.dtype), math.nan)
        speed = ms / ours_ms
        if c.error:
            print(f"  {LABELS[c.impl]:<31}{c.dtype:<8}  failed: {c.error}")
        else:
            ll_text = f"{c.ll:.12f}" if c.ll is not None else "—"
            print(
                f"  {LABELS[c.impl]:<31}{c.dtype:<8}{thr:>3}{_fmt_ms(ms):>9}  "
                f"{_fmt_ms(lo) + '–' + _fmt_ms(hi):<13}{speed:>7.2f}  {tried:<28}{ll_text:>20}  {rel:>10.1e}"
                f"{faults:>10.0f}{other:>6.2f}"
            )
        row = {
            "timestamp": stamp,
            "kind": "median",
            "n": size.n,
            "d": size.d,
            "k": size.k,
            "covariance": covariance,
            "dtype": c.dtype,
            "implementation": c.impl,
            "iters_a": a,
            "iters_b": b,
            "threads": thr,
            "ms_per_iter_by_threads": tried,
            "repeats": len(chosen_runs),
            "ms_per_iter": ms,
            "ms_min": lo,
            "ms_max": hi,
            "minflt_per_iter": faults,
            "other_cores_max": other,
            "final_ll": c.ll,
            "ll_rel_diff_vs_sklearn": rel,
            "ours_speedup": speed,
            "note": c.error or c.note,
        }
        summary[(size.label, covariance, c.dtype, c.impl)] = row
        out_rows.append(row)
    # ours against the fastest peer, the floor, itself in the other precision; its memory
    for name in [n for n in ("float64", "float32") if ("ours", n) in meds]:
        ours_ms = meds[("ours", name)]
        peer_ms = {impl: v for (impl, dtype), v in meds.items() if dtype == name and impl != "ours"}
        row = summary[(size.label, covariance, name, "ours")]
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
        rate = rates.best[name]
        row.update(gemm_gflops=rate, gemm_em_shapes_gflops=em_rates.get(name))
        if covariance == "full":
            fl = floor_ms(size, rate)
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
    return out_rows


def _print_targets(args, summary, rates: GemmRates) -> None:
    """The issue's speed targets, evaluated on this run's medians (floors at the best rate seen)."""
    checks: list[tuple[str, float | None, str, float]] = []

    def check(what: str, size: str, cov: str, dtype: str, key: str, op: str, bound: float) -> None:
        row = summary.get((size, cov, dtype, "ours"))
        value = None if row is None else row.get(key)
        if isinstance(value, float) and math.isnan(value):
            value = None
        checks.append((what, value, op, bound))

    big, mid = "1M,16,16", "100k,8,8"
    check(f"{big} full f64: ours vs the fastest f64 peer", big, "full", "float64", "speedup_vs_fastest_peer",
          ">=", 6.0)  # fmt: skip
    check(f"{big} full f64: ours / GEMM floor", big, "full", "float64", "ratio_to_floor", "<=", 2.5)
    check(f"{mid} full f64: ours vs the fastest f64 peer", mid, "full", "float64", "speedup_vs_fastest_peer",
          ">=", 1.8)  # fmt: skip
    check(f"{mid} full f64: ours vs scikit-learn numpy", mid, "full", "float64", "speedup_vs_sklearn_numpy",
          ">=", 4.0)  # fmt: skip
    labels = [s.label for s in args.sizes if s.n >= TARGET_MIN_N]
    for label in labels:
        for cov in args.covariance:
            check(f"{label} {cov}: ours f32 vs ours f64", label, cov, "float32", "f32_speedup", ">=", 1.6)
            check(f"{label} {cov} f32: ours vs the fastest f32 peer", label, cov, "float32",
                  "speedup_vs_fastest_peer", ">=", 3.0)  # fmt: skip
    if "diag" in args.covariance:
        for label in labels:
            for name in args.dtype:
                check(f"{label} diag f{name[-2:]}: ours vs the fastest peer", label, "diag", name,
                      "speedup_vs_fastest_peer", ">=", 1.5)  # fmt: skip
    diffs = [
        row["ll_rel_diff_vs_sklearn"]
        for (_, _, dtype, impl), row in summary.items()
        if impl == "ours"
        and dtype == "float64"
        and not math.isnan(row.get("ll_rel_diff_vs_sklearn", math.nan))
    ]
    checks.append(
        ("final log-lik., ours f64 vs scikit-learn (worst config)", max(diffs, default=None), "<=", 1e-8)
    )
    print(
        "\nThe issue's speed targets on this run's medians (GEMM floor at the best rate seen: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.best.items())
        + "):"
    )
    for what, value, op, bound in checks:
        if value is None:
            print(f"  n/a   {what} (not measured in this run)")
            continue
        ok = value >= bound if op == ">=" else value <= bound
        shown = f"{value:.1e}" if bound < 1e-3 else f"{value:.2f}"
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {shown} (target {op} {bound:g})")


if __name__ == "__main__":
    raise SystemExit(main())
