"""``Mixture``: a scikit-learn estimator over the experiment's machinery, without a run directory.

fit builds the config an experiment would have (model, init, one backend), hands the arrays to
``experiment.prepare`` (which validates everything and draws the initial parameters) and keeps the
best restart by train log-likelihood, as ``ppl-gmm run`` does: the same config, data and seed give
the same parameters as a run. ``Mixture.from_run`` reads a backend directory back as a fitted
estimator.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.util
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from .backends import BACKENDS, FitResult, StepInfo
from .config import Config, load_config, parse_config
from .data import Dataset
from .errors import UserError
from .evaluate import mean_log_likelihood
from .experiment import Plan, _pyro_seed, prepare, torch_threads
from .init import check_given
from .models import MODELS, LatentModel, Params
from .models.gmm import COVARIANCE_TYPES, GaussianMixture
from .runs import Files, best_backend_dir, read_summary

__all__ = ["Mixture", "run_data"]

INIT_METHODS = ("kmeans", "kmeans++", "random_from_data")
# fields of a config's model block that have their own estimator parameter
_OWN_MODEL_FIELDS = ("name", "k", "prior", "covariance")


class Mixture(DensityMixin, BaseEstimator):
    """A latent mixture fitted by one inference backend, with scikit-learn's method names.

    Parameters
    ----------
    n_components : model.k, the number of components.
    model : model.name: gmm, poisson_mixture, bernoulli_mixture, ...
    backend : the inference backend: em, map, vb, svi, mcmc, online_em, incremental_em.
    covariance_type : the gmm's model.covariance: full, tied, diag or spherical (other models
        have none and refuse any value but the default).
    n_init : restarts; the best by train log-likelihood is kept.
    random_state : int or None (a fresh seed each fit); numpy's RandomState is accepted as in
        scikit-learn. Every random choice of the fit derives from it, as from a config's ``seed``.
    prior : model.prior: none (maximum likelihood) or conjugate (MAP and Bayesian backends).
    init : init.method (kmeans, kmeans++, random_from_data); or the initial parameters
        themselves: a mapping of the model's tensors (for the gmm ``weights`` (K), ``means``
        (K, D) and ``covariances``, (K, D, D) or in the shape of ``covariances_``), a
        ``.safetensors`` file of them (init.method: given), or a run's backend directory
        (init.method: from_run).
    model_options : further fields of the model block, e.g. ``{"hyperparameters": {...}}``.
    **backend_options : the backend's options (``backends.<name>`` of a config), e.g.
        ``max_iter=100, tol=1e-8`` for em; an unknown one is a ValueError naming it.

    Fitted attributes: ``weights_``, ``means_``, ``covariances_`` (gmm, in scikit-learn's shapes
    for the covariance type), the model's other tensors as ``<name>_`` (``rates_``, ``probs_``),
    ``params_`` (the model's tensors as in ``params.safetensors``: float64 torch tensors),
    ``converged_``, ``n_iter_``, ``lower_bound_`` (the backend's own objective per point at the
    end: the log-likelihood for em, the log posterior with a prior, the ELBO for vb and svi),
    ``n_features_in_``, ``feature_names_in_`` (fitted on a pandas frame) and ``model_``.
    """

    def __init__(
        self,
        n_components: int = 1,
        model: str = "gmm",
        backend: str = "em",
        covariance_type: str = "full",
        n_init: int = 1,
        random_state: int | np.random.RandomState | None = None,
        *,
        prior: str = "none",
        init: str | os.PathLike[str] | Mapping[str, Any] = "kmeans++",
        model_options: Mapping[str, Any] | None = None,
        **backend_options: Any,
    ) -> None:
        self.n_components = n_components
        self.model = model
        self.backend = backend
        self.covariance_type = covariance_type
        self.n_init = n_init
        self.random_state = random_state
        self.prior = prior
        self.init = init
        self.model_options = model_options
        self._backend_options = dict(backend_options)

    # ---- scikit-learn's parameter protocol: the named parameters plus the backend's options ------

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {**super().get_params(deep), **self._backend_options}

    def set_params(self, **params: Any) -> Mixture:
        own = set(self._get_param_names())
        super().set_params(**{key: value for key, value in params.items() if key in own})
        self._backend_options.update({key: value for key, value in params.items() if key not in own})
        return self

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags

    # ---- fitting ---------------------------------------------------------------------------------

    def fit(self, X: Any, y: Any = None, lengths: Any = None) -> Mixture:
        """Fit on X (n_samples, n_features): a NumPy array, a pandas frame or a torch tensor,
        used as it is (no test split, no standardization). For a hidden Markov model, ``lengths``
        cuts the rows into sequences as hmmlearn's does (None: one sequence)."""
        x = self._check_X(X, reset=True)
        cut = self._lengths(lengths, x.shape[0])
        seed = _seed(self.random_state)
        with self._init_config() as (init, given):
            cfg = self._config(seed, init)
            model_cls = MODELS.get(cfg.model.name, field="model")
            model_cls.check_data(x, "X")
            if given is not None:  # named as the caller knows them, not by the temporary file
                check_given(model_cls.from_config(cfg.model, torch.from_numpy(x)), given, "init")
            names = getattr(self, "feature_names_in_", None)
            features = (
                tuple(map(str, names)) if names is not None else tuple(f"x{j}" for j in range(x.shape[1]))
            )
            data = Dataset("array", torch.from_numpy(x), None, None, None, features, train_lengths=cut)
            plan = prepare(cfg, data)
        result, objective = _fit_best(plan)
        if not result.converged:
            warnings.warn(_not_converged(self.backend, result, plan), ConvergenceWarning, stacklevel=2)
        self._set_fitted(plan.model, result.params, result.converged, result.n_steps, objective)
        return self

    def fit_predict(self, X: Any, y: Any = None, lengths: Any = None) -> np.ndarray:
        """Fit, then the most probable component of each row of X: (n_samples,)."""
        return self.fit(X, lengths=lengths).predict(X, lengths)

    def _lengths(self, lengths: Any, n: int) -> np.ndarray | None:
        """``lengths`` checked against the model and the n rows: int64 (S,), or None."""
        if lengths is None:
            return None
        if not MODELS.get(self.model, field="model").sequential:
            raise UserError(
                f"lengths: model {self.model!r} takes independent rows; lengths cut rows into the "
                "sequences of a hidden Markov model (e.g. model='gaussian_hmm'). Leave it None."
            )
        cut = np.asarray(lengths)
        if cut.ndim != 1 or cut.dtype.kind not in "iu" or (cut < 1).any() or int(cut.sum()) != n:
            raise UserError(
                f"lengths: expected positive integers, one per sequence, that sum to the {n} rows of X, "
                f"but found {np.asarray(lengths).tolist()[:10]}."
            )
        return cut.astype(np.int64)

    def _config(self, seed: int, init: dict[str, Any]) -> Config:
        model: dict[str, Any] = {
            **dict(self.model_options or {}),
            "name": self.model,
            "k": self.n_components,
            "prior": self.prior,
        }
        if self.model in ("gmm", "gaussian_hmm"):
            model["covariance"] = self.covariance_type
        elif self.covariance_type != "full":
            raise UserError(
                f"covariance_type: model {self.model!r} has no covariance type (only gmm has), but "
                f"found {self.covariance_type!r}. Leave covariance_type at its default."
            )
        raw = {
            "seed": seed,
            "model": model,
            "init": {**init, "n_init": self.n_init},
            "backends": {self.backend: dict(self._backend_options)},
        }
        return parse_config(raw)

    @contextmanager
    def _init_config(self) -> Iterator[tuple[dict[str, Any], dict[str, Tensor] | None]]:
        """The config's ``init`` block for ``self.init``, and the given tensors of a mapping, which
        are written to a temporary safetensors file for the fit's duration (init.method: given)."""
        init = self.init
        if isinstance(init, os.PathLike) or (isinstance(init, str) and init.endswith(".safetensors")):
            path = Path(init)
            if path.is_dir():
                yield {"method": "from_run", "run": str(path)}, None
            else:
                yield {"method": "given", "path": str(path)}, None
        elif isinstance(init, Mapping):
            tensors = {
                name: torch.as_tensor(np.asarray(value, dtype=np.float64)) for name, value in init.items()
            }
            if self.model == "gmm" and "covariances" in tensors and "means" in tensors:
                tensors["covariances"] = _full_covariances(self.covariance_type, tensors)
            with tempfile.TemporaryDirectory() as folder:
                file = Path(folder) / "init.safetensors"
                save_file({name: value.contiguous() for name, value in tensors.items()}, str(file))
                yield {"method": "given", "path": str(file)}, tensors
        else:
            yield {"method": init}, None

    def _set_fitted(
        self, model: LatentModel, params: Params, converged: bool, n_iter: int, lower_bound: float
    ) -> None:
        self.model_ = model
        self.params_ = {name: value.detach().to("cpu", torch.float64) for name, value in params.items()}
        for name, value in self.params_.items():
            setattr(self, f"{name}_", value.numpy())
        gaussian = getattr(model, "emission", model)  # a hidden Markov model's emission mixture
        if isinstance(gaussian, GaussianMixture):
            self.covariances_ = (
                COVARIANCE_TYPES[gaussian.covariance].native(self.params_["covariances"]).numpy()
            )
        self.converged_ = converged
        self.n_iter_ = n_iter
        self.lower_bound_ = lower_bound

    # ---- using a fit -----------------------------------------------------------------------------

    def _bound(self, X: Any, lengths: Any) -> tuple[LatentModel, Tensor]:
        """The fitted model for X's rows (cut by ``lengths`` for a hidden Markov model) and X."""
        check_is_fitted(self)
        x = self._check_X(X, reset=False)
        self.model_.check_data(x, "X")
        return self.model_.bind(self._lengths(lengths, x.shape[0])), torch.from_numpy(x)

    def _log_joint(self, X: Any, lengths: Any = None) -> Tensor:
        """log p(x_n, z_n = k | θ): (n_samples, n_components); for a hidden Markov model the
        smoothed log p(z_t = k | x, θ) plus the row's one-step predictive log density."""
        model, x = self._bound(X, lengths)
        return model.log_joint(x, self.params_)

    def predict_proba(self, X: Any, lengths: Any = None) -> np.ndarray:
        """p(z_n = k | x_n, θ): (n_samples, n_components), rows summing to one (a hidden Markov
        model's: the smoothed state probabilities)."""
        return torch.softmax(self._log_joint(X, lengths), dim=1).numpy()

    def predict(self, X: Any, lengths: Any = None) -> np.ndarray:
        """The most probable component of each row: (n_samples,); a hidden Markov model's: the
        most probable state sequence (Viterbi), as hmmlearn's predict."""
        model, x = self._bound(X, lengths)
        return model.most_probable_states(x, self.params_).numpy()

    def score_samples(self, X: Any, lengths: Any = None) -> np.ndarray:
        """log p(x_n | θ), the components summed out: (n_samples,); a hidden Markov model's:
        log p(x_t | x_1..t-1, θ), which sum to each sequence's log-likelihood."""
        model, x = self._bound(X, lengths)
        return model.log_likelihood(x, self.params_).numpy()

    def score(self, X: Any, y: Any = None, lengths: Any = None) -> float:
        """The mean log-likelihood per row, as scikit-learn's GaussianMixture.score (hmmlearn's
        score is the sum: multiply by the number of rows)."""
        return float(self.score_samples(X, lengths).mean())

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on X (lower is better), as scikit-learn's."""
        n = self._check_X(X, reset=False).shape[0]
        return -2.0 * n * self.score(X) + self.model_.n_params() * math.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion on X (lower is better), as scikit-learn's."""
        n = self._check_X(X, reset=False).shape[0]
        return -2.0 * n * self.score(X) + 2.0 * self.model_.n_params()

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """n_samples rows drawn from the fitted mixture and their components: X (n_samples,
        n_features), y (n_samples,). An int random_state gives the same draws each call, as in
        scikit-learn."""
        check_is_fitted(self)
        if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples: expected an integer of at least 1, but found {n_samples!r}.")
        rng = np.random.default_rng(np.random.SeedSequence([_seed(self.random_state), 6]))
        x, y = self.model_.simulate(self.params_, int(n_samples), rng)
        return x.numpy(), y.numpy().astype(np.int64)

    def _check_X(self, X: Any, reset: bool) -> np.ndarray:
        if isinstance(X, Tensor):
            X = X.detach().cpu().numpy()
        x = validate_data(self, X, reset=reset, dtype=np.float64, ensure_min_samples=2 if reset else 1)
        # torch shares the memory of writable arrays only (and warns about read-only ones)
        return x if x.flags.writeable else x.copy()

    # ---- a run directory ---------------------------------------------------------------------

    @classmethod
    def from_run(cls, path: str | os.PathLike[str]) -> Mixture:
        """The fitted estimator of a backend directory ``runs/<experiment>/<backend>`` (or of an
        experiment directory's best completed backend), from its config.yaml and
        params.safetensors. It scores data on the run's own feature scale (standardized when the
        run's data.standardize was set: ``ppl_gmm.assign`` applies that to new data)."""
        backend_dir = _backend_dir(Path(path))
        cfg = load_config(backend_dir.parent / Files.CONFIG)
        name = backend_dir.name
        if name not in cfg.backends:
            raise UserError(f"{backend_dir}: backend {name!r} is not in its experiment's config.yaml.")
        model_cls = MODELS.get(cfg.model.name, field="model.name")
        sample_file = backend_dir.parent / Files.SAMPLE
        description = run_data(backend_dir.parent)
        # the sample stands in for the train data where a prior's data-based defaults need them
        x = load_file(str(sample_file))["x"] if sample_file.is_file() else torch.zeros(1, description["dim"])
        model = model_cls.from_config(cfg.model, x.to(torch.float64))
        file = backend_dir / Files.PARAMS
        try:
            params = check_given(model, load_file(str(file)), str(file))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{file}: cannot read the fitted parameters ({exc}).") from None
        summary = read_summary(backend_dir) or {}
        estimator = cls(**_estimator_params(cfg, name))
        estimator.n_features_in_ = model.dim
        if description["source"] not in ("synthetic", "npy"):  # columns with names, as a frame's
            estimator.feature_names_in_ = np.asarray(description["feature_names"], dtype=object)
        lower_bound = summary.get("elbo")
        if lower_bound is None:
            lower_bound = _last_objective(backend_dir, summary.get("restart", 0))
        estimator._set_fitted(
            model, params, bool(summary.get("converged", False)), int(summary.get("n_steps", 0)), lower_bound
        )
        return estimator


def _seed(random_state: Any) -> int:
    """A config seed for random_state: the int itself, a draw from a RandomState, or fresh."""
    if random_state is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    return int(check_random_state(random_state).randint(2**31))


def _full_covariances(covariance_type: str, tensors: Mapping[str, Tensor]) -> Tensor:
    """Given gmm covariances as (K, D, D), or in the covariance type's own (scikit-learn's) shape."""
    covariances, means = tensors["covariances"], tensors["means"]
    if covariances.dim() == 3 or covariance_type not in COVARIANCE_TYPES or means.dim() != 2:
        return covariances
    k, d = means.shape
    return COVARIANCE_TYPES[covariance_type].to_full(covariances, int(k), int(d))


def _fit_best(plan: Plan) -> tuple[FitResult, float]:
    """Fit the plan's one backend from each initial θ and keep the best by train log-likelihood,
    with the backend's last objective per point (its ELBO where it has one). As in a run: torch
    runs on the backend's own ``threads`` option where it has one, else the config's; Pyro's
    param store is cleared and Pyro's, torch's and NumPy's global generators are seeded before
    each restart (and restored afterwards, as the thread count is)."""
    (_, backend, options) = plan.backends[0]
    x = plan.data.train.to(plan.device, plan.dtype)
    best: tuple[float, FitResult, float] | None = None
    state = pyro.util.get_rng_state()
    try:
        with torch_threads(getattr(options, "threads", None) or plan.threads):
            for restart, init in enumerate(plan.inits):
                pyro.clear_param_store()
                pyro.set_rng_seed(_pyro_seed(plan.config.seed, restart))
                objectives: list[float] = []
                start = {name: value.to(plan.device, plan.dtype).clone() for name, value in init.items()}

                def report(info: StepInfo, sink: list[float] = objectives) -> None:
                    sink.append(info.objective)

                result = backend.fit(plan.model, x, start, options, report)
                train = mean_log_likelihood(plan.model, plan.data.train, result.params)
                objective = (
                    result.elbo if result.elbo is not None else objectives[-1] if objectives else train
                )
                if best is None or train > best[0]:
                    best = (train, result, objective)
    finally:
        pyro.util.set_rng_state(state)
    assert best is not None
    return best[1], best[2]


# what to raise when a backend stops before its rule is met, by the options each backend has
_BUDGETS = ("max_iter", "steps", "max_epochs", "num_samples")


def _not_converged(backend: str, result: FitResult, plan: Plan) -> str:
    fields = type(plan.backends[0][2]).model_fields
    budget = next((name for name in _BUDGETS if name in fields), None)
    if budget == "num_samples":  # a sampler: converged is its R-hat rule
        advice = "Draw more: raise num_samples, warmup_steps or num_chains."
    elif budget is not None:
        advice = f"Raise {budget}" + (" or tol." if "tol" in fields else ".")
    else:
        advice = "See the backend's options."
    return f"{backend} did not converge in {result.n_steps} steps. {advice}"


def _backend_dir(path: Path) -> Path:
    if (path / Files.PARAMS).is_file():
        return path
    if (path / Files.CONFIG).is_file():
        found = best_backend_dir(path)
        if found is not None:
            return found
        raise UserError(f"{path}: the experiment has no completed backend to load.")
    if not path.exists():
        raise UserError(f"{path}: no such run directory.")
    summary = read_summary(path)
    if summary is not None:
        raise UserError(
            f"{path}: has no params.safetensors (the backend's status is {summary.get('status')})."
        )
    raise UserError(f"{path}: not a run directory; name one such as runs/<experiment>/em.")


def run_data(experiment_dir: Path) -> dict[str, Any]:
    """An experiment's data.json, checked for what reading new data needs: ``source``, ``dim``
    and ``feature_names``."""
    file = experiment_dir / Files.DATA
    try:
        description = json.loads(file.read_text(encoding="utf-8"))
        names, dim, source = description["feature_names"], description["dim"], description["source"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{file}: cannot read the run's data description ({exc}).") from None
    if not isinstance(names, list) or len(names) != dim or not isinstance(source, str):
        raise UserError(
            f"{file}: expected {dim} feature_names and a source, but found {names!r}, {source!r}."
        )
    return dict(description)


def _last_objective(backend_dir: Path, restart: int) -> float:
    try:
        metrics = pd.read_csv(backend_dir / Files.METRICS)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return math.nan
    if "restart" in metrics.columns:
        metrics = metrics[metrics["restart"] == restart]
    return float(metrics["objective"].iloc[-1]) if len(metrics) else math.nan


def _estimator_params(cfg: Config, backend: str) -> dict[str, Any]:
    """The estimator parameters of a run's config: the model, init and the backend's options
    where they differ from their defaults."""
    model = cfg.model.model_dump(mode="json")
    defaults = type(cfg.model)().model_dump(mode="json")
    init: Any = cfg.init.method
    if cfg.init.method == "given":
        init = Path(str(cfg.init.path))
    elif cfg.init.method == "from_run":
        init = Path(str(cfg.init.run))
    option_defaults = BACKENDS.get(backend)().options().model_dump(mode="json")
    options = {
        key: value for key, value in cfg.backends[backend].items() if option_defaults.get(key) != value
    }
    return {
        "n_components": cfg.model.k,
        "model": cfg.model.name,
        "backend": backend,
        "covariance_type": model.get("covariance", "full"),
        "n_init": cfg.init.n_init,
        "random_state": cfg.seed,
        "prior": cfg.model.prior,
        "init": init,
        "model_options": {
            key: value
            for key, value in model.items()
            if key not in _OWN_MODEL_FIELDS and defaults.get(key) != value
        }
        or None,
        **options,
    }
