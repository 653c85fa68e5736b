"""The config's `threads`: applied to every backend's fit and scoring, recorded, restored after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ppl_gmm.backends import StepInfo
from ppl_gmm.cli import main
from ppl_gmm.config import parse_config
from ppl_gmm.errors import UserError
from ppl_gmm.experiment import run

SMALL = {"data": {"n": 200}, "backends": {"em": {"max_iter": 5}, "map": {"steps": 5}}}


class ThreadsSeen:
    """A ``Progress`` that notes torch's thread count at every step of every fit."""

    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = {}
        self.backend = ""

    def begin(self, backend: str, restart: int, total: int | None) -> None:
        self.backend = backend

    def step(self, info: StepInfo) -> None:
        self.seen.setdefault(self.backend, set()).add(torch.get_num_threads())

    def end(self) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def _threads(path: Path, backend: str) -> int:
    return json.loads((path / backend / "summary.json").read_text())["threads"]


@pytest.mark.parametrize("threads", [1, None])  # None: automatic, one thread for a small problem
def test_threads_apply_to_every_fit_are_recorded_and_restored(threads, tmp_path) -> None:
    torch.set_num_threads(2)
    progress = ThreadsSeen()
    path = run(parse_config({**SMALL, "threads": threads}), tmp_path, progress).path
    assert torch.get_num_threads() == 2
    assert progress.seen == {"em": {1}, "map": {1}}
    assert _threads(path, "em") == _threads(path, "map") == 1


def test_an_explicit_em_threads_option_wins_over_the_configs(tmp_path) -> None:
    torch.set_num_threads(1)
    progress = ThreadsSeen()
    raw = {**SMALL, "threads": 1, "backends": {"em": {"max_iter": 5, "threads": 2}, "map": {"steps": 5}}}
    path = run(parse_config(raw), tmp_path, progress).path
    assert progress.seen == {"em": {2}, "map": {1}}
    assert (_threads(path, "em"), _threads(path, "map")) == (2, 1)
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("value", [0, -1, "many"])
def test_bad_threads_are_an_error_naming_threads(value, tmp_path, capsys) -> None:
    with pytest.raises(UserError, match=r"^threads: "):
        parse_config({**SMALL, "threads": value})
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL), encoding="utf-8")
    assert main(["run", str(config), f"threads={value}", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: threads")
    assert not (tmp_path / "runs").exists()
