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

CHUNK_ENTRIES = 1 << 23  # padded (step, sequence, state) entries per chunk: 64 MB per float64 array


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


class _Layout:
    """How a chunk of sequences (rows ``first`` to ``last`` of x) maps to its padded time-major
    (T, S, K) arrays, longest sequence first. Sequences of one length are a reshape and a
    transpose of their rows (a strided copy); others go through an index of their rows."""

    def __init__(self, lengths: Tensor, offsets: Tensor) -> None:
        self.first = int(offsets[0])
        self.last = int(offsets[-1] + lengths[-1])
        self.equal = bool((lengths == lengths[0]).all())
        if self.equal:
            self.shape = (len(lengths), int(lengths[0]))
            self.running = [len(lengths)] * int(lengths[0])
            return
        order = torch.argsort(lengths, descending=True, stable=True)
        ordered = lengths[order]
        rows, mask = padding(ordered)
        self.rows = (rows - (torch.cumsum(ordered, 0) - ordered) + offsets[order] - self.first)[mask]
        self.mask = mask
        self.running = mask.sum(1).tolist()  # sequences (a prefix) still running at each step

    def gather(self, values: Tensor) -> Tensor:
        """The chunk's rows of values (N, ...) as a new padded (T, S, ...) array."""
        mine = values[self.first : self.last]
        if self.equal:
            return mine.view(*self.shape, *mine.shape[1:]).transpose(0, 1).contiguous()
        out = mine.new_zeros(*self.mask.shape, *mine.shape[1:])
        out[self.mask] = mine[self.rows]
        return out

    def scatter(self, padded: Tensor, values: Tensor) -> None:
        """Write a padded (T, S, ...) array's observed entries into the chunk's rows of values."""
        mine = values[self.first : self.last]
        if self.equal:
            mine.view(*self.shape, *mine.shape[1:]).copy_(padded.transpose(0, 1))
        else:
            mine.index_put_((self.rows,), padded[self.mask])


def _gram(a: Tensor, b: Tensor, rows: int = 8192) -> Tensor:
    """a^T b for a (N, K), b (N, K), in blocks of rows: a single GEMM with an inner dimension of
    millions is several times slower than its blocks'."""
    return sum(
        (x.T @ y for x, y in zip(a.split(rows), b.split(rows), strict=True)),
        a.new_zeros(a.shape[1], b.shape[1]),
    )


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
        layout = _Layout(lengths[a:b], offsets[a:b])
        emission = layout.gather(log_emission)  # (T, S, K), log densities until scaled in place
        peak = emission.amax(-1, keepdim=True)
        emission.sub_(peak).exp_()
        alpha, scale = _forward(emission, layout.running, start, transitions)
        layout.scatter(torch.log(scale).add_(peak[..., 0]), step_ll)
        if not posteriors:
            continue
        weighted = emission.div_(scale[..., None])  # b_k(x_t) / c_t, the backward pass's factor
        beta = _backward(weighted, layout.running, transitions)  # weighted: b β̂ / c at steps ≥ 2
        if alpha.shape[0] > 1:
            # Σ_t ξ_t(i, j) = A_ij Σ_t α̂_t-1(i) b_j(x_t) β̂_t(j) / c_t, padded steps zero
            counts += _gram(alpha[:-1].reshape(-1, k), weighted[1:].reshape(-1, k))
        state = beta.mul_(alpha)  # γ
        layout.scatter(state, gamma)
        first += state[0].sum(0)
    log_likelihood = float(step_ll.sum(dtype=torch.float64))
    return EStep(log_likelihood, gamma, first, counts * transitions, step_ll)


def _forward(
    emission: Tensor, running: list[int], start: Tensor, transitions: Tensor
) -> tuple[Tensor, Tensor]:
    """α̂ (T, S, K) and the scales c (T, S) of the scaled forward pass, for emission probabilities
    (T, S, K) divided by each step's largest; ``running[t]``: the sequences (a prefix, longest
    first) observed at step t. Padded steps keep α̂ = 0 and c = 1."""
    alpha = torch.zeros_like(emission)
    scale = torch.ones(emission.shape[:2], dtype=emission.dtype, device=emission.device)
    torch.mul(start, emission[0], out=alpha[0])
    torch.sum(alpha[0], -1, out=scale[0])
    alpha[0].div_(scale[0, :, None])
    for t in range(1, emission.shape[0]):
        m = running[t]
        now = alpha[t, :m]
        torch.mm(alpha[t - 1, :m], transitions, out=now)
        now.mul_(emission[t, :m])
        torch.sum(now, -1, out=scale[t, :m])
        now.div_(scale[t, :m, None])
    return alpha, scale


def _backward(weighted: Tensor, running: list[int], transitions: Tensor) -> Tensor:
    """β̂ (T, S, K) of the scaled backward pass (1 at each sequence's last step and after it),
    for b_k(x_t) / c_t ``weighted`` (T, S, K), which it turns into b_k(x_t) β̂_t(k) / c_t at the
    steps t ≥ 2 that are observed and 0 at the padded ones."""
    steps = weighted.shape[0]
    beta = torch.ones_like(weighted)
    for t in range(steps - 2, -1, -1):
        m = running[t + 1]
        message = weighted[t + 1]
        message[:m].mul_(beta[t + 1, :m])
        message[m:] = 0.0
        torch.mm(message[:m], transitions.T, out=beta[t, :m])
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
