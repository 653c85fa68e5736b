"""A bijection onto positive-definite matrices, so that every Pyro guide can handle precision sites.

torch registers ``transform_to(positive_definite)`` (not bijective: it ignores the upper triangle)
but no ``biject_to``, so ``AutoNormal`` and ``AutoMultivariateNormal`` fail on Wishart sites.
This module registers one: an unconstrained vector of D(D+1)/2 entries fills a lower-triangular
L with a positive (exponentiated) diagonal, and the matrix is L Lᵀ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import Transform

__all__ = ["PositiveDefiniteBijection"]


def _dim_from_vector(n: int) -> int:
    d = int(round((math.sqrt(8 * n + 1) - 1) / 2))
    if d * (d + 1) // 2 != n:
        raise ValueError(f"Expected a vector of D(D+1)/2 entries, but found {n}.")
    return d


class PositiveDefiniteBijection(Transform):
    """vec (..., D(D+1)/2) ↦ L Lᵀ (..., D, D), with L lower-triangular and L_ii = exp(vec_ii)."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.positive_definite
    bijective = True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PositiveDefiniteBijection)

    def __hash__(self) -> int:
        return hash(type(self))

    @staticmethod
    def _indices(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        rows, cols = torch.tril_indices(d, d, device=device)
        return rows, cols, rows == cols

    @staticmethod
    def _positions(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Where the vector holds each entry of L, row by row ((D, D), the upper triangle pointing
        one past the end), and where it holds L's diagonal ((D,)). Made from Python numbers: a
        recorded step keeps them as constants."""
        past_end = d * (d + 1) // 2
        position = [[i * (i + 1) // 2 + j if j <= i else past_end for j in range(d)] for i in range(d)]
        diagonal = [i * (i + 1) // 2 + i for i in range(d)]
        return (
            torch.tensor(position, dtype=torch.long, device=device),
            torch.tensor(diagonal, dtype=torch.long, device=device),
        )

    def _call(self, x: Tensor) -> Tensor:
        d = _dim_from_vector(x.shape[-1])
        _, _, diagonal = self._indices(d, x.device)
        entries = torch.where(diagonal, x.exp(), x)
        # L read off the entries (a gather, not a scatter into zeros: both directions of it fuse
        # into one loop when the step is compiled); the upper triangle reads a zero put after them
        position, _ = self._positions(d, x.device)
        padded = torch.cat([entries, entries.new_zeros(*entries.shape[:-1], 1)], dim=-1)
        tril = padded[..., position]
        return tril @ tril.mT

    def _inverse(self, y: Tensor) -> Tensor:
        d = y.shape[-1]
        rows, cols, diagonal = self._indices(d, y.device)
        entries = torch.linalg.cholesky(y)[..., rows, cols]
        return torch.where(diagonal, entries.log(), entries)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # vec → L: Π L_ii (the exp); L → L Lᵀ: 2^D Π_i L_ii^(D - i + 1), i = 1..D
        d = y.shape[-1]
        _, diagonal = self._positions(d, x.device)
        log_diag = x[..., diagonal]
        powers = torch.arange(d + 1, 1, -1, dtype=x.dtype, device=x.device)
        return d * math.log(2.0) + (powers * log_diag).sum(-1)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        d = _dim_from_vector(shape[-1])
        return torch.Size((*shape[:-1], d, d))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        d = shape[-1]
        return torch.Size((*shape[:-2], d * (d + 1) // 2))


try:
    biject_to(constraints.positive_definite)
except NotImplementedError:
    biject_to.register(constraints.positive_definite)(lambda constraint: PositiveDefiniteBijection())
