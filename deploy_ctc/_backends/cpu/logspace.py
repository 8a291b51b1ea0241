"""NumPy backend: CTC loss and gradient for a whole batch on the CPU.

The forward (alpha) and backward (beta) recursions of Graves et al. (2006) run in log space in float64, as a Python
loop over time that is vectorized over the batch and the ``L = 2S + 1`` positions of the extended label sequence
``l' = (blank, l_1, blank, l_2, ..., l_S, blank)``:

.. math::

    \\log\\alpha_t(s) = \\log \\sum_{k \\in K(s)} \\alpha_{t-1}(s - k) + \\log y_t(l'_s), \\qquad
    \\log\\beta'_t(s) = \\log \\sum_{k \\in K'(s)} \\beta'_{t+1}(s + k)\\, y_{t+1}(l'_{s+k}),

with ``K(s) = {0, 1}`` plus ``2`` when ``l'_s`` is a label different from ``l'_{s-2}`` (``beta'`` excludes the
emission at ``t``). ``-log p(l|x) = -log(alpha_{T_n-1}(L_n-1) + alpha_{T_n-1}(L_n-2))`` and the posterior of being at
position ``s`` at time ``t`` is ``gamma_t(s) = alpha_t(s) beta'_t(s) / p(l|x)``. The gradient, in torch's convention
(the gradient through an upstream log_softmax, Graves eq. 16; pytorch issue #52241), is

.. math::

    \\frac{\\partial(-\\log p)}{\\partial \\log y_t(c)} \\Big|_{torch} = y_t(c) - \\sum_{s: l'_s = c} \\gamma_t(s),

and ``-sum gamma`` in the "plain" convention. Log space keeps long (T in the thousands) and peaky (log-probs down to
-1e3) inputs exact where a scaled probability-space recursion would flush states to zero.

Only a true ``-inf`` log-probability is "log zero": every finite value, however negative (a ``-1e30`` mask, say),
is a probability, so such inputs give the finite losses torch gives. ``logsumexp`` takes its maximum as the shift,
replaced by the most negative float when every term is ``-inf`` (so ``-inf - shift`` is ``-inf``, not NaN). NaN and
``+inf`` propagate as in torch's own log-space recursion (``+inf`` meeting ``+inf`` in a sum, or reaching a position
no alignment can occupy, is NaN); frames at ``t >= input_lengths[n]`` never enter the results.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import common

NEG = -np.inf
# Shift of a log-sum-exp whose terms are all -inf: finite, so the terms minus the shift stay -inf instead of NaN.
_LOWEST = np.finfo(np.float64).min
# Rows of the (T, N, C) gradient handled by one task: a few MB, so exp/scale/scatter stay cache-resident.
_GRAD_CHUNK_BYTES = 4 << 20


def forward_backward(problem, grad_scale=None, convention="torch"):
    """The exact twin of :func:`deploy_ctc._backends.cpu.pure_numpy.forward_backward`: same arguments, same results.

    Used for the samples whose scaled recursions fail the consistency check, and as a reference in the tests.
    """
    if problem.log_probs.dtype == np.float16:
        return common.in_float32_groups(problem, grad_scale, convention, forward_backward)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # log(0) is -inf, the log-space zero
        return _forward_backward(problem, grad_scale, convention)


def _forward_backward(problem, grad_scale, convention):
    lp = problem.log_probs  # (T, N, C)
    T, N, C = lp.shape
    il, tl = problem.input_lengths, problem.target_lengths  # (N,), (N,)
    lattice = _Lattice(problem.targets, tl, problem.blank)
    t_max = int(il.max())

    nll = np.where(tl == 0, 0.0, np.inf)  # (N,) value for input_length 0
    grad = None if grad_scale is None else np.zeros((T, N, C), dtype=lp.dtype)
    if t_max == 0:
        return nll, grad

    lpe = lattice.emissions(lp, il, t_max)  # (t_max, N, L)
    alpha, last = _alpha(lpe, lattice, il, store=grad is not None)  # (t_max, N, L + 2) or None; (N, L + 2)
    ended = il > 0
    log_p = _final_log_likelihood(last, lattice)  # (N,)
    nll[ended] = -log_p[ended]
    if grad is None:
        return nll, None

    beta = _beta(lpe, lattice, il)  # (t_max, N, L)
    del lpe
    feasible = np.isfinite(nll) & ended  # NaN losses count as infeasible: their rows become NaN below
    posterior = _posterior(alpha, beta, nll, il, feasible)  # (t_max, N, L)
    del alpha, beta
    _fill_gradient(grad, lp, posterior, lattice, il, np.asarray(grad_scale, dtype=np.float64), convention)
    for n in np.flatnonzero(~feasible & ended):
        grad[: il[n], n, :] = 0.0 if problem.zero_infinity and nll[n] == np.inf else np.nan
    return nll, grad


class _Lattice:
    """The extended label sequences of a batch and the transitions allowed between their positions.

    Attributes:
        ext: ``(N, L)`` int64 extended labels, ``L = 2S + 1``; positions ``s >= L_n`` hold ``blank`` (never reached).
        lengths: ``(N,)`` ``L_n = 2 target_lengths + 1``.
        blocked_alpha: ``(N, L)`` bool, True where the move ``s - 2 -> s`` is not allowed (``s - 1`` and ``s`` always
            are); blocked_beta: ``(N, L)`` the same for ``s <- s + 2``. A blocked term is left out of the sum (not
            added as ``-inf``, which would turn a ``+inf`` alpha into NaN where torch's recursion skips it).
    """

    def __init__(self, targets, target_lengths, blank):
        N, S = targets.shape
        L = 2 * S + 1
        self.L = L
        self.lengths = 2 * target_lengths + 1  # (N,)
        self.ext = np.full((N, L), blank, dtype=np.int64)  # (N, L)
        self.ext[:, 1::2] = targets
        # s - 2 -> s is allowed into a label that differs from the label two positions back.
        allowed = np.zeros((N, L), dtype=bool)  # (N, L) indexed by the destination s
        allowed[:, 3::2] = targets[:, 1:] != targets[:, :-1]
        self.blocked_alpha = ~allowed
        self.blocked_beta = np.ones((N, L), dtype=bool)
        self.blocked_beta[:, : L - 2] = ~allowed[:, 2:]

    def emissions(self, lp, il, t_max):
        """``(t_max, N, L)`` float64 ``log y_t(l'_s)``; frames past ``input_lengths[n]`` repeat its last frame.

        Repeating the last valid frame (instead of reading the padding) keeps NaN or garbage in the padding out of
        the recursions; the values computed there are never used.
        """
        N = lp.shape[1]
        t_index = np.minimum(np.arange(t_max)[:, None], np.maximum(il - 1, 0)[None, :])  # (t_max, N)
        lpe = lp[t_index[:, :, None], np.arange(N)[None, :, None], self.ext[None, :, :]]  # (t_max, N, L)
        return lpe.astype(np.float64, copy=False)

    def groups(self, C):
        """:func:`class_groups` of the valid lattice positions, as ``(samples, positions, starts, columns)``."""
        L = self.ext.shape[1]
        valid = np.arange(L)[None, :] < self.lengths[:, None]  # (N, L)
        cells, starts, columns = class_groups(self.ext, valid, C)
        return cells // L, cells % L, starts, columns


def class_groups(ext, valid, C):
    """Group the ``valid`` lattice cells by (sample, class), for the scatter of posteriors into class columns.

    Args:
        ext: ``(k, L)`` extended labels; valid: ``(k, L)`` bool cells to include; C: number of classes.

    Returns:
        ``(cells, starts, columns)``: flattened ``n * L + s`` cells sorted by group; ``starts`` the first cell of each
        group (for ``np.add.reduceat``); ``columns`` each group's flattened ``n * C + c``.
    """
    k = ext.shape[0]
    keys = (np.arange(k)[:, None] * C + ext)[valid]  # (P,)
    cells = np.flatnonzero(valid)  # (P,)
    order = np.argsort(keys, kind="stable")
    keys, cells = keys[order], cells[order]
    columns, starts = np.unique(keys, return_index=True)
    return cells, starts, columns


def _lse3(shifted, blocked, out, scratch, m):
    """``out = log(sum_k exp(shifted[k]))`` over k = 0..2 (k = 2 left out where ``blocked``), max subtracted first.

    ``shifted`` ``(3, N, L)`` (a strided view); ``scratch`` ``(3, N, L)`` and ``m`` ``(N, L)`` are work buffers.
    """
    np.copyto(scratch, shifted)
    np.copyto(scratch[2], NEG, where=blocked)
    np.max(scratch, axis=0, out=m)
    np.maximum(m, _LOWEST, out=m)  # all terms -inf: a finite shift keeps the result -inf
    np.subtract(scratch, m, out=scratch)
    np.exp(scratch, out=scratch)
    np.sum(scratch, axis=0, out=out)
    np.log(out, out=out)
    np.add(out, m, out=out)


def _alpha(lpe, lattice, il, store):
    """Forward variables ``log alpha``.

    Returns:
        ``(table, last)``: ``table`` ``(t_max, N, L + 2)`` when ``store`` (else None); ``last`` ``(N, L + 2)`` the row
        at each sample's last frame ``t = input_lengths[n] - 1``. Columns 0 and 1 hold NEG so that ``s - 1`` and
        ``s - 2`` of the first positions read "log zero"; column ``s + 2`` holds position ``s``.
    """
    t_max, N, L = lpe.shape
    table = np.full((t_max if store else 2, N, L + 2), NEG)
    table[0, :, 2:4] = lpe[0, :, :2]
    last = np.empty((N, L + 2))
    ends_at = _samples_ending_at(il, t_max)
    scratch, m = np.empty((3, N, L)), np.empty((N, L))
    row_stride, col_stride = table.strides[1], table.strides[2]
    for t in range(t_max):
        cur = table[t if store else t % 2]
        if t > 0:
            prev = table[(t - 1) if store else (t - 1) % 2]
            # shifted[k, n, s] = log alpha_{t-1}(s - k)
            shifted = as_strided(prev[:, 2:], shape=(3, N, L), strides=(-col_stride, row_stride, col_stride))
            out = cur[:, 2:]
            _lse3(shifted, lattice.blocked_alpha, out, scratch, m)
            np.add(out, lpe[t], out=out)
        if t in ends_at:
            last[ends_at[t]] = cur[ends_at[t]]
    return (table if store else None), last


def _samples_ending_at(il, t_max):
    """``{t: samples whose last frame is t}`` for ``t < t_max``."""
    order = np.argsort(il, kind="stable")
    return {int(t) - 1: order[il[order] == t] for t in np.unique(il) if 0 < t <= t_max}


def _final_log_likelihood(last, lattice):
    """``log p(l | x_n) = logaddexp(alpha(L_n - 1), alpha(L_n - 2))`` at each sample's last frame, ``(N,)``."""
    n = np.arange(last.shape[0])
    end = lattice.lengths + 1  # column of position L_n - 1
    a_last = last[n, end]  # (N,)
    a_prev = np.where(lattice.lengths > 1, last[n, end - 1], NEG)  # (N,)
    # torch's formula (not np.logaddexp, which makes inf + inf inf): +inf in both terms gives NaN, as in torch.
    m = np.maximum(np.maximum(a_last, a_prev), _LOWEST)
    return np.log(np.exp(a_last - m) + np.exp(a_prev - m)) + m


def _beta(lpe, lattice, il):
    """Backward variables ``log beta'`` (excluding the emission at ``t``), ``(t_max, N, L)``.

    ``beta'_{T_n - 1}(s)`` is 1 at the two final positions ``L_n - 1, L_n - 2`` and 0 elsewhere; each sample's
    recursion restarts at its own last frame, so rows ``t >= input_lengths[n]`` are unused garbage.
    """
    t_max, N, L = lpe.shape
    table = np.empty((t_max, N, L))
    start = np.full((N, L), NEG)  # (N, L) log beta' at the last frame
    n = np.arange(N)
    start[n, lattice.lengths - 1] = 0.0
    start[n[lattice.lengths > 1], lattice.lengths[lattice.lengths > 1] - 2] = 0.0
    ends_at = _samples_ending_at(il, t_max)
    nxt = np.full((N, L + 2), NEG)  # log beta'_{t+1}(s) + log y_{t+1}(s); columns L, L+1 stay NEG
    scratch, m = np.empty((3, N, L)), np.empty((N, L))
    row_stride, col_stride = nxt.strides
    # shifted[k, n, s] = nxt[n, s + k]
    shifted = as_strided(nxt, shape=(3, N, L), strides=(col_stride, row_stride, col_stride))
    table[t_max - 1] = start
    for t in range(t_max - 2, -1, -1):
        np.add(table[t + 1], lpe[t + 1], out=nxt[:, :L])
        _lse3(shifted, lattice.blocked_beta, table[t], scratch, m)
        if t in ends_at:
            table[t][ends_at[t]] = start[ends_at[t]]
    return table


def _posterior(alpha, beta, nll, il, feasible):
    """``gamma_t(s) = exp(log alpha + log beta' + nll)``, ``(t_max, N, L)``, 0 at ``t >= input_lengths[n]``.

    Computed in place in ``alpha``'s storage. Infeasible samples get 0 here; their gradient rows are set apart.
    """
    t_max = alpha.shape[0]
    post = alpha[:, :, 2:]  # (t_max, N, L) view
    np.add(post, beta, out=post)
    np.add(post, np.where(feasible, nll, 0.0)[None, :, None], out=post)
    np.exp(post, out=post)
    rows_used = (np.arange(t_max)[:, None] < il[None, :]) & feasible[None, :]  # (t_max, N)
    np.copyto(post, 0.0, where=~rows_used[:, :, None])  # (not a multiply: NaN * 0 is NaN)
    return post


def _fill_gradient(grad, lp, posterior, lattice, il, grad_scale, convention):
    """Write ``grad[t, n, c] = grad_scale[n] * (exp(lp) - sum_{s: l'_s = c} gamma_t(s))`` for ``t < il[n]``.

    ``grad`` ``(T, N, C)`` arrives zeroed. Work is split into blocks of rows that the shared worker threads
    (:func:`deploy_ctc._backends.cpu.common.pool`) run concurrently, NumPy releasing the GIL inside its loops; each
    block exponentiates, scales, and subtracts the class-aggregated posterior, so the ``(T, N, C)`` array is touched
    once while cache-resident.
    """
    T, N, C = grad.shape
    t_max = posterior.shape[0]
    samples, positions, starts, columns = lattice.groups(C)
    column_scale = grad_scale[columns // C]  # (G,)
    grad_rows = grad.reshape(T, N * C)
    step = max(1, _GRAD_CHUNK_BYTES // (N * C * grad.itemsize))
    scale = None if np.all(grad_scale == 1.0) else grad_scale.astype(grad.dtype)[None, :, None]  # (1, N, 1)

    def block(t0):
        t1 = min(t0 + step, t_max)
        g = grad[t0:t1]  # (rows, N, C)
        if convention == "torch":
            np.exp(lp[t0:t1], out=g)
            if scale is not None:
                np.multiply(g, scale, out=g)
            for n in np.flatnonzero(il < t1):
                g[max(il[n] - t0, 0):, n, :] = 0.0
        # (rows, G): posterior summed over the lattice positions of each (sample, class)
        if positions.size:
            agg = np.add.reduceat(posterior[t0:t1, samples, positions], starts, axis=1)
            agg *= column_scale
            rows = grad_rows[t0:t1]
            rows[:, columns] -= agg.astype(grad.dtype, copy=False)

    blocks = range(0, t_max, step)
    if len(blocks) > 1 and common.workers() > 1:
        list(common.pool().map(block, blocks))
    else:
        for t0 in blocks:
            block(t0)
