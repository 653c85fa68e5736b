"""Choosing the number of components: one experiment per K on the same data, criteria side by side.

BIC, AIC and ICL (lower is better) for any point estimate; the ELBO (higher is better) for
variational backends; the effective number of components where a backend reports one (vb).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .backends import BACKENDS
from .config import Config
from .errors import UserError
from .experiment import Progress, execute, prepare
from .figures import plot_selection
from .runs import create_experiment_dir, write_csv

__all__ = ["CRITERIA", "Selection", "parse_k_range", "select"]

# criterion → True when higher is better
CRITERIA: dict[str, bool] = {"bic": False, "aic": False, "icl": False, "elbo": True}


@dataclass(frozen=True)
class Selection:
    path: Path
    table: pd.DataFrame  # one row per K: k, bic, aic, icl, elbo, effective_k, status
    chosen: dict[str, int | None]  # the K each criterion picks


def parse_k_range(text: str) -> list[int]:
    """``"1..8"`` → [1, ..., 8]; a single number is a range of one."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:\.\.\s*(\d+)\s*)?", text)
    if not match:
        raise UserError(f"--k: expected a range such as 1..8, but found {text!r}.")
    low, high = int(match[1]), int(match[2] or match[1])
    if low < 1 or high < low:
        raise UserError(f"--k: expected 1 <= A <= B in A..B, but found {text!r}.")
    return list(range(low, high + 1))


def _config_for(cfg: Config, k: int, backend: str) -> Config:
    options = cfg.backends.get(backend, {})
    model = cfg.model.model_copy(update={"k": k})
    return cfg.model_copy(
        update={"experiment": f"{cfg.experiment}-k{k}", "model": model, "backends": {backend: options}}
    )


def select(
    cfg: Config, ks: Sequence[int], backend: str, runs_dir: Path, progress: Progress | None = None
) -> Selection:
    """Run ``backend`` once per K; write every experiment, ``selection.csv`` and a figure into one
    directory under ``runs_dir``. Everything is checked before anything is written."""
    BACKENDS.get(backend, field="--backend")
    plans = [prepare(_config_for(cfg, k, backend)) for k in ks]
    path = create_experiment_dir(runs_dir, f"{cfg.experiment}-select")
    rows = []
    for k, plan in zip(ks, plans, strict=True):
        if progress is not None:
            progress.message(f"K = {k}")
        outcome = execute(plan, path, progress)
        summary = outcome.summaries[backend]
        rows.append(
            {
                "k": k,
                **{name: summary.get(name) for name in CRITERIA},
                "effective_k": summary.get("effective_k"),
                "train_log_likelihood": summary.get("train_log_likelihood"),
                "status": summary.status,
                "experiment": outcome.path.name,
            }
        )
    table = pd.DataFrame(rows)
    chosen = {name: _best(table, name, higher) for name, higher in CRITERIA.items()}
    write_csv(path / "selection.csv", table)
    plot_selection(table, chosen, path / "selection.png", f"{cfg.experiment}: {backend}")
    return Selection(path, table, chosen)


def _best(table: pd.DataFrame, column: str, higher: bool) -> int | None:
    values = pd.to_numeric(table[column], errors="coerce")
    values = values[values.map(lambda v: math.isfinite(v) if v == v else False)]
    if values.empty:
        return None
    index = values.idxmax() if higher else values.idxmin()
    return int(table.loc[index, "k"])
