"""Choosing the number of components: a sweep over ``model.k`` on the same data (one seed), its
criteria side by side.

BIC, AIC and ICL (lower is better) for any point estimate; the ELBO (higher is better) for
variational backends; the effective number of components where a backend reports one (vb).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from .backends import BACKENDS
from .config import Config, dump_config
from .errors import UserError
from .figures import plot_selection
from .runs import read_summary, write_csv
from .sweep import sweep

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


def select(
    cfg: Config,
    ks: Sequence[int],
    backend: str,
    runs_dir: Path,
    message: Callable[[str], None] = lambda text: None,
    jobs: int = 1,
) -> Selection:
    """Sweep ``backend`` over K = ``ks`` (the config's seed: the same data and seeding for every
    K); write the sweep's directory (every experiment, its manifest) with ``selection.csv`` and a
    figure in it. Everything is checked before anything is written."""
    BACKENDS.get(backend, field="--backend")
    raw = yaml.safe_load(dump_config(cfg))
    raw["backends"] = {backend: raw["backends"].get(backend, {})}
    swept = sweep(
        raw,
        {"model.k": [str(k) for k in ks]},
        [cfg.seed],
        runs_dir,
        jobs=jobs,
        message=message,
        name="select",
    )
    rows = []
    for k, (_, point) in zip(ks, swept.manifest.iterrows(), strict=True):
        summary = read_summary(swept.path / str(point["experiment"]) / backend) or {}
        rows.append(
            {
                "k": k,
                **{name: summary.get(name) for name in CRITERIA},
                "effective_k": summary.get("effective_k"),
                "train_log_likelihood": summary.get("train_log_likelihood"),
                "status": summary.get("status", point["state"]),
                "experiment": point["experiment"],
            }
        )
    table = pd.DataFrame(rows)
    chosen = {name: _best(table, name, higher) for name, higher in CRITERIA.items()}
    write_csv(swept.path / "selection.csv", table)
    plot_selection(table, chosen, swept.path / "selection.png", f"{cfg.experiment}: {backend}")
    return Selection(swept.path, table, chosen)


def _best(table: pd.DataFrame, column: str, higher: bool) -> int | None:
    values = pd.to_numeric(table[column], errors="coerce")
    values = values[values.map(lambda v: math.isfinite(v) if v == v else False)]
    if values.empty:
        return None
    index = values.idxmax() if higher else values.idxmin()
    return int(table.loc[index, "k"])
