"""`ppl-gmm select`: one experiment per K on the same data, and the K each criterion picks."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from ppl_gmm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_select_picks_the_true_number_of_components_by_bic(capsys, tmp_path) -> None:
    code = main(
        ["select", str(CONFIGS / "select.yaml"), "--k", "1..5", "--runs-dir", str(tmp_path), "--quiet"]
    )
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    path = Path(out[-1])
    assert "BIC picks K=3" in out[-2]
    table = pd.read_csv(path / "selection.csv")
    assert list(table["k"]) == [1, 2, 3, 4, 5]
    for column in ("k", "bic", "aic", "icl", "elbo", "effective_k"):
        assert column in table.columns
    assert int(table.loc[table["bic"].idxmin(), "k"]) == 3
    assert int(table.loc[table["icl"].idxmin(), "k"]) == 3
    assert table["elbo"].isna().all()  # EM has no ELBO
    with Image.open(path / "selection.png") as image:
        assert min(image.size) > 200
    # every K saw the very same data
    hashes = {json.loads((path / name / "data.json").read_text())["sha256"] for name in table["experiment"]}
    assert len(hashes) == 1
    assert (table["status"] == "completed").all()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--k", "0..3"], "--k"),
        (["--k", "5..2"], "--k"),
        (["--k", "a..b"], "--k"),
        (["--k", "1..3", "--backend", "nope"], "--backend"),
        (["--k", "1..3", "model.kk=2"], "model.kk"),
    ],
)
def test_select_bad_input_writes_nothing(args, needle, capsys, tmp_path) -> None:
    runs = tmp_path / "runs"
    assert main(["select", str(CONFIGS / "select.yaml"), "--runs-dir", str(runs), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]
    assert not runs.exists()


@pytest.mark.parametrize("model", ["poisson_mixture", "bernoulli_mixture"])
def test_select_finds_the_simulated_number_of_components_of_other_models(model, capsys, tmp_path) -> None:
    """Data drawn from a 3-component mixture of the model itself; BIC over K = 1..5 picks 3."""
    config = tmp_path / "select.yaml"
    config.write_text(
        "experiment: select-count\n"
        "data: {source: synthetic, n: 1500, dim: 12, k: 3, test_fraction: 0}\n"
        f"model: {{name: {model}, k: 3}}\n"
        "init: {n_init: 3}\n"
        "backends: {em: {max_iter: 300, tol: 1.0e-8}}\n",
        encoding="utf-8",
    )
    code = main(["select", str(config), "--k", "1..5", "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    table = pd.read_csv(Path(out[-1]) / "selection.csv")
    assert (table["status"] == "completed").all()
    assert int(table.loc[table["bic"].idxmin(), "k"]) == 3
