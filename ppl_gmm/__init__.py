"""ppl-gmm: exact EM, MAP and variational inference compared on one Pyro-declared mixture.

The Python API (``run``, ``Mixture``, ``load``, ``assign``) is imported on first use, so that
``import ppl_gmm`` (and the command line's ``--help``) does not load torch and Pyro.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Mixture", "RunResult", "UserError", "__version__", "assign", "load", "run"]

if TYPE_CHECKING:
    from .api import RunResult, assign, load, run
    from .errors import UserError
    from .estimator import Mixture

_LAZY = {
    "run": "api",
    "RunResult": "api",
    "load": "api",
    "assign": "api",
    "Mixture": "estimator",
    "UserError": "errors",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ppl_gmm' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
