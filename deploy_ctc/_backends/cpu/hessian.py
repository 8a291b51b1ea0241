"""The derivative of the CTC gradient (double backward): an exact Hessian-vector product, in NumPy float64.

The loss of one sample is ``L = -log sum_pi exp(phi(pi) . x)`` over the alignments ``pi`` of its target, where
``x = log_probs[:T_n, n]`` and ``phi(pi)`` is the indicator of the cells ``(t, pi_t)``. Its gradient is
``-gamma = -E[phi]`` (the posterior under ``P(pi) ~ exp(phi(pi) . x)``) and its Hessian is ``-Cov[phi]``. torch's
gradient convention adds ``exp(x)`` (the gradient through an upstream log_softmax, Graves eq. 16), so the gradient
``G = scale_n (exp(x) - gamma)`` has the directional derivative

.. math::

    \\dot G = \\frac{d}{d\\epsilon} G(x + \\epsilon v) = \\text{scale}_n \\left(e^{x} \\odot v
              - \\operatorname{Cov}[\\phi]\\, v\\right), \\qquad
    (\\operatorname{Cov}[\\phi]\\, v)_{t,c} = \\sum_{s:\\, l'_s = c} \\gamma_t(s)\\,
              \\bigl(A_t(s) + B_t(s) - E[\\phi \\cdot v]\\bigr),

with ``A_t(s)`` the posterior mean of the path score ``phi . v`` over the prefixes ending in lattice state ``s`` at
``t`` (emission at ``t`` included) and ``B_t(s)`` that of the suffixes after it. Both follow the alpha and beta
recursions as weighted means of their predecessors' (successors') values, the weights being the normalised alpha
(beta) terms, so they never under- or overflow. ``G``'s Jacobian is symmetric, so ``G dot`` is also the
vector-Jacobian product that double backward needs.
"""

from __future__ import annotations

import numpy as np

from . import common

NEG = -np.inf


def hessian_vector_product(problem, v, grad_scale):
    """Directional derivative of torch's-convention gradient of the per-sample losses, scaled by ``grad_scale``.

    Args:
        problem: a validated NumPy :class:`deploy_ctc.validation.CTCProblem` (``log_probs`` ``(T, N, C)``).
        v: ``(T, N, C)`` direction.
        grad_scale: ``(N,)`` per-sample factor of the gradient (upstream gradient times the reduction's factor).

    Returns:
        ``(T, N, C)`` float64: ``d/de [scale_n (exp(x) - gamma)](x + e v)``; 0 on rows ``t >= input_lengths[n]``;
        rows of a sample with a non-finite loss are NaN, or 0 for an infinite loss with ``zero_infinity`` (as the
        gradient).
    """
    lp = np.asarray(problem.log_probs, dtype=np.float64)  # (T, N, C)
    v = np.asarray(v, dtype=np.float64)  # (T, N, C)
    T, N, C = lp.shape
    il, tl, blank = problem.input_lengths, problem.target_lengths, problem.blank  # (N,), (N,)
    L = 2 * problem.targets.shape[1] + 1
    ext = np.full((N, L), blank, dtype=np.int64)  # (N, L) extended labels l'
    ext[:, 1::2] = problem.targets
    valid = np.arange(L)[None, :] < (2 * tl + 1)[:, None]  # (N, L)
    skip = np.zeros((N, L), dtype=bool)  # (N, L) s - 2 -> s allowed
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    cells = np.broadcast_to(ext[None], (T, N, L))
    emit = np.where(valid, np.take_along_axis(lp, cells, axis=2), NEG)  # (T, N, L) x[t, l'_s]
    emit_v = np.take_along_axis(v, cells, axis=2)  # (T, N, L) v[t, l'_s]
    rows = np.arange(T)[:, None] < il[None, :]  # (T, N) frames in use

    # Forward: log alpha and A.                                                           # (T, N, L) each
    log_alpha, A = np.full((T, N, L), NEG), np.zeros((T, N, L))
    log_alpha[0, :, :2] = emit[0, :, :2]
    A[0, :, :2] = emit_v[0, :, :2]
    for t in range(1, T):
        terms = np.stack([log_alpha[t - 1], _shift(log_alpha[t - 1], 1, NEG),
                          np.where(skip, _shift(log_alpha[t - 1], 2, NEG), NEG)])  # (3, N, L)
        means = np.stack([A[t - 1], _shift(A[t - 1], 1, 0.0), _shift(A[t - 1], 2, 0.0)])  # (3, N, L)
        total, weights = _normalise(terms)
        log_alpha[t] = emit[t] + total
        A[t] = emit_v[t] + (weights * means).sum(axis=0)

    # Backward: log beta' (emission at t excluded) and B, started at each sample's last frame.   # (T, N, L) each
    log_beta, B = np.full((T, N, L), NEG), np.zeros((T, N, L))
    final = valid & (np.arange(L)[None, :] >= (2 * tl - 1)[:, None])  # (N, L) the last blank or label
    for t in range(T - 1, -1, -1):
        if t + 1 < T:
            nxt = log_beta[t + 1] + emit[t + 1]  # (N, L)
            terms = np.stack([nxt, _shift(nxt, -1, NEG), np.where(_shift(skip, -2, False), _shift(nxt, -2, NEG),
                                                                   NEG)])  # (3, N, L)
            nxt_b = B[t + 1] + emit_v[t + 1]
            means = np.stack([nxt_b, _shift(nxt_b, -1, 0.0), _shift(nxt_b, -2, 0.0)])  # (3, N, L)
            total, weights = _normalise(terms)
            log_beta[t], B[t] = total, (weights * means).sum(axis=0)
        last = (t == il - 1)[:, None]  # (N, 1)
        log_beta[t] = np.where(last, np.where(final, 0.0, NEG), np.where(rows[t][:, None], log_beta[t], NEG))
        B[t] = np.where(last, 0.0, B[t])

    # Posterior of each state, and the centred path score through it.
    log_p = _logsumexp(log_alpha[0] + log_beta[0], axis=1)  # (N,) log p(l | x), any frame in use gives it
    with np.errstate(invalid="ignore", over="ignore"):
        gamma = np.where(rows[:, :, None], np.exp(log_alpha + log_beta - log_p[None, :, None]), 0.0)  # (T, N, L)
        score = (gamma[0] * (A[0] + B[0])).sum(axis=1)  # (N,) E[phi . v]
        spread = np.where(gamma > 0, gamma * (A + B - score[None, :, None]), 0.0)  # (T, N, L)
    cov_v = np.zeros((T, N, C))  # (T, N, C)
    batch = np.arange(N)
    for s in range(L):
        np.add.at(cov_v, (slice(None), batch, ext[:, s]), spread[:, :, s])
    out = np.where(rows[:, :, None], np.exp(lp) * v - cov_v, 0.0) * np.asarray(grad_scale, np.float64)[None, :, None]

    nll = np.where(il > 0, -log_p, np.where(tl == 0, 0.0, np.inf))  # (N,)
    return common.finish(problem, nll, out)[1]


def _shift(a, k, fill):
    """``a`` moved by ``k`` along the last axis (``out[..., s] = a[..., s - k]``), ``fill`` where nothing lands."""
    out = np.full_like(a, fill)
    if k > 0:
        out[..., k:] = a[..., :-k]
    else:
        out[..., :k] = a[..., -k:]
    return out


def _normalise(terms):
    """``(log sum exp(terms), exp(terms - that))`` over axis 0; weights 0 where every term is log zero."""
    total = _logsumexp(terms, axis=0)  # (N, L)
    with np.errstate(invalid="ignore"):
        weights = np.where(np.isfinite(total), np.exp(terms - total), 0.0)  # (3, N, L)
    return total, np.nan_to_num(weights, nan=0.0)


def _logsumexp(a, axis):
    top = np.max(a, axis=axis, keepdims=True)
    shift = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(shift, axis=axis) + np.log(np.exp(a - shift).sum(axis=axis))
