r"""Forced alignment in NumPy: the reference Viterbi of :mod:`deploy_ctc.align`, vectorized over the batch.

A Python loop over frames updates ``delta`` ``(n, L)`` (``L = 2S + 1`` lattice positions) for a chunk of samples
at once and records one backpointer per cell, the move into it (0 stay, 1 from ``s - 1``, 2 from ``s - 2``):

.. math::

    \delta_t(s) = y_t(l'_s) + \max\big(\delta_{t-1}(s), \delta_{t-1}(s-1), k_s \delta_{t-1}(s-2)\big)

The first maximal move wins (stay, then advance, then skip), the path ends on the last label unless the trailing
blank is strictly better, and ``delta`` is float64: the conventions every backend shares (see
:mod:`deploy_ctc.align`). Backpointers take one byte per cell; chunks keep them under :data:`_BACKPOINTER_BYTES`.
"""

from __future__ import annotations

import numpy as np

# Backpointer bytes (T x chunk x L) held at a time; larger batches are aligned chunk by chunk.
_BACKPOINTER_BYTES = 64 << 20


def lattice(targets, blank):
    """``(labels, skip)``: the extended label of each lattice position ``(N, 2S + 1)`` int64 and whether a cell
    may be entered from two positions back ``(N, 2S + 1)`` bool (a label differing from the previous label)."""
    N, S = targets.shape
    labels = np.full((N, 2 * S + 1), blank, dtype=np.int64)  # (N, L)
    labels[:, 1::2] = targets
    skip = np.zeros(labels.shape, dtype=bool)  # (N, L)
    skip[:, 3::2] = targets[:, 1:] != targets[:, :-1]
    return labels, skip


def forced_align(problem):
    """``(alignment, scores)``, both ``(T, N)``: int64 labels and the log-probs at them in ``log_probs``' dtype
    (float32 or float64), with the conventions of :mod:`deploy_ctc.align`."""
    lp = problem.log_probs  # (T, N, C)
    T, N, _ = lp.shape
    L = 2 * problem.targets.shape[1] + 1
    alignment = np.full((T, N), problem.blank, dtype=np.int64)  # (T, N)
    scores = np.zeros((T, N), dtype=lp.dtype)  # (T, N)
    chunk = max(1, _BACKPOINTER_BYTES // max(1, T * L))
    for first in range(0, N, chunk):
        part = slice(first, min(N, first + chunk))
        _align_chunk(lp[:, part], problem.targets[part], problem.input_lengths[part], problem.target_lengths[part],
                     problem.blank, alignment[:, part], scores[:, part])
    return alignment, scores


def _align_chunk(lp, targets, il, tl, blank, alignment, scores):
    """Align the samples of ``lp`` ``(T, n, C)`` into the ``(T, n)`` views ``alignment`` and ``scores``."""
    n = lp.shape[1]
    labels, skip = lattice(targets, blank)  # (n, L)
    L = labels.shape[1]
    inside = np.arange(L)[None, :] < 2 * tl[:, None] + 1  # (n, L) positions of each sample's own lattice
    rows = np.arange(n)[:, None]  # (n, 1)
    frames = int(il.max(initial=0))
    delta = np.full((n, L), -np.inf)  # (n, L) float64
    moves = np.zeros((frames, n, L), dtype=np.int8)  # (T', n, L) backpointers
    for t in range(frames):
        emit = lp[t][rows, labels].astype(np.float64)  # (n, L)
        emit = np.where((emit < np.inf) & inside, emit, -np.inf)  # NaN and +inf: impossible
        if t == 0:
            best = np.full((n, L), -np.inf)
            best[:, :2] = 0.0  # a path starts on the first blank or the first label
        else:
            best = delta.copy()  # stay
            shifted = np.concatenate([np.full((n, 2), -np.inf), delta], axis=1)  # (n, L + 2)
            one = shifted[:, 1:L + 1]  # (n, L) from s - 1
            two = np.where(skip, shifted[:, :L], -np.inf)  # (n, L) from s - 2
            advance = one > best
            best = np.where(advance, one, best)
            jump = two > best
            best = np.where(jump, two, best)
            moves[t] = np.where(jump, 2, advance.astype(np.int8))
        delta = np.where((t < il)[:, None], best + emit, delta)  # samples past their last frame keep theirs

    end_label = np.maximum(2 * tl - 1, 0)  # (n,)
    end_blank = 2 * tl  # (n,)
    on_label = (tl > 0) & (delta[np.arange(n), end_label] >= delta[np.arange(n), end_blank])
    state = np.where(on_label, end_label, end_blank)  # (n,)
    feasible = delta[np.arange(n), state] > -np.inf  # (n,)
    for t in range(frames - 1, -1, -1):
        live = np.flatnonzero((t < il) & feasible)  # (k,)
        label = labels[live, state[live]]  # (k,)
        alignment[t, live] = label
        scores[t, live] = lp[t, live, label]
        state[live] -= moves[t, live, state[live]]
        scores[t, (t < il) & ~feasible] = -np.inf
