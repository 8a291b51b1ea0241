r"""NumPy backend, loss only: the forward recursion with a power-of-two exponent per lattice position, exact on every
input it accepts.

Without a backward pass there is no consistency identity to check the result against, so this pass is built so that
it cannot lose precision: every rounding is relative (``u = 2^-53``) and bounded, and the inputs outside its proven
range are recognised before the recursion and left to the exact log-space twin
(:mod:`deploy_ctc._backends.cpu.logspace`). It is the NumPy form of the native engine's loss-only pass
(``kernels/README.md``, "Loss only").

**Why one scale per frame is not enough.** The forward variables of one frame span thousands of bits: measured on
ordinary inputs with the exact log-space recursion, cells that can still reach the end of the lattice lie 1,460
bits below the frame's largest at ``T = 2000, S = 100`` (random outputs), 3,200 at ``T = 3000, S = 300`` and
27,000 on a confident model's 3,000-frame utterance. A per-frame scale flushes them to zero, and whether they
matter is only known from the backward pass, so a recursion that flagged every such flush would send almost every
long sample to the log-space path.

**Representation.** Sample ``n`` (``k`` of them, batched) keeps for each position ``s`` of its extended label
sequence ``l'`` (``L = 2S + 1`` positions) an integer exponent ``E(s)`` and, per frame, a float64 mantissa:
``alpha_t(s) = a_t(s) 2^E(s) exp(m_0 + ... + m_t)``, with ``y_t(s) = exp(log y_t(l'_s) - m_t)`` the emissions
scaled by the frame's largest (``m_t``). With the factors ``f_1(s) = 2^(E(s-1) - E(s))`` and
``f_2(s) = [l'_s != l'_{s-2}] 2^(E(s-2) - E(s))`` the recursion keeps its form, vectorized over the batch and the
positions (the rows of all samples flattened into one vector, two zero columns between samples):

.. math::

    q_{t+1}(s) = a_t(s) + f_1(s)\, a_t(s-1) + f_2(s)\, a_t(s-2), \qquad a_{t+1}(s) = q_{t+1}(s)\, y_{t+1}(s),

and ``p(l|x) = (a(L_n - 1) 2^E(L_n - 1) + a(L_n - 2) 2^E(L_n - 2)) exp(sum m_t)`` at frame ``T_n - 1``.
The exponents change only at a *renormalisation* of the row ``a_t``: each nonzero ``a = f 2^j`` (``f`` in
``[1/2, 1)``, by ``np.frexp``) has the true exponent ``e(s) = E(s) + j``; a zero cell (not reached yet) takes the
true exponent of the nearest nonzero cell below it; the stored exponent is the smallest value at or above ``e``
with no feeder more than ``G`` bits above it,
``E(s) = max_{j <= s} e(j) - G ceil((s - j) / 2)`` (two running maxima, over even and odd positions), and the
mantissa becomes ``f 2^(e(s) - E(s))`` (exact, by ``np.ldexp``). A nonzero cell raised by more than ``R`` bits (more
than ``G + R`` bits below a feeder) sends its sample to the log-space path.

**Invariants and error bound.** Constants: ``H = 100``, ``P = 1021 - H = 921``, ``G = 1021 - H = 921``, ``B = 450``
(emission floor, bits), ``R = P - 1 - B = 470``.

* Accepted samples have every emission on their lattice (frames ``t < T_n``, positions ``s < L_n``) in
  ``[2^-B, 1]``: a NaN, ``+inf`` or ``-inf`` log-prob there, or a finite one more than ``(B - 1) ln 2`` (311.2)
  nats below its frame's largest (a ``-1e30`` mask), takes the log-space path. So every reachable cell is nonzero
  and stays so, and the cells not reached yet form the top of the row.
* Just after a renormalisation every nonzero mantissa is in ``[2^-(R+1), 1)``. A nonzero cell keeps its own term
  (``q_{t+1}(s) >= a_t(s)``), and a cell reached for the first time is fed with a factor at least 1 (the stored
  exponents do not increase above the highest nonzero cell), so ``j`` frames later every nonzero mantissa is at
  least ``2^-(R+1) prod y_min``, ``y_min`` each frame's smallest accepted emission (``b_t`` bits below 1, taken
  from the log-probs with a bit to spare for ``exp``'s rounding). The row is renormalised before the running
  ``sum b_t`` exceeds ``B``: every nonzero mantissa stays at least ``2^-P``, a normal float64.
* Every factor is at most ``2^G``; the row is renormalised whenever its largest mantissa exceeds ``2^H``; so a
  sum of three terms stays below ``2^(G + H + 2) = 2^1023``: nothing overflows.
* A factor may be tiny (a feeder far below its cell): exact down to ``2^-1074``, 0 below. The term it carries is
  then lost or rounded absolutely, by less than ``2^(H - 1074)``, next to the cell's own term of at least
  ``2^-P``: a relative ``2^(H + P - 1074) = 2^-53`` at most. A cell without an own term (not reached yet) is fed
  by factors of at least 1, whose products are normal.

So every operand is nonnegative, every product and sum is a normal float64 rounded relatively (or within ``u`` of
it, above), and relative errors neither cancel nor amplify: ``p`` is within about ``(5 T + sum_t d_t) u`` of the
exact value (relative), ``d_t`` the largest ``|log y_t(l'_s) - m_t|`` of the frame (the rounding of that
difference before ``exp``; below 312), plus ``T u |sum m_t|`` (absolute, in the loss) from summing the frame scales
-- the rounding torch's own float64 log-space recursion makes. Memory: the ``(t_max, k, L + 2)`` emission table, the
``(t_max, k, S + 1)`` log-probs it comes from, and a few ``(k, L + 2)`` rows.

The constants trade the renormalisations' frequency (``H``) against the largest spread between neighbouring cells
the pass accepts (``G + R = 1391`` bits; measured on logits x 30, ``T = 1200``: up to 1,270). Measured counts: random
outputs renormalise every 15-40 frames, confident ones (logits x 10) every 4, logits x 30 nearly every frame.
"""

from __future__ import annotations

import math

import numpy as np

H = 100  # the row is renormalised once a mantissa exceeds 2^H
P = 1021 - H  # nonzero mantissas stay at least 2^-P
G = 1021 - H  # factors are at most 2^G
B = 450  # emission floor (bits below the frame's largest, ~311 nats)
R = P - 1 - B  # the most a nonzero mantissa may be scaled down at a renormalisation
#: Log-probs more than this many nats below their frame's largest take the log-space path.
FLOOR_LOG = -(B - 1) * math.log(2.0)
_HIGH = 2.0 ** H
_NONE = np.iinfo(np.int64).min // 4  # "no position" in the running maxima; far below any exponent, no overflow


def frame_bits(lowest: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """``b_t`` ``(t_max,)`` float64: bits below 1 of the smallest emission of the ``usable`` ``(k,)`` samples at
    each frame, one bit added for ``exp``'s rounding; ``lowest`` ``(t_max, k)`` holds each sample's smallest
    ``log y_t(l'_s) - m_t`` over its lattice (0 in frames past its end)."""
    smallest = np.where(usable[None, :], lowest, 0.0).min(axis=1)  # (t_max,)
    return np.maximum(-smallest / math.log(2.0), 0.0) + 1.0


def log_likelihood(emit: np.ndarray, bits: np.ndarray, lattice, scratch, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Run the forward recursion on the scaled emissions.

    Args:
        emit: ``(t_max, k, L + 2)`` float64 ``y_t(s)`` at column ``s + 2``, every accepted one in ``[2^-B, 1]``;
            0 in the two padding columns, at ``s >= L_n``, in frames ``t >= T_n`` and for samples not accepted.
        bits: ``(t_max,)`` :func:`frame_bits` of the accepted samples, each at most ``B``.
        lattice: ``lengths`` ``(k,)`` ``L_n``, ``il`` ``(k,)`` ``T_n >= 1``, ``skip_up`` ``(k, L + 2)`` 1 at column
            ``s + 2`` where ``s - 2 -> s`` is allowed (:class:`deploy_ctc._backends.cpu.pure_numpy._ChainPair`).
        scratch, tag: a :class:`deploy_ctc._backends.cpu.workspace.Workspace` and the name suffix of its buffers.

    Returns:
        ``(log_p, lost)``: ``(k,)`` ``log p(l|x) - sum_t m_t`` (``-inf`` where nothing reached the end) and
        ``(k,)`` bool, samples whose cells spread too far for the representation (log-space path).
    """
    t_max, k, width = emit.shape
    L, half = width - 2, k * width
    a = scratch.array("forward" + tag, (k, width))  # (k, L + 2) this frame's mantissas, after the emission
    q = scratch.array("pre" + tag, (half,))  # the next frame's, before it
    q.fill(0.0)
    q.reshape(k, width)[:, 2:4] = 1.0  # alpha_0 = y_0 at s = 0, 1 (0 at s = 1 when L_n = 1: its emission)
    flat, term = a.reshape(-1), np.empty(half - 2)
    factors = np.zeros((2, k, width))  # (2, k, L + 2) f1, f2 at column s + 2; those of every E = 0 to start
    factors[0, :, 3:] = 1.0
    factors[1] = lattice.skip_up
    f1, f2 = factors.reshape(2, half)[:, 2:]  # aligned with q[2:]
    exponent = np.zeros((k, L), dtype=np.int64)  # E(s)
    lost = np.zeros(k, dtype=bool)
    log_p = np.full(k, -np.inf)
    ends = {int(t) - 1: np.flatnonzero(lattice.il == t) for t in np.unique(lattice.il)}
    spent = 0.0  # sum of b_t since the last renormalisation
    bits = bits.tolist() + [0.0]
    largest = np.maximum.reduce
    for t in range(t_max):
        np.multiply(q, emit[t].reshape(-1), out=flat)
        spent += bits[t]
        if spent + bits[t + 1] > B or largest(flat) > _HIGH:
            _renormalise(a, exponent, factors, lattice.skip_up, lost)
            spent = 0.0
        if t in ends:
            log_p[ends[t]] = _end_log_mass(a, exponent, lattice.lengths, ends[t])
        if t == t_max - 1:
            break
        # q_{t+1}(s) = a(s) + f1(s) a(s - 1) + f2(s) a(s - 2), over the flattened rows (the factors are 0 at the
        # padding columns, so nothing crosses from one sample into the next)
        np.multiply(f1, flat[1:-1], out=term)
        np.add(flat[2:], term, out=q[2:])
        np.multiply(f2, flat[:-2], out=term)
        np.add(q[2:], term, out=q[2:])
    log_p[lost] = -np.inf
    return log_p, lost


def _renormalise(a, exponent, factors, skip_up, lost):
    """Give row ``a`` ``(k, L + 2)`` new exponents (module docstring), in place with ``exponent`` ``(k, L)`` and
    ``factors`` ``(2, k, L + 2)`` (``f1, f2`` at column ``s + 2``); samples with a cell raised by more than ``R``
    bits become ``lost`` (their row zeroed)."""
    k, width = a.shape
    L = width - 2
    cells = a[:, 2:]  # (k, L)
    fraction, shift = np.frexp(cells)
    nonzero = cells > 0.0
    true = exponent + shift  # (k, L) exponent of each nonzero cell
    # the nearest nonzero cell at or below each position (flattened index; -1 where none)
    below = np.where(nonzero, np.arange(k * L).reshape(k, L), -1)
    np.maximum.accumulate(below, axis=1, out=below)
    filled = np.where(below >= 0, true.reshape(-1)[below], 0)
    stored = _capped(filled)
    raised = stored - true  # >= 0 on nonzero cells
    far = (nonzero & (raised > R)).any(axis=1)  # (k,)
    lost |= far
    np.clip(raised, 0, R + 1, out=raised)  # (the zero cells' values are not used)
    np.ldexp(fraction, -raised.astype(np.int32), out=cells)  # exact: at most R + 1 bits down, zeros stay zero
    cells[far] = 0.0
    exponent[...] = stored
    # powers of two between neighbours: at most 2^G by construction, exact down to 2^-1074, 0 below
    np.ldexp(1.0, np.maximum(stored[:, :-1] - stored[:, 1:], -1100).astype(np.int32), out=factors[0, :, 3:])
    np.ldexp(1.0, np.maximum(stored[:, :-2] - stored[:, 2:], -1100).astype(np.int32), out=factors[1, :, 4:])
    factors[1] *= skip_up


def _capped(e):
    """``E(s) = max_{j <= s} e(j) - G ceil((s - j) / 2)`` for ``e`` ``(k, L)`` int64: the smallest exponents at or
    above ``e`` with ``E(s) >= E(s-1) - G`` and ``E(s) >= E(s-2) - G``.

    In doubled units, ``W(j) = 2 e(j) + G j``: ``2 E(s) = max(max_{j = s mod 2} W(j), max_{j != s mod 2} W(j) - G)
    - G s`` over ``j <= s``, two running maxima (even and odd positions); the result is even.
    """
    k, L = e.shape
    w = 2 * e + G * np.arange(L)
    even = np.maximum.accumulate(w[:, 0::2], axis=1)  # (k, S + 1) over even j <= 2i
    odd = np.maximum.accumulate(w[:, 1::2], axis=1)  # (k, S) over odd j <= 2i + 1
    doubled = np.empty_like(w)
    odd_before = np.full(even.shape, _NONE)  # over odd j < 2i
    odd_before[:, 1:] = odd[:, : even.shape[1] - 1]
    doubled[:, 0::2] = np.maximum(even, odd_before - G)
    doubled[:, 1::2] = np.maximum(odd, even[:, : odd.shape[1]] - G)
    doubled -= G * np.arange(L)
    return doubled // 2


def _end_log_mass(a, exponent, lengths, samples):
    """``log(a(L_n - 1) 2^E(L_n - 1) + a(L_n - 2) 2^E(L_n - 2))`` for ``samples`` (the second term for
    ``L_n > 1``)."""
    last = lengths[samples] - 1
    prev = np.maximum(last - 1, 0)
    m1, m2 = a[samples, last + 2], np.where(last > 0, a[samples, prev + 2], 0.0)
    e1, e2 = exponent[samples, last], exponent[samples, prev]
    top = np.maximum(e1, e2)
    mass = np.ldexp(m1, np.maximum(e1 - top, -1100)) + np.ldexp(m2, np.maximum(e2 - top, -1100))
    return np.log(mass) + top * math.log(2.0)
