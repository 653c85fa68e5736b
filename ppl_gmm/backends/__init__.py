"""Inference backends, found by name in ``BACKENDS``; importing this package registers them all."""

from . import em, map, svi
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
    "map",
    "svi",
]
