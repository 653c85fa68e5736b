"""One scoring of any point estimate: exact log-likelihoods, BIC/AIC, ARI/NMI, component matching."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import Tensor

from . import distributed
from .data import Dataset
from .models.base import LatentModel, Params

__all__ = [
    "assignments",
    "match_components",
    "mean_log_likelihood",
    "parameter_errors",
    "permute",
    "posterior_moments",
    "relabel",
    "score",
]


SCORE_ROWS = 1 << 16  # rows scored at a time


def _cpu64(params: Params) -> dict[str, Tensor]:
    return {name: value.detach().to("cpu", torch.float64) for name, value in params.items()}


def mean_log_likelihood(model: LatentModel, x: Tensor, params: Params) -> float:
    """Mean over points of log p(x_n | θ), assignments summed out, in float64."""
    return float(model.log_likelihood(x.to(torch.float64), _cpu64(params)).mean())


def score(model: LatentModel, params: Params, data: Dataset) -> dict[str, float | int | None]:
    """Exact train/test log-likelihood per point, BIC, AIC and ICL (lower is better; ICL is BIC plus
    twice the entropy of the responsibilities, Biernacki et al. 2000), ARI and NMI of the most
    probable assignments against the true labels when the data have them."""
    params = _cpu64(params)
    n = data.train.shape[0]
    total = entropy = 0.0
    predicted = []
    if model.sequential:
        return _score_sequences(model, params, data)
    for rows in data.train.split(SCORE_ROWS):  # O(rows × K) memory, whatever N is
        log_joint = model.log_joint(rows.to(torch.float64), params)
        log_norm = torch.logsumexp(log_joint, dim=1, keepdim=True)
        total += float(log_norm.sum())
        log_resp = log_joint - log_norm
        entropy += float(-(log_resp.exp() * log_resp).nan_to_num().sum())
        if data.train_labels is not None:
            predicted.append(torch.argmax(log_joint, dim=1).numpy())
    if data.shard is not None:
        return _score_shard(model, params, data, total, entropy, predicted)
    test = None if data.test is None else mean_log_likelihood(model, data.test, params)
    labels = None if not predicted else np.concatenate(predicted)
    return _scores(model, n, total / n, test, entropy, data.train_labels, labels)


def _score_shard(
    model: LatentModel,
    params: Params,
    data: Dataset,
    total: float,
    entropy: float,
    predicted: list[np.ndarray],
) -> dict[str, float | int | None]:
    """``score``'s ending in a sharded run, from this rank's sums over its train rows: the sums
    (and the test split's) all-reduced, the labels gathered in row order for ARI and NMI."""
    test_total = 0.0
    if data.test is not None:
        for rows in data.test.split(SCORE_ROWS):
            test_total += float(model.log_likelihood(rows.to(torch.float64), params).sum())
    total, entropy, test_total = distributed.all_sum(values=[total, entropy, test_total])
    labels = found = None
    if data.train_labels is not None:
        mine = np.concatenate([np.asarray(data.train_labels)[:, None], np.concatenate(predicted)[:, None]], 1)
        both = distributed.gather_rows(torch.from_numpy(mine.astype(np.int64))).numpy()
        labels, found = both[:, 0], both[:, 1]
    test = None if data.test is None else test_total / data.n_test
    return _scores(model, data.n_train, total / data.n_train, test, entropy, labels, found)


def _score_sequences(model: LatentModel, params: Params, data: Dataset) -> dict[str, float | int | None]:
    """``score`` for a hidden Markov model bound to the train sequences: the train rows at once
    (forward–backward runs along whole sequences), ICL with the entropy of the state sequences'
    posterior, ARI and NMI of the Viterbi paths against the true states."""
    n = data.train.shape[0]
    x = data.train.to(torch.float64)
    total = float(model.log_likelihood(x, params).sum())
    entropy = model.state_entropy(x, params)
    predicted = model.most_probable_states(x, params).numpy() if data.train_labels is not None else None
    test = None
    if data.test is not None:
        test = mean_log_likelihood(model.bind(data.test_lengths), data.test, params)
    return _scores(model, n, total / n, test, entropy, data.train_labels, predicted)


def _scores(
    model: LatentModel,
    n: int,
    train: float,
    test: float | None,
    entropy: float,
    labels: np.ndarray | None,
    predicted: np.ndarray | None,
) -> dict[str, float | int | None]:
    n_params = model.n_params()
    ari = nmi = None
    if labels is not None and predicted is not None and math.isfinite(train):
        ari = float(adjusted_rand_score(labels, predicted))
        nmi = float(normalized_mutual_info_score(labels, predicted))
    return {
        "train_log_likelihood": train,
        "test_log_likelihood": test,
        "bic": -2.0 * n * train + n_params * math.log(n),
        "aic": -2.0 * n * train + 2.0 * n_params,
        "icl": -2.0 * n * train + n_params * math.log(n) + 2.0 * entropy,
        "n_params": n_params,
        "ari": ari,
        "nmi": nmi,
    }


def match_components(reference: Tensor, other: Tensor) -> np.ndarray:
    """The permutation of ``other``'s components that best matches ``reference``'s, by the
    Hungarian algorithm on squared distances. reference, other: (K, F) rows identifying the
    components (``LatentModel.component_features``); returns ``perm`` (K,) such that
    other[perm[k]] pairs with reference[k]."""
    cost = torch.cdist(reference.to(torch.float64), other.to(torch.float64)).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty_like(cols)
    perm[rows] = cols
    return perm


def permute(params: Params, perm: Tensor, axes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """Each tensor's components reordered by ``perm`` (K,) along all of its component ``axes``
    (a (K, K) transition matrix on both); tensors without component axes are kept."""
    out = {}
    for name, value in params.items():
        for axis in axes.get(name, ()):
            value = value.index_select(axis, perm.to(value.device))
        out[name] = value
    return out


def relabel(model: LatentModel, reference: Params, other: Params) -> dict[str, Tensor]:
    """``other`` with its components permuted to best match ``reference``'s."""
    perm = match_components(model.component_features(reference), model.component_features(other))
    return permute(other, torch.as_tensor(perm), model.component_axes)


def parameter_errors(model: LatentModel, reference: Params, other: Params) -> dict[str, float]:
    """Root-mean-square difference of each tensor after matching ``other``'s components to
    ``reference``'s, so label switching costs nothing. Empty when the two have different
    numbers of components."""
    reference, other = _cpu64(reference), _cpu64(other)
    if reference[model.pivot].shape != other[model.pivot].shape:
        return {}
    other = relabel(model, reference, other)
    return {
        name: float((other[name] - value).pow(2).mean().sqrt())
        for name, value in reference.items()
        if name in other and other[name].shape == value.shape
    }


def assignments(model: LatentModel, params: Params, data: Dataset) -> pd.DataFrame:
    """Hard (most probable) and soft assignments p(z_n = k | x_n, θ) of the train points, with the
    true label when the data have one. For a hidden Markov model (bound to the train sequences)
    the soft ones are the smoothed p(z_t = k | x, θ) and the hard one the Viterbi path."""
    log_joint = model.log_joint(data.train, _cpu64(params))
    resp = torch.softmax(log_joint, dim=1).numpy()
    # the most probable component; a hidden Markov model's: the Viterbi path
    frame = pd.DataFrame({"hard": model.most_probable_states(data.train, _cpu64(params)).numpy()})
    for k in range(resp.shape[1]):
        frame[f"p{k}"] = resp[:, k]
    if data.train_labels is not None:
        frame["label"] = data.train_labels
    return frame


def posterior_moments(model: LatentModel, draws: Sequence[Params], pivot: Params) -> dict[str, Tensor]:
    """Posterior mean and standard deviation of every tensor over ``draws``, each draw's
    components first relabelled to match those of ``pivot`` (a point estimate), so label
    switching does not blur the summaries. Returns ``{"<name>.mean": ..., "<name>.std": ...}``."""
    stacked: dict[str, list[Tensor]] = {}
    pivot = _cpu64(pivot)
    for draw in draws:
        for name, value in relabel(model, pivot, _cpu64(draw)).items():
            stacked.setdefault(name, []).append(value)
    moments = {}
    for name, values in stacked.items():
        tensor = torch.stack(values)
        moments[f"{name}.mean"] = tensor.mean(0)
        moments[f"{name}.std"] = (
            tensor.std(0, correction=1) if len(values) > 1 else torch.zeros_like(tensor[0])
        )
    return moments
