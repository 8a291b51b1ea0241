"""NumPy backend: CTC loss and gradient for a whole batch on the CPU.

Fast path: scaled probability-space recursions (Rabiner-style scaling) in float64, a Python loop over time that is
vectorized over the batch and the ``L = 2S + 1`` positions of the extended label sequence
``l' = (blank, l_1, blank, ..., l_S, blank)``. Two chains run in the same loop for every sample: the forward chain
on ``(x, l)`` and the forward chain on the time- and label-reversed pair, which *is* the backward (beta) recursion
(CTC's lattice is symmetric under reversal), so alpha and beta cost one loop. With ``q_t`` the pre-emission
forward variable,

.. math::

    a_t(s) = q_t(s)\\, \\hat y_t(l'_s), \\qquad
    q_{t+1}(s) = \\frac{a_t(s) + a_t(s-1) + [l'_s \\ne l'_{s-2}]\\, a_t(s-2)}{c_t},

where ``y_hat_t = exp(log y_t - m_t)`` with ``m_t`` the frame's largest label log-probability and ``c_t`` a
normaliser applied every few steps. The reversed chain's ``q`` at mirrored time and position is ``beta'_t(s)``
(beta without the emission at ``t``), so the posterior of position ``s`` at frame ``t`` is

.. math::

    \\gamma_t(s) = \\frac{g_t(s)}{\\sum_{s'} g_t(s')}, \\qquad g_t(s) = q^{fwd}_t(s)\\, \\hat y_t(l'_s)\\,
    q^{rev}_{T_n-1-t}(L_n-1-s),

and ``log p(l|x) = log sum_s g_t(s) + (log-scales)`` must come out the same for every frame ``t``. That identity is
the accuracy check: a sample whose values it finds inconsistent (probability mass flushed to zero by extreme, peaky
inputs; all-``-inf`` frames; NaN) is recomputed exactly by the log-space twin :mod:`deploy_ctc.numpy_logspace`. The
gradient follows torch's convention (Graves eq. 16, the gradient through an upstream log_softmax):
``y_t(c) - sum_{s: l'_s = c} gamma_t(s)`` (``-sum gamma`` in the "plain" convention).

Work is split into chunks of samples whose tables fit a memory budget; chunks run on a small thread pool (NumPy
releases the GIL in its loops). Frames at ``t >= input_lengths[n]`` never enter the results.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from . import numpy_logspace
from .validation import CTCProblem

# Normalise the chains every _RESCALE_EVERY steps: each unnormalised step multiplies by at most 3 (y_hat <= 1), and
# a flush to zero in between is caught by the consistency check.
_RESCALE_EVERY = 4
# |log p(t) - log p(t')| above this (in nats) across frames marks a sample for the exact log-space path; float64
# rounding stays orders of magnitude below it.
_CONSISTENCY_TOL = 1e-9
# A frame whose posterior normaliser Z_t falls below exp(_LOG_Z_FLOOR) is too close to float64's subnormal range
# (1e-308) for 1/Z_t and the cells it sums to be trusted: such a sample takes the exact path.
_LOG_Z_FLOOR = -460.0  # ~1e-200
# Bytes of per-chunk tables (emissions, chains, posterior) that one worker handles at a time.
_CHUNK_TABLE_BYTES = 48 << 20
# Below this many table cells a batch is done in one chunk on the calling thread.
_PARALLEL_MIN_CELLS = 400_000


def forward_backward(problem, grad_scale=None, convention="torch"):
    """Per-sample negative log-likelihoods and, optionally, the scaled gradient (see ``notes/CONTRACT.md``).

    Args:
        problem: a validated :class:`deploy_ctc.validation.CTCProblem` with NumPy arrays; log_probs ``(T, N, C)``.
        grad_scale: ``(N,)`` float64 per-sample gradient weights, or None for the loss alone.
        convention: ``"torch"`` (``exp(lp) - posterior``) or ``"plain"`` (``-posterior``).

    Returns:
        ``(nll, grad)``: ``nll`` ``(N,)`` float64, ``+inf`` for infeasible targets; ``grad`` ``(T, N, C)`` in
        ``problem.log_probs.dtype`` (None without ``grad_scale``) with rows ``t >= input_lengths[n]`` exactly 0 and
        rows of infinite-loss samples NaN (0 when ``problem.zero_infinity``).
    """
    lp = problem.log_probs  # (T, N, C)
    T, N, C = lp.shape
    il, tl, targets = problem.input_lengths, problem.target_lengths, problem.targets
    # A target needs one frame per label plus one blank between each pair of equal neighbours.
    inside = np.arange(1, targets.shape[1])[None, :] < tl[:, None]  # (N, S - 1) pairs within the target
    repeats = np.count_nonzero((targets[:, 1:] == targets[:, :-1]) & inside, axis=1)  # (N,)
    feasible = il >= tl + repeats  # (N,)
    nll = np.where(feasible, np.nan, np.inf)  # (N,) filled in below
    nll[(il == 0) & (tl == 0)] = 0.0
    grad = None if grad_scale is None else np.zeros((T, N, C), dtype=lp.dtype)
    if grad is not None:
        grad_scale = np.asarray(grad_scale, dtype=np.float64)
    run = feasible & (il > 0)  # (N,) samples the recursions handle
    if not run.any():
        return _finish(problem, nll, grad)

    ok = np.ones(N, dtype=bool)

    def task(span):
        n0, n1 = span
        _scaled_chunk(lp[:, n0:n1], targets[n0:n1], il[n0:n1], tl[n0:n1], problem.blank, run[n0:n1],
                      nll[n0:n1], ok[n0:n1], None if grad is None else grad[:, n0:n1],
                      None if grad is None else grad_scale[n0:n1], convention)

    spans = _chunks(il, tl, C, grad is not None)
    if len(spans) > 1:
        list(_pool().map(task, spans))
    else:
        task(spans[0])

    redo = np.flatnonzero(run & ~ok)
    if redo.size:
        _exact(problem, redo, nll, grad, grad_scale, convention)
    return _finish(problem, nll, grad)


def _finish(problem, nll, grad):
    """Rows of samples with a non-finite loss: NaN, or 0 for +inf under zero_infinity (torch's behaviour)."""
    if grad is not None:
        for n in np.flatnonzero(~np.isfinite(nll) & (problem.input_lengths > 0)):
            zero = problem.zero_infinity and nll[n] == np.inf
            grad[: problem.input_lengths[n], n, :] = 0.0 if zero else np.nan
    return nll, grad


def _exact(problem, samples, nll, grad, grad_scale, convention):
    """Recompute ``samples`` with the exact log-space recursions and write them into ``nll`` / ``grad``."""
    sub = CTCProblem(xp=np, log_probs=problem.log_probs[:, samples], targets=problem.targets[samples],
                     input_lengths=problem.input_lengths[samples], target_lengths=problem.target_lengths[samples],
                     blank=problem.blank, reduction=problem.reduction, zero_infinity=problem.zero_infinity,
                     batched=True, out_dtype=problem.out_dtype)
    sub_nll, sub_grad = numpy_logspace.forward_backward(sub, None if grad is None else grad_scale[samples],
                                                         convention)
    nll[samples] = sub_nll
    if grad is not None:
        grad[:, samples] = sub_grad


@lru_cache(maxsize=1)
def _pool():
    return ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="deploy_ctc")


def _chunks(il, tl, C, with_grad):
    """Contiguous sample ranges ``[(n0, n1), ...]`` whose tables fit the budget; >= 2 when work is large."""
    N = il.shape[0]
    t_max, L = int(il.max()), 2 * int(tl.max()) + 1
    per_sample = t_max * (L + 2) * (2 * 8 + 2 * 8 + 8)  # emissions + chains (both directions) + posterior
    cells = t_max * N * (L + (C if with_grad else 0))
    count = -(-N * per_sample // _CHUNK_TABLE_BYTES)
    if cells >= _PARALLEL_MIN_CELLS:
        count = max(count, min(2, os.cpu_count() or 1))
    count = max(1, min(N, count))
    bounds = np.linspace(0, N, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _scaled_chunk(lp, targets, il, tl, blank, run, nll_out, ok_out, grad, grad_scale, convention):
    """Scaled recursions for a chunk of ``k`` samples; writes ``nll_out``, ``ok_out`` and ``grad`` in place.

    ``lp`` ``(T, k, C)``; ``targets`` ``(k, S)``; ``grad`` ``(T, k, C)`` zeros or None. Only samples with ``run``
    are written; ``ok_out[n]`` becomes False where the consistency check fails.
    """
    if not run.any():
        return
    k = tl.shape[0]
    S = int(tl.max())
    L = 2 * S + 1
    t_max = int(il.max())
    lattice = _ChainPair(targets[:, :S], tl, blank)
    emit, log_max = lattice.emissions(lp, il, t_max)  # (t_max, 2k, L), (t_max, 2k)
    q, log_scale = _recursion(emit, lattice.skip, store=grad is not None, il=il)

    last = il - 1  # (k,)
    n = np.arange(k)
    total_max = np.where(np.arange(t_max)[:, None] < il[None, :], log_max[:, :k], 0.0).sum(axis=0)  # (k,) M_n
    if grad is None:
        # q holds each chain's pre-emission values at its last frame: (2k, L + 2)
        log_p_fwd = _log_end_mass(q[:k], emit[last, n], lattice.lengths, log_scale[last, n]) + total_max
        log_p_rev = _log_end_mass(q[k:], emit[last, k + n], lattice.lengths, log_scale[last, k + n]) + total_max
        good = np.isfinite(log_p_fwd) & (np.abs(log_p_fwd - log_p_rev) <= _CONSISTENCY_TOL * np.maximum(
            1.0, np.abs(log_p_fwd)))
        nll_out[run] = -log_p_fwd[run]
        ok_out[run] = good[run]
        return

    post, log_z = _posterior(q, emit, lattice, il, t_max)  # (t_max, k, L), (t_max, k)
    del emit
    t_rev = np.maximum(last[None, :] - np.arange(t_max)[:, None], 0)  # (t_max, k)
    log_p = log_z + log_scale[:, :k] + log_scale[t_rev, k + n[None, :]] + total_max[None, :]  # (t_max, k)
    rows = np.arange(t_max)[:, None] < il[None, :]  # (t_max, k)
    log_p_end = log_p[last, n]  # (k,) the forward chain's end: torch's definition of the loss
    spread = np.where(rows, np.abs(log_p - log_p_end[None, :]), 0.0).max(axis=0)  # NaN propagates
    smallest_z = np.where(rows, log_z, 0.0).min(axis=0)  # (k,) a tiny Z_t means subnormal, imprecise values
    good = (np.isfinite(log_p_end) & (spread <= _CONSISTENCY_TOL * np.maximum(1.0, np.abs(log_p_end)))
            & (smallest_z > _LOG_Z_FLOOR))
    nll_out[run] = -log_p_end[run]
    ok_out[run] = good[run]
    use = run & good
    if use.any():
        _fill_gradient(grad, lp, post, lattice, il, np.where(use, grad_scale, 0.0), use, convention)


class _ChainPair:
    """Extended labels of the forward and reversed chains of ``k`` samples (``2k`` chains).

    Attributes:
        ext: ``(2k, L)`` int64 extended labels; rows ``k..2k`` are the reversed sequences; positions ``s >= L_n``
            hold blank and get zero emission, so no mass enters them.
        lengths: ``(k,)`` ``L_n = 2 target_lengths + 1``.
        skip: ``(2k, L)`` float64 1 where the move ``s - 2 -> s`` is allowed (a label differing from ``l'_{s-2}``).
    """

    def __init__(self, targets, tl, blank):
        k, S = targets.shape
        L = 2 * S + 1
        self.k, self.L = k, L
        self.lengths = 2 * tl + 1  # (k,)
        s = np.arange(L)
        self.valid = s[None, :] < self.lengths[:, None]  # (k, L)
        fwd = np.full((k, L), blank, dtype=np.int64)  # (k, L)
        fwd[:, 1::2] = targets
        mirror = np.clip(self.lengths[:, None] - 1 - s[None, :], 0, L - 1)  # (k, L) L_n - 1 - s
        rev = np.where(self.valid, np.take_along_axis(fwd, mirror, axis=1), blank)  # (k, L)
        self.fwd = fwd
        self.mirror = mirror
        self.ext = np.concatenate([fwd, rev])  # (2k, L)
        skip = np.zeros((2 * k, L))
        skip[:, 3::2] = self.ext[:, 3::2] != self.ext[:, 1:-2:2]
        skip *= np.concatenate([self.valid, self.valid])
        self.skip = skip

    def emissions(self, lp, il, t_max):
        """Scaled emissions ``y_hat`` ``(t_max, 2k, L)`` and their log-scales ``m`` ``(t_max, 2k)``.

        The forward chain reads frame ``min(t, T_n - 1)``, the reversed chain frame ``max(T_n - 1 - t, 0)``: rows
        past a sample's length repeat valid frames, so padding (possibly NaN) is never read; their values are never
        used. ``y_hat = exp(log y - m)`` is float64 for float64 input and float32 for float32 input (the input's
        own precision).
        """
        k, L = self.k, self.L
        t = np.arange(t_max)[:, None]
        last = np.maximum(il - 1, 0)[None, :]
        t_index = np.concatenate([np.minimum(t, last), np.maximum(last - t, 0)], axis=1)  # (t_max, 2k)
        sample = np.concatenate([np.arange(k), np.arange(k)])  # (2k,)
        emit = lp[t_index[:, :, None], sample[None, :, None], self.ext[None, :, :]]  # (t_max, 2k, L)
        invalid = ~np.concatenate([self.valid, self.valid])  # (2k, L)
        if invalid.any():
            emit[:, invalid] = -np.inf
        log_max = emit.max(axis=2)  # (t_max, 2k)
        np.subtract(emit, log_max[:, :, None], out=emit)
        np.exp(emit, out=emit)
        return emit, log_max.astype(np.float64)


def _recursion(emit, skip, store, il):
    """Run the ``2k`` scaled chains over time.

    Returns:
        ``(q, log_scale)``: with ``store``, ``q`` ``(t_max, 2k, L + 2)`` pre-emission values (columns 0, 1 are zero
        padding for the shifts; column ``s + 2`` is position ``s``); without, ``q`` ``(2k, L + 2)`` each chain's row
        at its last frame ``T_n - 1``. ``log_scale`` ``(t_max, 2k)``: the log of the normalisers divided out of
        ``q_t`` so far (true ``q_t = q_hat_t * exp(log_scale_t + sum_{tau<t} m_tau)``).
    """
    t_max, chains, L = emit.shape
    k = chains // 2
    q = np.zeros((t_max if store else 2, chains, L + 2))
    q[0, :, 2:4] = 1.0
    a = np.zeros((chains, L + 2))  # a_t with the same zero padding
    shift2 = np.empty((chains, L))
    norm = np.ones((t_max, chains))
    captured = None if store else np.zeros((chains, L + 2))
    ends_at = {} if store else _chains_ending_at(il, t_max)
    for t in range(t_max):
        q_t = q[t if store else t % 2]
        if not store and t in ends_at:
            captured[ends_at[t]] = q_t[ends_at[t]]
        if t == t_max - 1:
            break
        np.multiply(q_t[:, 2:], emit[t], out=a[:, 2:])
        if t % _RESCALE_EVERY == 0:
            c = norm[t]
            np.max(a, axis=1, out=c)
            np.divide(a, c[:, None], out=a)
        q_next = q[t + 1 if store else (t + 1) % 2, :, 2:]
        np.multiply(a[:, :L], skip, out=shift2)
        np.add(a[:, 2:], a[:, 1:L + 1], out=q_next)
        np.add(q_next, shift2, out=q_next)
    with np.errstate(divide="ignore"):
        log_norm = np.log(norm)  # (t_max, chains)
    log_scale = np.zeros((t_max, chains))
    np.cumsum(log_norm[:-1], axis=0, out=log_scale[1:])
    return (q if store else captured), log_scale


def _chains_ending_at(il, t_max):
    """``{t: chain indices (both directions) whose last frame is t}``."""
    k = il.shape[0]
    both = np.concatenate([il, il])
    return {int(t) - 1: np.flatnonzero(both == t) for t in np.unique(il) if 0 < t <= t_max} if k else {}


def _log_end_mass(q_last, emit_last, lengths, log_scale_last):
    """``log sum_{s in {L_n-1, L_n-2}} q_hat(s) y_hat(s) + log_scale`` per chain: the chain's log-likelihood
    without the emission log-scales. ``q_last`` ``(k, L + 2)``, ``emit_last`` ``(k, L)``."""
    n = np.arange(q_last.shape[0])
    end = lengths - 1
    mass = q_last[n, end + 2] * emit_last[n, end]
    prev = np.maximum(end - 1, 0)
    mass = mass + np.where(lengths > 1, q_last[n, prev + 2] * emit_last[n, prev], 0.0)
    with np.errstate(divide="ignore"):
        return np.log(mass) + log_scale_last


def _posterior(q, emit, lattice, il, t_max):
    """Normalised posteriors ``gamma`` ``(t_max, k, L)`` (0 for ``t >= T_n``) and ``log Z_t`` ``(t_max, k)``."""
    k, L = lattice.k, lattice.L
    t = np.arange(t_max)[:, None, None]
    t_rev = np.maximum(il[None, :, None] - 1 - t, 0)  # (t_max, k, 1)
    g = q[:, :k, 2:] * emit[:, :k]  # (t_max, k, L)
    g *= q[t_rev, k + np.arange(k)[None, :, None], lattice.mirror[None, :, :] + 2]  # beta' at mirrored cells
    g *= lattice.valid[None, :, :]
    z = g.sum(axis=2)  # (t_max, k)
    rows = t[:, :, 0] < il[None, :]  # (t_max, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(rows & (z > 0), 1.0 / z, 0.0)  # (t_max, k)
        log_z = np.log(z)
    g *= scale[:, :, None]
    return g, log_z


def _fill_gradient(grad, lp, post, lattice, il, grad_scale, use, convention):
    """``grad[t, n, c] = grad_scale[n] * (exp(lp) - sum_{s: l'_s = c} gamma_t(s))`` for ``t < il[n]`` and ``use``.

    ``grad`` ``(T, k, C)`` arrives zeroed; ``post`` ``(t_max, k, L)``. Rows are processed in blocks of a few MB so
    the exp, the scaling and the scatter of the class-summed posterior touch the block while cache-resident.
    """
    T, k, C = grad.shape
    t_max = post.shape[0]
    samples, positions, starts, columns = _class_groups(lattice.fwd, lattice.valid & use[:, None], C)
    column_scale = grad_scale[columns // C]  # (G,)
    flat = grad.reshape(T, k * C) if grad.flags.c_contiguous else None
    ones = bool(np.all(grad_scale[use] == 1.0))
    all_used = bool(use.all())
    scale = grad_scale.astype(grad.dtype)[None, :, None]  # (1, k, 1)
    short = [(n, int(il[n])) for n in range(k) if use[n] and il[n] < t_max]
    step = max(1, (4 << 20) // max(1, k * C * grad.itemsize))
    for t0 in range(0, t_max, step):
        t1 = min(t0 + step, t_max)
        g = grad[t0:t1]  # (rows, k, C)
        if convention == "torch":
            if all_used:
                np.exp(lp[t0:t1], out=g)
            else:
                for n in np.flatnonzero(use):
                    np.exp(lp[t0:t1, n], out=g[:, n])
            if not ones:
                np.multiply(g, scale, out=g)
            for n, length in short:
                g[max(length - t0, 0):, n, :] = 0.0
        if positions.size:
            agg = np.add.reduceat(post[t0:t1, samples, positions], starts, axis=1)  # (rows, G)
            agg *= column_scale
            if flat is not None:
                rows = flat[t0:t1]
                rows[:, columns] -= agg.astype(grad.dtype, copy=False)
            else:
                g[:, columns // C, columns % C] -= agg.astype(grad.dtype, copy=False)


def _class_groups(ext, valid, C):
    """Group valid lattice cells by (sample, class) for the scatter into the gradient's classes.

    Returns:
        ``(samples, positions, starts, columns)``: cells ``(samples[i], positions[i])`` sorted by group; ``starts``
        the first cell of each group (for ``np.add.reduceat``); ``columns`` each group's flattened ``n * C + c``.
    """
    k = ext.shape[0]
    keys = (np.arange(k)[:, None] * C + ext)[valid]  # (P,)
    samples, positions = np.nonzero(valid)
    order = np.argsort(keys, kind="stable")
    keys, samples, positions = keys[order], samples[order], positions[order]
    columns, starts = np.unique(keys, return_index=True)
    return samples, positions, starts, columns
