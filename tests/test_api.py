"""The Python face: run, load, assign, and init.method: given."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_iris

import ppl_gmm
from ppl_gmm import Mixture, UserError
from ppl_gmm.config import load_config
from ppl_gmm.experiment import prepare
from ppl_gmm.runs import Files

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SMALL = {"data__n": 300, "backends": {"em": {"max_iter": 200}}}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> ppl_gmm.RunResult:
    """configs/quickstart.yaml (EM) on 300 points, standardized."""
    runs = tmp_path_factory.mktemp("runs")
    return ppl_gmm.run(QUICKSTART, runs_dir=runs, data__standardize=True, **SMALL)


def test_run_returns_what_the_directory_holds(quickstart: ppl_gmm.RunResult) -> None:
    em = quickstart.path / "em"
    summary = json.loads((em / Files.SUMMARY).read_text())
    assert quickstart.summaries["em"].train_log_likelihood == summary["train_log_likelihood"]
    assert quickstart.summaries["em"].status == "completed" and quickstart.failed == []
    on_disk = load_file(str(em / Files.PARAMS))
    assert set(quickstart.params["em"]) == {"weights", "means", "covariances"}
    for name, value in on_disk.items():
        assert quickstart.params["em"][name].dtype == torch.float64
        assert torch.equal(quickstart.params["em"][name], value)
    assert quickstart.config.data.n == 300 and quickstart.config.backends["em"]["max_iter"] == 200
    with pytest.raises(TypeError):
        quickstart.params["svi"] = {}  # type: ignore[index]


def test_loaded_estimator_scores_as_the_run(quickstart: ppl_gmm.RunResult) -> None:
    train = prepare(quickstart.config).data.train.numpy()
    loaded = ppl_gmm.load(quickstart.path / "em")
    summary = quickstart.summaries["em"]
    assert loaded.score(train) == pytest.approx(summary.train_log_likelihood, rel=1e-12)
    assert loaded.bic(train) == pytest.approx(summary.bic, rel=1e-12)
    assert loaded.converged_ == summary.converged and loaded.n_iter_ == summary.n_steps
    assert loaded.get_params()["max_iter"] == 200 and loaded.n_components == 3
    # the experiment directory itself loads its best backend, as does the result
    np.testing.assert_array_equal(Mixture.from_run(quickstart.path).means_, loaded.means_)
    np.testing.assert_array_equal(quickstart.estimator("em").means_, loaded.means_)
    with pytest.raises(
        UserError, match="backend 'svi' has no fitted parameters here; completed backends: em"
    ):
        quickstart.estimator("svi")
    # an estimator fitted on the run's train split with the run's seed: the run's parameters
    refit = Mixture(**{**loaded.get_params(), "random_state": quickstart.config.seed}).fit(train)
    for name, value in quickstart.params["em"].items():
        torch.testing.assert_close(refit.params_[name], value, rtol=0, atol=0)


def test_loaded_variational_fit(tmp_path: Path) -> None:
    """A vb run on a built-in data set: the loaded estimator keeps the features' names, scores as
    the run did and reports the run's ELBO as its lower bound."""
    config = {"data": {"source": "iris", "standardize": True}, "model": {"prior": "conjugate"}}
    result = ppl_gmm.run(config, runs_dir=tmp_path, backends={"vb": {}}, quiet=True)
    data = prepare(result.config).data
    train = pd.DataFrame(data.train.numpy(), columns=list(data.feature_names))
    loaded = result.estimator()
    summary = result.summaries["vb"]
    assert loaded.backend == "vb" and loaded.prior == "conjugate"
    assert list(loaded.feature_names_in_) == list(load_iris().feature_names)
    assert loaded.score(train) == pytest.approx(summary.train_log_likelihood, rel=1e-12)
    assert loaded.lower_bound_ == summary.elbo
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        loaded.predict(train.to_numpy())


def test_overrides_in_every_form(tmp_path: Path) -> None:
    base = {"experiment": "tiny", "data": {"n": 60}, "backends": {"em": {"max_iter": 5, "tol": 1e-3}}}
    for kwargs in ({"model__k": 2}, {"model.k": 2}, {"model": {"k": 2}}):
        result = ppl_gmm.run(base, runs_dir=tmp_path, quiet=True, **kwargs)
        assert result.config.model.k == 2 and result.params["em"]["means"].shape == (2, 2)
    from_object = ppl_gmm.run(result.config, runs_dir=tmp_path, quiet=True, seed=4)
    assert from_object.config.seed == 4 and from_object.config.model.k == 2
    with pytest.raises(UserError, match=r"^model.k: Input should be greater than or equal to 1"):
        ppl_gmm.run(base, runs_dir=tmp_path, model__k=0)
    with pytest.raises(UserError, match="backends.em.max_iters: unknown field"):
        ppl_gmm.run(base, runs_dir=tmp_path, backends__em__max_iters=3)
    with pytest.raises(UserError, match="config file not found"):
        ppl_gmm.run(tmp_path / "missing.yaml", runs_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 4  # nothing written by the refused runs


def test_run_warnings_become_python_warnings(tmp_path: Path) -> None:
    base = {"data": {"n": 60}, "backends": {"em": {"max_iter": 1, "tol": 0.0}}}
    with pytest.warns(RuntimeWarning, match="em did not converge in 1 steps"):
        ppl_gmm.run(base, runs_dir=tmp_path)
    ppl_gmm.run(base, runs_dir=tmp_path, quiet=True)  # no warning: they are errors in the tests


def test_assign_applies_the_runs_standardization(quickstart: ppl_gmm.RunResult, tmp_path: Path) -> None:
    """New raw rows, written as CSV (columns shuffled, an extra one) and as .npy, give the
    estimator's responsibilities on the rows standardized by the train split's statistics."""
    cfg = quickstart.config
    data = prepare(cfg.model_copy(update={"data": cfg.data.model_copy(update={"standardize": False})})).data
    raw = data.test.numpy()
    expected_x = prepare(cfg).data.test.numpy()  # the same rows, standardized as the run did
    loaded = ppl_gmm.load(quickstart.path / "em")
    frame = pd.DataFrame({"id": [f"r{i}" for i in range(len(raw))], "x1": raw[:, 1], "x0": raw[:, 0]})
    frame.to_csv(tmp_path / "new.csv", index=False)
    np.save(tmp_path / "new.npy", raw)
    for source in ("new.csv", "new.npy"):
        out = ppl_gmm.assign(quickstart.path / "em", tmp_path / source, out=tmp_path / f"{source}.out.csv")
        written = pd.read_csv(out)
        assert list(written.columns) == ["hard", "p0", "p1", "p2", "log_likelihood"]
        np.testing.assert_allclose(written[["p0", "p1", "p2"]], loaded.predict_proba(expected_x), atol=1e-12)
        np.testing.assert_array_equal(written["hard"], loaded.predict(expected_x))
        np.testing.assert_allclose(written["log_likelihood"], loaded.score_samples(expected_x), rtol=1e-12)


def test_assign_keeps_the_label_column(tmp_path: Path) -> None:
    frame = pd.DataFrame(load_iris().data[:, :2], columns=["length", "width"])
    frame.insert(0, "species", load_iris().target_names[load_iris().target])
    frame.to_csv(tmp_path / "iris.csv", index=False)
    data = {
        "source": "csv",
        "path": str(tmp_path / "iris.csv"),
        "label_column": "species",
        "test_fraction": 0,
    }
    result = ppl_gmm.run({"data": data}, runs_dir=tmp_path / "runs", quiet=True)
    out = ppl_gmm.assign(result.path / "em", tmp_path / "iris.csv", out=tmp_path / "out.csv")
    written = pd.read_csv(out)
    assert list(written.columns) == ["hard", "p0", "p1", "p2", "log_likelihood", "label"]
    assert list(written["label"]) == list(frame["species"])
    np.testing.assert_array_equal(written["hard"], result.estimator().predict(frame[["length", "width"]]))


def test_assign_default_output_and_bad_input(
    quickstart: ppl_gmm.RunResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    backend = quickstart.path / "em"
    np.save("points.npy", np.zeros((3, 2)))
    assert ppl_gmm.assign(backend, "points.npy") == Path("points.assignments.csv")
    assert len(pd.read_csv("points.assignments.csv")) == 3
    pd.DataFrame({"x0": [1.0, np.nan]}).to_csv("one.csv", index=False)
    pd.DataFrame({"x0": [1.0, np.nan], "x1": [1.0, 2.0]}).to_csv("nan.csv", index=False)
    np.save("wide.npy", np.zeros((3, 5)))
    cases = {
        "missing.csv": "missing.csv: file not found",
        "one.csv": "one.csv: has no column 'x1'; the run's features are x0, x1",
        "nan.csv": "nan.csv: 1 value.* missing, NaN or infinite; the first is in column 'x0', row 2",
        "wide.npy": "wide.npy: has 5 columns, but the run was fitted on 2 features",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=message):
            ppl_gmm.assign(backend, name)
    with pytest.raises(UserError, match="not a run directory"):
        ppl_gmm.assign(tmp_path, "points.npy")


def test_given_init_starts_from_the_file(quickstart: ppl_gmm.RunResult, tmp_path: Path) -> None:
    params = dict(quickstart.params["em"])
    params["means"] = params["means"] + 0.25
    save_file(
        {name: value.contiguous() for name, value in params.items()}, str(tmp_path / "start.safetensors")
    )
    result = ppl_gmm.run(
        quickstart.config,
        runs_dir=tmp_path / "runs",
        init__method="given",
        init__path=tmp_path / "start.safetensors",
        backends__em__max_iter=1,
        backends__em__tol=0.0,
        quiet=True,
    )
    started = load_file(str(result.path / Files.INIT))
    for name, value in params.items():
        torch.testing.assert_close(started[name], value, rtol=0, atol=1e-15)
    assert load_config(result.path / Files.CONFIG).init.path == str(tmp_path / "start.safetensors")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (None, r"init.path: .*missing.safetensors does not exist"),
        ({"drop": "means"}, r"init.path \(.*\): has no tensor 'means'"),
        (
            {"means": torch.zeros(2, 2)},
            r"init.path \(.*\): means has shape \(2, 2\), but model.k needs \(3, 2\)",
        ),
        ({"covariances": torch.full((3, 2, 2), float("nan"))}, r"tensor 'covariances' has NaN"),
    ],
)
def test_given_init_is_checked(
    quickstart: ppl_gmm.RunResult, tmp_path: Path, change: dict[str, object] | None, message: str
) -> None:
    file = tmp_path / "missing.safetensors"
    if change is not None:
        params = {name: value.clone() for name, value in quickstart.params["em"].items()}
        params.pop(str(change.pop("drop", "")), None)
        params.update(change)  # type: ignore[arg-type]
        file = tmp_path / "start.safetensors"
        save_file(params, str(file))  # type: ignore[arg-type]
    with pytest.raises(UserError, match=message):
        ppl_gmm.run(quickstart.config, runs_dir=tmp_path / "runs", init__method="given", init__path=file)
    with pytest.raises(UserError, match="init.path: init.method is given, so init.path must name"):
        ppl_gmm.run(quickstart.config, runs_dir=tmp_path / "runs", init__method="given")
    assert not (tmp_path / "runs").exists()
