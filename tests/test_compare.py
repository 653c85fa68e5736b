"""`ppl-gmm run` then `ppl-gmm compare`: the table, comparison.csv, the figures, and skipped runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ppl_gmm.cli import main
from ppl_gmm.config import load_config

SHORT = [
    "backends.em.max_iter=20",
    "backends.map.steps=30",
    "backends.svi.steps=30",
    "backends.svi.elbo_particles=5",
    "backends.svi.mean_samples=20",
    "data.n=400",
]


def _run(capsys, config: str, runs: Path, *overrides: str) -> Path:
    short = SHORT if "quickstart" not in config else ["backends.em.max_iter=20"]
    assert main(["run", config, "--runs-dir", str(runs), "--quiet", *short, *overrides]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def _assert_png(path: Path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert min(pixels.shape) > 200
    assert pixels.std() > 5  # not a blank canvas


def test_compare_tables_and_draws_every_backend(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    first = _run(capsys, str(_configs() / "compare.yaml"), runs)
    second = _run(capsys, str(_configs() / "compare.yaml"), runs, "seed=1")
    assert main(["compare", str(runs)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[-1] == str(runs)
    assert max(len(line) for line in lines) <= 100
    blocks = "\n".join(lines[:-1]).split("\n\n")
    assert [block.splitlines()[0] for block in blocks] == [first.name, second.name]
    for block in blocks:  # the experiment's name, two header lines, one row per backend
        header = block.splitlines()[2].split()
        for column in ("backend", "status", "steps", "seconds", "log-lik.", "ARI"):
            assert column in header
        backends = list(load_config(_configs() / "compare.yaml").backends)
        assert [row.split()[0] for row in block.splitlines()[3:]] == sorted(backends)
    assert {"em", "map", "svi"} <= set(backends)
    table = pd.read_csv(runs / "comparison.csv")
    assert len(table) == 2 * len(backends) and set(table["experiment"]) == {first.name, second.name}
    for column in (
        "train_log_likelihood",
        "test_log_likelihood",
        "seconds_to_within_1e-3",
        "means_error_vs_truth",
        "means_error_vs_reference",
        "versions.torch",
    ):
        assert column in table.columns, column
    assert table["train_log_likelihood"].notna().all()
    assert (table.loc[table["backend"] == "em", "means_error_vs_reference"] == 0).all()
    for experiment in (first, second):
        for suffix in ("traces", "components"):
            _assert_png(runs / f"{experiment.name}-{suffix}.png")
    assert "warning" not in captured.err


def test_compare_one_experiment_writes_into_it(capsys, tmp_path) -> None:
    experiment = _run(capsys, str(_configs() / "iris.yaml"), tmp_path, "init.n_init=1")
    assert main(["compare", str(experiment), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    _assert_png(tmp_path / "out" / f"{experiment.name}-components.png")  # 4-D: principal components
    assert len(pd.read_csv(tmp_path / "out" / "comparison.csv")) == len(
        load_config(_configs() / "iris.yaml").backends
    )


def test_compare_skips_broken_partial_and_foreign_directories(capsys, tmp_path) -> None:
    runs = tmp_path / "runs"
    good = _run(capsys, str(_configs() / "quickstart.yaml"), runs)
    broken = _run(capsys, str(_configs() / "quickstart.yaml"), runs)
    (broken / "em" / "summary.json").write_text("{not json")
    partial = runs / "partial-run"
    (partial / "em").mkdir(parents=True)
    (partial / "config.yaml").write_text("experiment: partial\n")
    foreign = runs / "holiday-photos"
    foreign.mkdir()
    (foreign / "beach.txt").write_text("sand")
    assert main(["compare", str(runs), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert any(str(broken / "em") in line for line in warnings)
    assert any(str(partial) in line for line in warnings)
    assert any(str(foreign) in line for line in warnings)
    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert list(table["experiment"]) == [good.name]
    summary = json.loads((good / "em" / "summary.json").read_text())
    assert summary["seconds_to_within_1e-3"] is not None


def test_compare_with_nothing_to_compare_is_an_error(capsys, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error:") and "empty" in err[-1]
    assert main(["compare", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no such directory" in err[0]
    assert str(tmp_path / "missing") in err[0]
    assert not (tmp_path / "comparison.csv").exists()


def test_compare_reads_the_experiments_of_a_select_directory(capsys, tmp_path) -> None:
    runs = tmp_path / "runs"
    args = ["--k", "2..3", "--runs-dir", str(runs), "--quiet", "data.n=300", "init.n_init=1"]
    assert main(["select", str(_configs() / "select.yaml"), *args]) == 0
    selection = Path(capsys.readouterr().out.strip().splitlines()[-1])
    quick = _run(capsys, str(_configs() / "quickstart.yaml"), runs)
    assert main(["compare", str(runs), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    expected = {quick.name, *pd.read_csv(selection / "selection.csv")["experiment"]}
    assert set(table["experiment"]) == expected and len(expected) == 3


def _configs() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"
