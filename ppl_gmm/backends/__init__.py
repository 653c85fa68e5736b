"""Inference backends, found by name in ``BACKENDS``; importing this package registers them all."""

from . import em, incremental_em, map, mcmc, online_em, svi, vb
from .base import BACKENDS, Backend, FitError, FitResult, Options, Report, StepInfo

__all__ = [
    "BACKENDS",
    "Backend",
    "FitError",
    "FitResult",
    "Options",
    "Report",
    "StepInfo",
    "em",
    "incremental_em",
    "map",
    "mcmc",
    "online_em",
    "svi",
    "vb",
]
