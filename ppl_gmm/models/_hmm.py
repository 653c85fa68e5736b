"""The forward–backward recursions of a hidden Markov model (Bishop §13.2.2–13.2.4), batched over
sequences.

Rows of x hold the observations of all sequences one after another (``lengths``: each
sequence's number of rows, in row order). A chunk of sequences is padded to its longest and laid
out time-major, (T, S, K), so that each time step is one contiguous slice and one GEMM of the S
sequences' K forward (or backward) probabilities against the K × K transition matrix.

The recursions are scaled (Bishop §13.2.4): α̂_t = p(z_t | x_1..t) and c_t = p(x_t | x_1..t-1),
so no probability underflows whatever the length; each step's emission probabilities are divided
by their largest entry first, which then enters log c_t. Padded steps carry α̂ forward unchanged
and add nothing. Memory: O(sequences per chunk × longest length × K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["EStep", "forward_backward", "padding", "viterbi"]

CHUNK_ENTRIES = 1 << 22  # padded (step, sequence, state) entries per chunk: ~32 MB per float64 array


@dataclass
class EStep:
    """The E-step's sums over the data: log p(x) (a float, all sequences), the smoothed state
    probabilities γ (N, K) per row, Σ_s γ_s,1 (K,) and the expected transition counts
    Σ_s Σ_t ξ_s,t (K, K); ``step_log_likelihood`` (N,): log p(x_t | x_1..t-1) per row."""

    log_likelihood: float
    posteriors: Tensor
    first: Tensor
    transitions: Tensor
    step_log_likelihood: Tensor


def padding(lengths: Tensor) -> tuple[Tensor, Tensor]:
    """For sequences of ``lengths`` (S,) laid one after another in rows: the row of each padded
    (step, sequence) slot, (T, S) (a valid row index everywhere), and which slots hold an
    observation, (T, S) booleans; T is the longest length."""
    starts = torch.cumsum(lengths, 0) - lengths
    steps = torch.arange(int(lengths.max()), device=lengths.device)[:, None]
    mask = steps < lengths[None, :]
    rows = torch.where(mask, starts[None, :] + steps, starts[None, :])
    return rows, mask


def _chunks(lengths: Tensor, k: int) -> list[tuple[int, int]]:
    """Consecutive ranges of sequences whose padded (T, S, K) arrays hold at most
    ``CHUNK_ENTRIES`` entries (one sequence at least)."""
    chunks: list[tuple[int, int]] = []
    start, longest = 0, 0
    for s, length in enumerate(lengths.tolist()):
        longest_here = max(longest, length)
        if s > start and longest_here * (s - start + 1) * k > CHUNK_ENTRIES:
            chunks.append((start, s))
            start, longest_here = s, length
        longest = longest_here
    chunks.append((start, len(lengths)))
    return chunks


def forward_backward(
    log_emission: Tensor, lengths: Tensor, start: Tensor, transitions: Tensor, posteriors: bool = True
) -> EStep:
    """The E-step for log p(x_n | z_n = k) ``log_emission`` (N, K) of sequences of ``lengths``
    (S,), start probabilities (K,) and transition matrix (K, K) (rows: from). Without
    ``posteriors`` only the log-likelihoods (the forward pass)."""
    n, k = log_emission.shape
    like = log_emission
    gamma = like.new_zeros(n, k) if posteriors else like.new_zeros(0, k)
    first = like.new_zeros(k)
    counts = like.new_zeros(k, k)
    step_ll = like.new_empty(n)
    offsets = torch.cumsum(lengths, 0) - lengths
    for a, b in _chunks(lengths, k):
        chunk_lengths = lengths[a:b]
        rows, mask = padding(chunk_lengths)
        rows = rows + offsets[a]
        log_b = log_emission[rows]  # (T, S, K)
        peak = log_b.amax(-1, keepdim=True)
        emission = torch.exp(log_b - peak)
        alpha, scale = _forward(emission, mask, start, transitions)
        log_c = torch.where(mask, torch.log(scale) + peak[..., 0], 0.0)
        step_ll.index_put_((rows[mask],), log_c[mask])
        if not posteriors:
            continue
        beta = _backward(emission, mask, scale, transitions)
        gamma_chunk = alpha * beta
        gamma.index_put_((rows[mask],), gamma_chunk[mask])
        first += gamma_chunk[0].sum(0)
        if alpha.shape[0] > 1:
            # ξ_t(i, j) ∝ α̂_t-1(i) A_ij b_j(x_t) β̂_t(j) / c_t, summed over valid t ≥ 2 and sequences
            weight = emission[1:] * beta[1:] / scale[1:, :, None] * mask[1:, :, None]
            counts += alpha[:-1].reshape(-1, k).T @ weight.reshape(-1, k)
    log_likelihood = float(step_ll.sum(dtype=torch.float64))
    return EStep(log_likelihood, gamma, first, counts * transitions, step_ll)


def _forward(emission: Tensor, mask: Tensor, start: Tensor, transitions: Tensor) -> tuple[Tensor, Tensor]:
    """α̂ (T, S, K) and the scales c (T, S) (1 at padded steps) of the scaled forward pass, for
    emission probabilities (T, S, K) divided by each step's largest."""
    alpha = torch.empty_like(emission)
    scale = torch.ones(emission.shape[:2], dtype=emission.dtype, device=emission.device)
    joint = start * emission[0]
    scale[0] = joint.sum(-1)
    alpha[0] = joint / scale[0, :, None]
    for t in range(1, emission.shape[0]):
        joint = (alpha[t - 1] @ transitions) * emission[t]
        total = joint.sum(-1)
        valid = mask[t]
        scale[t] = torch.where(valid, total, 1.0)
        alpha[t] = torch.where(valid[:, None], joint / scale[t, :, None], alpha[t - 1])
    return alpha, scale


def _backward(emission: Tensor, mask: Tensor, scale: Tensor, transitions: Tensor) -> Tensor:
    """β̂ (T, S, K) of the scaled backward pass: 1 at each sequence's last step and after it."""
    beta = torch.ones_like(emission)
    for t in range(emission.shape[0] - 2, -1, -1):
        message = (emission[t + 1] * beta[t + 1] / scale[t + 1, :, None]) @ transitions.T
        beta[t] = torch.where(mask[t + 1][:, None], message, 1.0)
    return beta


def viterbi(log_emission: Tensor, lengths: Tensor, start: Tensor, transitions: Tensor) -> Tensor:
    """The most probable state path (N,) of each sequence (Bishop §13.2.5), in log space."""
    n, k = log_emission.shape
    path = torch.empty(n, dtype=torch.long, device=log_emission.device)
    log_start, log_trans = torch.log(start), torch.log(transitions)
    offsets = torch.cumsum(lengths, 0) - lengths
    for a, b in _chunks(lengths, k):
        rows, mask = padding(lengths[a:b])
        rows = rows + offsets[a]
        log_b = log_emission[rows]  # (T, S, K)
        steps = log_b.shape[0]
        best = log_start + log_b[0]
        back = torch.zeros(log_b.shape, dtype=torch.long, device=log_b.device)
        for t in range(1, steps):
            scores = best[:, :, None] + log_trans  # (S, from, to)
            top, argmax = scores.max(1)
            valid = mask[t][:, None]
            back[t] = torch.where(valid, argmax, torch.arange(k, device=log_b.device))
            best = torch.where(valid, top + log_b[t], best)
        state = best.argmax(-1)
        chunk_path = torch.empty(mask.shape, dtype=torch.long, device=log_b.device)
        chunk_path[steps - 1] = state
        for t in range(steps - 1, 0, -1):
            state = back[t].gather(1, state[:, None])[:, 0]
            chunk_path[t - 1] = state
        path.index_put_((rows[mask],), chunk_path[mask])
    return path
