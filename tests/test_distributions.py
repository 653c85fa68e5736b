"""The declarations' Gaussian and Wishart (computed from the precision's Cholesky factor) against
torch's, and the positive-definite bijection against its definition and autograd's Jacobian."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch import Tensor

from ppl_gmm.models.distributions import PrecisionMultivariateNormal, Wishart
from ppl_gmm.models.transforms import PositiveDefiniteBijection

D = 3


def _spd(*batch: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, D, D, generator=gen, dtype=torch.float64)
    return a @ a.mT + 0.5 * torch.eye(D, dtype=torch.float64)


def _randn(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# (loc batch, precision batch, value batch): one point; points against one component; an
# enumerated component index (K, 1) against N points; extra leading dims on the value; a precision
# with more batch dims than the location
SHAPES = [
    ((), (), ()),
    ((), (), (7,)),
    ((4,), (4,), (7, 1)),
    ((4, 1), (4, 1), (4, 6)),
    ((4, 1), (4, 1), (9,)),
    ((2, 4), (4,), (5, 2, 4)),
    ((), (2, 1), (2, 5)),
]


@pytest.mark.parametrize(("loc_batch", "prec_batch", "value_batch"), SHAPES)
def test_normal_log_prob_and_gradients_equal_torch(loc_batch, prec_batch, value_batch) -> None:
    loc = _randn(*loc_batch, D).requires_grad_()
    precision = _spd(*prec_batch).requires_grad_()
    value = _randn(*value_batch, D, seed=2)
    ours = PrecisionMultivariateNormal(loc, precision).log_prob(value)
    theirs = dist.MultivariateNormal(loc, precision_matrix=precision).log_prob(value)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-12)
    ours_grads = torch.autograd.grad(ours.sum(), (loc, precision))
    theirs_grads = torch.autograd.grad(theirs.sum(), (loc, precision))
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_normal_moments_entropy_and_expand_equal_torch() -> None:
    loc, precision = _randn(4, D), _spd(4)
    ours = PrecisionMultivariateNormal(loc, precision)
    theirs = dist.MultivariateNormal(loc, precision_matrix=precision)
    assert (ours.batch_shape, ours.event_shape) == (theirs.batch_shape, theirs.event_shape)
    for name in ("mean", "variance", "covariance_matrix", "entropy"):
        a, b = getattr(ours, name), getattr(theirs, name)
        torch.testing.assert_close(
            a() if callable(a) else a, b() if callable(b) else b, rtol=1e-12, atol=1e-12
        )
    value = _randn(6, 1, D, seed=3)
    expanded = ours.expand(torch.Size((6, 4)))
    assert isinstance(expanded, PrecisionMultivariateNormal) and expanded.batch_shape == (6, 4)
    torch.testing.assert_close(
        expanded.log_prob(value), theirs.expand((6, 4)).log_prob(value), rtol=1e-13, atol=0
    )


def test_normal_draws_are_loc_plus_the_inverse_factor_times_standard_normals() -> None:
    loc, precision = _randn(2, D), _spd(2)
    torch.manual_seed(5)
    draws = PrecisionMultivariateNormal(loc, precision).rsample(torch.Size((1000,)))
    torch.manual_seed(5)
    eps = torch.randn(1000, 2, D, dtype=torch.float64)
    # x = μ + C⁻ᵀ ε, so Cᵀ (x - μ) gives the standard normals back; its covariance is Λ⁻¹
    tril = torch.linalg.cholesky(precision)
    torch.testing.assert_close(
        (tril.mT @ (draws - loc).unsqueeze(-1)).squeeze(-1), eps, rtol=1e-10, atol=1e-12
    )
    assert draws.shape == (1000, 2, D)


def test_wishart_log_prob_and_gradient_equal_torch() -> None:
    c0 = _spd(seed=4)
    value = _spd(5, seed=6).requires_grad_()
    nu = torch.tensor(D + 1.5, dtype=torch.float64)
    ours = Wishart(nu, precision_matrix=c0).expand((5,))
    theirs = dist.Wishart(nu, precision_matrix=c0).expand((5,))
    assert isinstance(ours, Wishart)
    torch.testing.assert_close(ours.log_prob(value), theirs.log_prob(value), rtol=1e-13, atol=1e-12)
    (ours_grad,) = torch.autograd.grad(ours.log_prob(value).sum(), value)
    (theirs_grad,) = torch.autograd.grad(theirs.log_prob(value).sum(), value)
    # the gradients of a function of a symmetric matrix agree on their symmetric part
    torch.testing.assert_close(ours_grad + ours_grad.mT, theirs_grad + theirs_grad.mT, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_bijection_is_l_lt_round_trips_and_has_autograds_jacobian(d: int) -> None:
    bijection = PositiveDefiniteBijection()
    vec = _randn(3, d * (d + 1) // 2, seed=d)
    tril = torch.zeros(3, d, d, dtype=torch.float64)
    rows, cols = torch.tril_indices(d, d)
    tril[:, rows, cols] = torch.where(rows == cols, vec.exp(), vec)
    matrix = bijection(vec)
    torch.testing.assert_close(matrix, tril @ tril.mT, rtol=1e-14, atol=0)
    torch.testing.assert_close(bijection.inv(matrix), vec, rtol=1e-12, atol=1e-12)
    # the Jacobian of vec ↦ the lower triangle of L Lᵀ (the matrix's free entries)
    for i in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v: bijection(v)[rows, cols], vec[i])
        log_det = torch.linalg.slogdet(jacobian).logabsdet
        torch.testing.assert_close(
            bijection.log_abs_det_jacobian(vec[i], matrix[i]), log_det, rtol=1e-12, atol=1e-12
        )
