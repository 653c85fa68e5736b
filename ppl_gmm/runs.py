"""The experiment directory: unique names, atomic writes, reading back. No pickle anywhere."""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

__all__ = [
    "Files",
    "Summary",
    "best_backend_dir",
    "create_experiment_dir",
    "read_summary",
    "save_tensors",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_summary",
    "write_text",
]


class Files:
    """The names in an experiment directory (SPEC.md): its own files, then each backend folder's."""

    CONFIG = "config.yaml"  # the resolved config
    DATA = "data.json"  # what the data were
    INIT = "init.safetensors"  # the initial parameters every backend started from
    TRUTH = "truth.safetensors"  # simulated data: the generating parameters
    SAMPLE = "sample.safetensors"  # x: up to 5000 train points, for figures
    COMPARISON = "comparison.csv"
    SUMMARY = "summary.json"
    METRICS = "metrics.csv"
    PARAMS = "params.safetensors"
    ASSIGNMENTS = "assignments.csv"
    POSTERIOR = "posterior.safetensors"  # <name>.mean and <name>.std of a posterior
    GUIDE = "guide.safetensors"  # svi: the fitted guide's Pyro parameters, by param-store name

    @staticmethod
    def tensors(stem: str) -> str:
        return f"{stem}.safetensors"


@dataclass(frozen=True)
class Summary:
    """A backend run's ``summary.json``: the fields of the interface contract, then ``extras``
    (the backend's own fields, and the comparison's once every backend has run)."""

    backend: str
    model: str
    status: str  # completed | failed | interrupted
    error: str | None
    n_steps: int
    converged: bool
    fit_seconds: float  # the kept restart's
    fit_seconds_all_restarts: float | None = None  # every restart's, summed
    train_log_likelihood: float | None = None
    test_log_likelihood: float | None = None
    bic: float | None = None
    aic: float | None = None
    icl: float | None = None
    n_params: int | None = None
    ari: float | None = None
    nmi: float | None = None
    point_estimate: str | None = None  # mle | map | posterior_mean | posterior_median
    elbo: float | None = None
    # what the backend maximizes, per point (experiment.target_of): log_likelihood,
    # log_posterior or elbo; null for a sampler; and its final value
    target: str | None = None
    target_value: float | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"
    threads: int | None = None  # torch threads of the fit and the scoring
    versions: Mapping[str, str] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        """A contract field or an extra by name."""
        if name != "extras" and name in self.__dataclass_fields__:
            return getattr(self, name)
        return self.extras.get(name, default)

    def to_json(self) -> dict[str, Any]:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extras"}
        return {**fields, **self.extras}


def write_summary(backend_dir: Path, summary: Summary) -> None:
    write_json(backend_dir / Files.SUMMARY, summary.to_json())


def create_experiment_dir(runs_dir: Path, experiment: str) -> Path:
    """``runs_dir/<experiment>-<YYYYmmdd-HHMMSS>-<6 hex>``, created exclusively, so two runs
    started in the same second never share a directory."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    while True:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = runs_dir / f"{experiment}-{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def _file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process's umask (which can only be
    read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename into place; the file gets the
    permissions of an ordinary new file (mkstemp's own are 0o600, private to the owner)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    """JSON with non-finite numbers written as null, so every reader can parse it."""
    write_text(path, json.dumps(_finite(dict(value)), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_text(path, frame.to_csv(index=False))


def save_tensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """safetensors of float64 CPU tensors."""
    clean = {name: value.detach().to("cpu", torch.float64).contiguous() for name, value in tensors.items()}
    write_bytes(path, safetensors_bytes(clean))


def read_summary(backend_dir: Path) -> dict[str, Any] | None:
    """The summary of a backend directory, or None when missing or unreadable."""
    try:
        value = json.loads((backend_dir / Files.SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def best_backend_dir(experiment_dir: Path) -> Path | None:
    """The completed backend with the highest train log-likelihood in an experiment directory."""
    best: tuple[float, Path] | None = None
    for child in sorted(p for p in experiment_dir.iterdir() if p.is_dir()):
        summary = read_summary(child)
        if not summary or summary.get("status") != "completed":
            continue
        score = summary.get("train_log_likelihood")
        if not isinstance(score, int | float) or not (child / Files.PARAMS).is_file():
            continue
        if best is None or score > best[0]:
            best = (float(score), child)
    return None if best is None else best[1]
