"""The Gaussian mixture's EM kernel: a block of points becomes one design (φ(x), 1, x), so that
the block's log-joint and its sufficient statistics are one GEMM each. Private to ``gmm.py``,
which uses it behind the ``ClosedFormEM`` hooks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DesignBuffer",
    "Prepared",
    "block_design",
    "block_log_joint",
    "moments_by_rows",
    "phi_count",
    "prepare_gaussians",
    "unvech",
    "weighted_moments",
    "wrap_rows",
]


def _offsets(d: int) -> tuple[int, int]:
    """The order of φ(x), the D(D+1)/2 products x_i x_j, i <= j, of a point of dimension D: for
    each offset o = 0, ..., ``spans`` - 1 the D products x_i x_{(i + o) mod D}, i = 0, ..., D - 1,
    then (D even) the ``half`` = D/2 products x_i x_{i + D/2}, i < D/2. Each pair comes once, and
    whole offsets make the features a few large products (``_BlockViews``)."""
    return ((d + 1) // 2, 0) if d % 2 else (d // 2, d // 2)


@functools.cache
def _pairs(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (i, j) of each feature of φ(x), in its order (see ``_offsets``); built once per D and
    device (each EM iteration asks twice), so never to be written to."""
    spans, half = _offsets(d)
    index = torch.arange(d, device=device)
    rows = torch.cat([index.repeat(spans), index[:half]])
    cols = torch.cat([(index + offset) % d for offset in range(spans)] + [index[:half] + half])
    return rows, cols


def wrap_rows(kernel: str, d: int) -> int:
    """How many rows of scratch a design needs after it: the first ``spans`` - 1 coordinates
    again, so that the products of each offset are one strided view (see ``_BlockViews``)."""
    return 0 if kernel == "diag" else _offsets(d)[0] - 1


def unvech(v: Tensor, d: int) -> Tensor:
    """Symmetric (..., D, D) matrices from their features (..., D(D+1)/2), in φ(x)'s order."""
    rows, cols = _pairs(d, v.device)
    out = v.new_zeros(*v.shape[:-1], d, d)
    out[..., rows, cols] = v
    out[..., cols, rows] = v
    return out


def _quadratic_weights(precisions: Tensor) -> Tensor:
    """Λ (K, D, D) → (K, D(D+1)/2) such that it @ φ(x) = x^T Λ_k x."""
    d = precisions.shape[-1]
    rows, cols = _pairs(d, precisions.device)
    return (precisions[:, rows, cols] * torch.where(rows == cols, 1.0, 2.0).to(precisions)).contiguous()


@dataclass(frozen=True)
class Prepared:
    """Per-iteration constants of the E-step, so that a row block's log-joint is one GEMM:
    (x - μ)^T Λ (x - μ) = φ(x) · q(Λ) - 2 x · Λμ + μ^T Λ μ, with φ the row's features, so
    log p(x, k | θ) = coefficients_k · (φ(x), 1, x) (see ``block_design``).

    kernel "quadratic" (full, tied): φ(x) the products x_i x_j, i <= j (in ``_offsets``' order),
    matrix (K, D(D+1)/2); kernel "diag" (diag, spherical): φ(x) = x², matrix (K, D) the precisions.
    linear (K, D) the Λ_k μ_k; const (K, 1) the μ_k^T Λ_k μ_k; log_norm (K, 1) log π_k + ½ log|Λ_k|
    - D/2 log 2π; coefficients (K, F + 1 + D) the rows (-½ matrix_k, log_norm_k - ½ const_k,
    linear_k). Points and means are measured from ``shift`` (D,), so that the expansion keeps its
    digits.
    """

    kernel: str
    shift: Tensor
    matrix: Tensor
    linear: Tensor
    const: Tensor
    log_norm: Tensor
    coefficients: Tensor


def prepare_gaussians(
    weights: Tensor, means: Tensor, covariances: Tensor, kernel: str, shift: Tensor
) -> Prepared:
    """The E-step constants for weights (K,), means (K, D), covariances (K, D, D)."""
    d = means.shape[1]
    centered = means - shift
    chol = torch.linalg.cholesky(covariances)
    log_det = -2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    if kernel == "diag":
        precisions = 1.0 / torch.diagonal(covariances, dim1=-2, dim2=-1)
        linear = centered * precisions
        matrix = precisions.contiguous()
    else:
        full = torch.cholesky_inverse(chol)
        linear = (full @ centered[:, :, None]).squeeze(-1)
        matrix = _quadratic_weights(full)
    const = (linear * centered).sum(-1)[:, None]
    log_norm = (torch.log(weights) + 0.5 * log_det - 0.5 * d * math.log(2 * math.pi))[:, None]
    coefficients = torch.cat([-0.5 * matrix, log_norm - 0.5 * const, linear], dim=1)
    return Prepared(kernel, shift, matrix, linear.contiguous(), const, log_norm, coefficients)


def phi_count(kernel: str, d: int) -> int:
    """How many features φ(x) a point of dimension ``d`` has under ``kernel``."""
    return d if kernel == "diag" else d * (d + 1) // 2


class _BlockViews:
    """The views of a flat buffer that the design of a block of ``b`` points needs, made once:
    the design (F + 1 + D, B) holds φ(x) (F rows), 1 and x (D rows), then come ``wrap_rows`` of
    scratch. φ(x) takes two or three kernels whatever D (see ``_offsets``): with the views ready,
    a block costs five or six calls into torch, which keeps the worker lanes of a pass from
    queueing for the interpreter."""

    def __init__(self, buffer: Tensor, shift: Tensor, kernel: str, d: int, b: int) -> None:
        f = phi_count(kernel, d)
        lines = f + 1 + d + wrap_rows(kernel, d)
        grid = buffer[: lines * b].view(lines, b)
        self.shift = shift
        self.column = shift[:, None]
        self.design = grid[: f + 1 + d]
        self.x = grid[f + 1 : f + 1 + d]
        self.ones = grid[f]
        self.wrap: tuple[Tensor, Tensor] | None = None  # (source, copy)
        self.products: list[tuple[Tensor, Tensor, Tensor]] = []  # torch.mul's (left, right, out)
        if kernel == "diag":
            self.products.append((self.x, self.x, grid[:f]))
            return
        spans, half = _offsets(d)
        wrapped = grid[f + 1 :]  # x, then its first spans - 1 rows again
        if spans > 1:
            self.wrap = (wrapped[: spans - 1], wrapped[d:])
        windows = wrapped.as_strided((spans, d, b), (b, b, 1))  # offset o: rows o, ..., o + D - 1
        self.products.append((windows, self.x, grid[: spans * d].view(spans, d, b)))
        if half:
            self.products.append((self.x[:half], self.x[half:], grid[spans * d : f]))

    def fill(self, rows: Tensor, ones: bool) -> Tensor:
        """The design of rows (B, D); ``ones``: whether to write its row of ones, which stays in
        place until a block of another size uses the buffer."""
        torch.sub(rows.T, self.column, out=self.x)
        if self.wrap is not None:
            self.wrap[1].copy_(self.wrap[0])
        for left, right, out in self.products:
            torch.mul(left, right, out=out)
        if ones:
            self.ones.fill_(1.0)
        return self.design


class DesignBuffer:
    """A flat buffer for the designs of blocks of up to ``rows`` points (``block_design``), with
    the views of the block sizes it has served, so that each block pays for its kernels only."""

    def __init__(self, like: Tensor, kernel: str, d: int, rows: int) -> None:
        self.kernel, self.d = kernel, d
        self.flat = like.new_empty((phi_count(kernel, d) + 1 + d + wrap_rows(kernel, d)) * rows)
        self._views: dict[int, _BlockViews] = {}
        self._last: _BlockViews | None = None  # whose layout the buffer holds

    def design(self, rows: Tensor, shift: Tensor) -> Tensor:
        """The design of rows (B, D) measured from ``shift``, in this buffer."""
        b = rows.shape[0]
        views = self._views.get(b)
        if views is None or views.shift is not shift:
            if len(self._views) >= 4:  # a pass has at most two block sizes per lane
                self._views.clear()
            views = self._views[b] = _BlockViews(self.flat, shift, self.kernel, self.d, b)
        design = views.fill(rows, ones=views is not self._last)
        self._last = views
        return design


def block_design(rows: Tensor, shift: Tensor, kernel: str, out: DesignBuffer | None = None) -> Tensor:
    """The design of points rows (B, D) measured from ``shift`` (D,): (F + 1 + D, B), one point per
    column, holding φ(x) (F rows), 1 and x (D rows). It is laid out transposed, points along
    columns, so that both GEMMs of a block (the log-joint and the statistics) have long rows.
    ``out``: a buffer for at least B points, reused (its views too) from block to block."""
    b, d = rows.shape
    if out is None:
        out = DesignBuffer(rows, kernel, d, b)
    return out.design(rows, shift)


def weighted_moments(design: Tensor, resp: Tensor) -> Tensor:
    """Σ_n design[:, n] resp[:, n]^T for a design (R, B) and responsibilities (K, B): (R, K).

    Both orientations of the GEMM give the same sums up to rounding, but not at the same speed.
    Measured with torch 2.13's MKL on one core (GFLOP/s of the two GEMMs alone, B = 2048-16384,
    the designs of D = 8 and 16): in float64 resp @ design^T was never slower and often much
    faster (R = 153, K = 16: 29-36 against 20-26; K = 8: 19-31 against 9-14; R = 17, K = 8: 21
    against 14); in float32 it was faster up to K = 8 (R = 153: 47-56 against 37-44), and
    design @ resp^T faster at K = 16 (R = 45: 66-72 against 50-52). Those figures are from the
    Intel machine of the README's earlier runs; on the 2-vCPU AMD EPYC of its latest runs (one
    core, best of 5, B = 4096-25000) the same choice won: float64 17-22 against 13-19, float32
    K = 8 35-41 against 31-32, K = 16 53-64 against 41-50. The choice depends on shapes and dtype
    only, so results stay reproducible."""
    if moments_by_rows(design.dtype, resp.shape[0]):
        return torch.mm(design, resp.T)
    return torch.mm(resp, design.T).T


def moments_by_rows(dtype: torch.dtype, k: int) -> bool:
    """Whether ``weighted_moments`` computes design @ resp^T, (R, K), rather than resp @ design^T."""
    return dtype == torch.float32 and k > 8


def block_log_joint(design: Tensor, prepared: Prepared, out: Tensor | None = None) -> Tensor:
    """log π_k + log N(x_n | μ_k, Σ_k) for a block's design (F + 1 + D, B) (``block_design``):
    (K, B), written into ``out`` (K, B) when given."""
    return torch.mm(prepared.coefficients, design, out=out)
