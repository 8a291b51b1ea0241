r"""NumPy backend: CTC loss and gradient for a whole batch on the CPU.

Fast path: scaled probability-space recursions (Rabiner-style scaling) in float64, a Python loop over time that is
vectorized over the batch and the ``L = 2S + 1`` positions of the extended label sequence
``l' = (blank, l_1, blank, ..., l_S, blank)``. Alpha and beta run in the same loop, as ``2k`` chains per chunk of
``k`` samples: forward chains move mass up the lattice frame by frame, reversed chains move it down from each
sample's last frame. With ``q_t`` the pre-emission variable of a forward chain,

.. math::

    a_t(s) = q_t(s)\, \hat y_t(l'_s), \qquad
    q_{t+1}(s) = \frac{a_t(s) + a_t(s-1) + [l'_s \ne l'_{s-2}]\, a_t(s-2)}{c_t}

(the reversed chains mirror it with ``s + 1, s + 2``), where ``y_hat_t = exp(log y_t - m_t)`` with ``m_t`` the
frame's largest label log-probability and ``c_t`` a normaliser applied every few steps. A reversed chain's ``q`` at
frame ``t`` is ``beta'_t(s)`` (beta without the emission at ``t``), so the posterior of position ``s`` at frame
``t`` is

.. math::

    \gamma_t(s) = \frac{g_t(s)}{Z_t}, \qquad g_t(s) = q^{fwd}_t(s)\, \hat y_t(l'_s)\, q^{rev}_t(s), \qquad
    Z_t = \sum_s g_t(s),

and ``log p(l|x) = log Z_t + (log-scales)`` must come out the same for every frame ``t``. That identity is the accuracy
check: a sample whose values it finds inconsistent (probability mass flushed to zero by extreme, peaky inputs;
all-``-inf`` frames; NaN, ``+inf``) is recomputed exactly by the log-space twin
:mod:`deploy_ctc._backends.cpu.logspace`. An emission flushed to zero before the chains start would be the same zero in
both directions and pass that identity, so a sample with a finite log-probability more than ``-_FLUSH_LOG`` nats below
its frame's best (a ``-1e30`` mask, say) takes the exact path too. The gradient follows torch's convention (Graves eq.
16, the gradient through an upstream log_softmax): ``y_t(c) - sum_{s: l'_s = c} gamma_t(s)`` (``-sum gamma`` in the
"plain" convention).

The loss alone (no ``grad_scale``) runs only the forward recursion, with a power-of-two exponent per lattice position
instead of the scales above, exact without a check on every input it accepts:
:mod:`deploy_ctc._backends.cpu.loss_numpy` (the others take the log-space forward recursion).

Work is split into chunks of samples whose tables fit a memory budget. Large batches run as a pipeline: the
recursions on the calling thread, emissions and posteriors on worker threads (NumPy releases the GIL in its
loops). Frames at ``t >= input_lengths[n]`` never enter the results.
"""

from __future__ import annotations

import numpy as np

from . import common, logspace, loss_numpy, workspace
from .constants import CONSISTENCY_TOL, FLUSH_LOG, LOG_TINY_MASS
from .. import paths

# Normalise the chains every _RESCALE_EVERY steps: each unnormalised step multiplies by at most 3 (y_hat <= 1), and
# a flush to zero in between is caught by the consistency check.
_RESCALE_EVERY = 4
# |log p(t) - log p(t')| above this (relative, in nats) across frames marks a sample for the exact log-space path;
# float64 rounding stays orders of magnitude below it. Shared with the C++ engine (kernels/ctc_constants.h).
_CONSISTENCY_TOL = CONSISTENCY_TOL
# A frame whose posterior normaliser Z_t falls below exp(_LOG_Z_FLOOR) (~2.6e-283) is too close to float64's
# subnormal range (2e-308) for 1/Z_t and the cells carrying its mass to be trusted: such a sample takes the exact
# path. Shared with the C++ engine.
_LOG_Z_FLOOR = LOG_TINY_MASS
# An emission more than this many nats below its frame's largest (exp below ~1e-304) is subnormal or flushed to 0 in
# float64; forward and backward chains would see the same zero, which the consistency check cannot notice, so a
# sample with such a finite emission takes the exact path. (-inf is a true zero and does not count.) Shared with the
# C++ engine.
_FLUSH_LOG = FLUSH_LOG
# Bytes of per-chunk tables (emissions, chains, posterior) that one worker handles at a time.
_CHUNK_TABLE_BYTES = 48 << 20
# Below this many table cells a batch is done in one chunk on the calling thread; above, in at least
# _PIPELINE_CHUNKS chunks whose stages overlap on the worker threads.
_PARALLEL_MIN_CELLS = 400_000
_PIPELINE_CHUNKS = 2
# Frame ranges of a chunk's posterior stage: NumPy's per-call overhead makes more, smaller ranges slower.
_MAX_PARTS = 4


def forward_backward(problem, grad_scale=None, convention="torch"):
    """Per-sample negative log-likelihoods and, optionally, the scaled gradient (the
    :class:`deploy_ctc._backends.Backend` protocol).

    Args:
        problem: a validated :class:`deploy_ctc.validation.CTCProblem` with NumPy arrays; log_probs ``(T, N, C)``.
        grad_scale: ``(N,)`` float64 per-sample gradient weights, or None for the loss alone.
        convention: ``"torch"`` (``exp(lp) - posterior``) or ``"plain"`` (``-posterior``).

    Returns:
        ``(nll, grad)``: ``nll`` ``(N,)`` float64, ``+inf`` for infeasible targets; ``grad`` ``(T, N, C)`` in
        ``problem.log_probs.dtype`` (None without ``grad_scale``) with rows ``t >= input_lengths[n]`` exactly 0 and
        rows of infinite-loss samples NaN (0 when ``problem.zero_infinity``).
    """
    if problem.log_probs.dtype == np.float16:
        return common.in_float32_groups(problem, grad_scale, convention, forward_backward)
    with np.errstate(all="ignore"), workspace.borrowed() as scratch:  # under/overflow and NaN: the check's job
        return _forward_backward(problem, grad_scale, convention, scratch)


def _forward_backward(problem, grad_scale, convention, scratch):
    N, C = problem.log_probs.shape[1:]
    il, tl = problem.input_lengths, problem.target_lengths
    nll, grad, grad_scale, run = common.start(problem, grad_scale)
    if not run.any():
        return common.finish(problem, nll, grad)

    ok = np.ones(N, dtype=bool)
    spans, parallel = _chunks(il, tl, C, grad is not None)
    # Chunks that run one after another share their scratch tables (one tag); pipelined ones need their own.
    chunks = [_Chunk(problem, span, index if parallel else 0, run, nll, ok, grad, grad_scale, convention, scratch)
              for index, span in enumerate(spans)]
    chunks = [chunk for chunk in chunks if chunk.active]
    if not parallel:
        for chunk in chunks:
            chunk.prepare()
            chunk.recurse()
            chunk.posterior(0, 1)
            chunk.check()
    else:
        # A pipeline: the recursions (many small NumPy calls, GIL-bound) run one after another on this thread
        # while the workers compute the next chunk's emissions and the previous chunks' posteriors and gradient
        # (few large calls that release the GIL), the latter split in frame ranges so both cores share them.
        # Running recursions concurrently would only contend for the GIL.
        pool = common.pool()
        parts = min(_MAX_PARTS, common.workers())
        prepared = [pool.submit(chunk.prepare) for chunk in chunks]
        pending = []
        for chunk, ready in zip(chunks, prepared):
            ready.result()
            chunk.recurse()
            pending += [pool.submit(chunk.posterior, part, parts) for part in range(parts)]
        for done in pending:
            done.result()
        for chunk in chunks:
            chunk.check()

    redo = np.flatnonzero(run & ~ok)
    if redo.size:
        common.redo_exact(problem, redo, nll, grad, grad_scale, convention)
    paths.record("numpy", np.flatnonzero(run), redo, len(chunks) if parallel else 1)
    return common.finish(problem, nll, grad)


def _chunks(il, tl, C, with_grad):
    """``(spans, parallel)``: contiguous sample ranges ``[(n0, n1), ...]`` whose tables fit the budget, and whether
    the work is large enough for the threaded pipeline (then at least _PIPELINE_CHUNKS ranges)."""
    N = il.shape[0]
    t_max, L = int(il.max()), 2 * int(tl.max()) + 1
    per_sample = t_max * (L + 2) * (8 + 2 * 8 + 8)  # emissions + chains (both directions) + posterior
    cells = t_max * N * (L + (C if with_grad else 0))
    count = -(-N * per_sample // _CHUNK_TABLE_BYTES)
    parallel = cells >= _PARALLEL_MIN_CELLS and common.workers() > 1
    if parallel:
        count = max(count, _PIPELINE_CHUNKS)
    count = max(1, min(N, count))
    bounds = np.linspace(0, N, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a], parallel


class _Chunk:
    """The scaled recursions for a contiguous range of samples, in three stages run by the pipeline:
    :meth:`prepare` (emissions), :meth:`recurse` (both chains over time), :meth:`posterior` (posteriors and gradient, by
    frame ranges), :meth:`check` (losses and the consistency check). Writes ``nll``, ``ok`` and ``grad`` of its samples
    in place; ``ok[n]`` becomes False where the check fails (the exact path then redoes the sample, rows included).
    """

    def __init__(self, problem, span, index, run, nll, ok, grad, grad_scale, convention, scratch):
        n0, n1 = span
        self.lp = problem.log_probs[:, n0:n1]  # (T, k, C)
        self.il, self.tl = problem.input_lengths[n0:n1], problem.target_lengths[n0:n1]  # (k,)
        self.targets, self.blank = problem.targets[n0:n1], problem.blank  # (k, S)
        self.run, self.nll, self.ok = run[n0:n1], nll[n0:n1], ok[n0:n1]
        self.grad = None if grad is None else grad[:, n0:n1]  # (T, k, C) view
        self.grad_scale = None if grad is None else grad_scale[n0:n1]
        self.convention, self.scratch, self.tag = convention, scratch, str(index)
        self.active = bool(self.run.any())

    def prepare(self):
        with np.errstate(all="ignore"):  # per thread; under/overflow and NaN are judged by the check
            t_max = int(self.il.max())
            self.lattice = _ChainPair(self.targets[:, : int(self.tl.max())], self.tl, self.il, self.blank, t_max)
            if self.grad is None:
                self.emit, self.log_max, self.accepted, self.bits = self.lattice.forward_emissions(
                    self.lp, self.run, self.scratch, self.tag)
            else:
                self.emit, self.log_max, self.flushed = self.lattice.emissions(self.lp, self.scratch, self.tag)

    def recurse(self):
        with np.errstate(all="ignore"):
            if self.grad is None:
                self.log_p, self.lost = loss_numpy.log_likelihood(self.emit, self.bits, self.lattice, self.scratch,
                                                                  self.tag)
                return
            self.q, self.log_scale = _recursion(self.emit, self.lattice, self.scratch, self.tag)
        self.log_z = np.empty((self.lattice.t_max, self.lattice.k))  # (t_max, k), filled by the posterior parts

    def posterior(self, part, parts):
        """Posteriors and gradient for frame range ``part`` of ``parts`` (the ranges are independent)."""
        if self.grad is None:
            return
        t_max = self.lattice.t_max
        frames = (t_max * part // parts, t_max * (part + 1) // parts)
        with np.errstate(all="ignore"):
            _posterior_and_gradient(self.q, self.emit, self.lattice, self.lp, self.run, self.grad, self.grad_scale,
                                    self.convention, self.scratch, f"{self.tag}.{part}", frames, self.log_z)

    def check(self):
        """Per-sample loss and the consistency check (the loss alone: whether the forward pass accepted the
        sample); releases the tables."""
        with np.errstate(all="ignore"):
            self._check()
        del self.emit  # the tables go back to the workspace
        if self.grad is not None:
            del self.q

    def _check(self):
        lattice, il = self.lattice, self.il
        t_max, k = lattice.t_max, lattice.k
        last, n = il - 1, np.arange(k)
        rows = np.arange(t_max)[:, None] < il[None, :]  # (t_max, k) frames inside each sample
        total_max = np.where(rows, self.log_max, 0.0).sum(axis=0)  # (k,) sum of the emission log-scales m_t
        if self.grad is None:
            log_p_fwd = self.log_p + total_max
            good = self.accepted & ~self.lost
        else:
            log_z, log_scale = self.log_z, self.log_scale
            # log p = log Z_t + the scales of both chains at the frame, the same for every frame t < T_n
            log_p = log_z + log_scale[:, :k] + log_scale[::-1, k:] + total_max[None, :]  # (t_max, k)
            log_p_fwd = log_p[last, n]  # (k,) the forward chain's end: torch's definition of the loss
            spread = np.where(rows, np.abs(log_p - log_p_fwd[None, :]), 0.0).max(axis=0)  # NaN propagates
            smallest_z = np.where(rows, log_z, 0.0).min(axis=0)  # (k,) tiny Z_t: subnormal, imprecise values
            good = ((spread <= _CONSISTENCY_TOL * np.maximum(1.0, np.abs(log_p_fwd)))
                    & (smallest_z > _LOG_Z_FLOOR) & ~self.flushed)
        self.nll[self.run] = -log_p_fwd[self.run]
        self.ok[self.run] = (good & np.isfinite(log_p_fwd))[self.run]


class _ChainPair:
    """The ``2k`` chains of ``k`` samples: forward chains (alpha), then reversed chains (beta), over one lattice.

    Every chain holds position ``s`` of ``l'`` at column ``s + 2`` (columns 0 and 1 are zero-emission padding that
    keeps shifts in the flattened rows from carrying mass across chains). Forward chain ``n`` runs frame ``t`` at step
    ``t`` and moves mass up (``s - 1, s - 2 -> s``). Reversed chain ``n`` runs frame ``t_max - 1 - step`` at each
    step, from step ``t_max - T_n`` on, and moves mass down (``s + 1, s + 2 -> s``): it is the backward recursion,
    and since its time axis is aligned to the same last step for every sample, beta of cell ``(t, s)`` is the
    time-reversed *view* ``q[t_max - 1 - t, k + n, s + 2]`` of the table. Both read the same emission table.

    Attributes:
        ext: ``(k, L)`` int64 extended labels (blank beyond ``L_n``).
        classes: ``(k, S + 1)`` int64 the blank, then the target's labels (blank beyond its length): the classes
            whose emissions are computed, each once per frame (every even position of ``l'`` is the blank).
        valid: ``(k, L)`` bool, ``s < L_n``.
        lengths: ``(k,)`` ``L_n = 2 target_lengths + 1``.
        skip_up: ``(k, L + 2)`` 1 at column ``s + 2`` where ``s - 2 -> s`` is allowed (a label differing from
            ``l'_{s-2}``); skip_down: ``(k, L + 2)`` 1 where ``s + 2 -> s`` is (the same moves, seen from below).
        starts: ``{step: reversed chains starting there}`` for the chains with ``T_n < t_max``.
    """

    def __init__(self, targets, tl, il, blank, t_max):
        k, S = targets.shape
        L = 2 * S + 1
        self.k, self.L, self.t_max, self.il = k, L, t_max, il
        self.lengths = 2 * tl + 1  # (k,)
        self.valid = np.arange(L)[None, :] < self.lengths[:, None]  # (k, L)
        self.ext = np.full((k, L), blank, dtype=np.int64)  # (k, L)
        self.ext[:, 1::2] = targets
        self.ext[~self.valid] = blank  # read as the blank: a class of the sample's lattice
        self.classes = np.concatenate([np.full((k, 1), blank, dtype=np.int64), self.ext[:, 1::2]], axis=1)
        self.skip_up = np.zeros((k, L + 2))  # (k, L + 2)
        self.skip_up[:, 5::2] = (targets[:, 1:] != targets[:, :-1]) & self.valid[:, 3::2]
        self.skip_down = np.zeros((k, L + 2))
        self.skip_down[:, 2:L] = self.skip_up[:, 4:]
        late = np.flatnonzero(il < t_max)
        self.starts = {int(step): k + late[t_max - il[late] == step] for step in np.unique(t_max - il[late])}

    def emissions(self, lp, scratch, tag):
        """Scaled emissions ``y_hat`` ``(t_max, k, L + 2)`` float64, their log-scales ``m`` ``(t_max, k)``, and
        ``flushed`` ``(k,)``: samples with a finite emission too small for float64 (see _FLUSH_LOG).

        ``y_hat_t(s) = exp(log y_t(l'_s) - m_t)`` at column ``s + 2``, with ``m_t`` the largest log-probability among
        the sample's labels at frame ``t``: the most probable label gets 1, so rescaling every few steps keeps the
        chains far from underflow. Everything is computed in float64 whatever the input type (a float32 ``exp``
        would flush labels 104 nats below the frame's best to 0). The padding columns and invalid positions
        ``s >= L_n`` hold 0. Frames ``t >= T_n`` are replaced by probability 1 before use: padding frames (possibly
        NaN) never reach the chains, and the values computed there are never used.
        """
        gathered, log_max = self._shifted(lp, scratch, tag)
        flushed = ((gathered < _FLUSH_LOG) & (gathered > -np.inf)).any(axis=(0, 2))  # (k,) lattice classes only
        # A NaN or all -inf frame (NaN here) gets the sample no mass at all, so it fails the check and is redone
        # exactly; left in, its NaN would cross into the next chain of the flattened rows and fail that one too.
        emit = self._exp(gathered, ~np.isfinite(log_max).all(axis=0), scratch, tag)
        return emit, log_max, flushed

    def forward_emissions(self, lp, run, scratch, tag):
        """The emissions of the loss-only pass (:func:`deploy_ctc._backends.cpu.loss_numpy.log_likelihood`):
        ``(emit, log_max, accepted, bits)``.

        ``accepted`` ``(k,)``: the ``run`` samples whose lattice emissions (frames ``t < T_n``, positions
        ``s < L_n``) are all finite and within ``loss_numpy.FLOOR_LOG`` of their frame's largest; ``emit`` as
        :meth:`emissions`, with 0 also in frames ``t >= T_n`` and for every sample not accepted; ``bits``
        ``(t_max,)`` :func:`deploy_ctc._backends.cpu.loss_numpy.frame_bits` of the accepted samples.
        """
        gathered, log_max = self._shifted(lp, scratch, tag)
        lowest = gathered.min(axis=2)  # (t_max, k) over the lattice's classes
        accepted = run & np.isfinite(log_max).all(axis=0) & (lowest >= loss_numpy.FLOOR_LOG).all(axis=0)
        bits = loss_numpy.frame_bits(lowest, accepted)
        emit = self._exp(gathered, ~accepted, scratch, tag)
        for n in np.flatnonzero(self.il < self.t_max):
            emit[self.il[n]:, n] = 0.0  # past the sample's end: the pass ends there
        return emit, log_max, accepted, bits

    def _shifted(self, lp, scratch, tag):
        """``(gathered, log_max)``: ``log y_t(c) - m_t`` for the :attr:`classes` ``c``, ``(t_max, k, S + 1)``
        float64 (0 in frames ``t >= T_n``), and ``m_t`` ``(t_max, k)``."""
        gathered = self._gather(lp, scratch, tag)  # (t_max, k, S + 1) log y_t(c), float64
        for n in np.flatnonzero(self.il < self.t_max):
            gathered[self.il[n]:, n] = 0.0
        log_max = gathered.max(axis=2)  # (t_max, k)
        np.subtract(gathered, log_max[:, :, None], out=gathered)
        return gathered, log_max

    def _exp(self, gathered, silent, scratch, tag):
        """``(t_max, k, L + 2)`` emissions at column ``s + 2``: ``exp(gathered)`` (computed in place) of the blank
        at every even ``s``, of label ``i`` at ``s = 2i - 1``; 0 in the padding columns, at ``s >= L_n`` and for the
        ``silent`` ``(k,)`` samples."""
        k, L, t_max = self.k, self.L, self.t_max
        emit = scratch.array("emit" + tag, (t_max, k, L + 2))
        emit[:, :, :2] = 0.0
        np.exp(gathered, out=gathered)
        emit[:, :, 2::2] = gathered[:, :, :1]
        emit[:, :, 3::2] = gathered[:, :, 1:]
        emit[:, silent] = 0.0
        for n in np.flatnonzero(self.lengths < L):
            emit[:, n, 2 + self.lengths[n]:] = 0.0  # s >= L_n
        return emit

    def _gather(self, lp, scratch, tag):
        """``lp[t, n, c]`` for ``t < t_max`` and the :attr:`classes` ``c`` as a contiguous float64
        ``(t_max, k, S + 1)`` array. Only the gathered entries are read or converted: a strided or broadcast ``lp``
        is never copied whole."""
        k, t_max = self.k, self.t_max
        width = self.classes.shape[1]
        C = lp.shape[2]
        out = scratch.array("gathered" + tag, (t_max, k, width))
        if lp.strides[2] == lp.itemsize and lp.strides[1] == C * lp.itemsize:
            # Rows of (N * C) contiguous values: one take over flattened (sample, class) columns.
            rows = np.lib.stride_tricks.as_strided(lp, shape=(t_max, k * C), strides=(lp.strides[0], lp.itemsize))
            columns = (np.arange(k)[:, None] * C + self.classes).reshape(-1)  # (k (S + 1),)
            if lp.dtype == np.float64:
                np.take(rows, columns, axis=1, out=out.reshape(t_max, k * width), mode="clip")
            else:
                out.reshape(t_max, k * width)[...] = np.take(rows, columns, axis=1, mode="clip")
            return out
        for n in range(k):
            out[:, n] = lp[:t_max, n][:, self.classes[n]]  # (t_max, S + 1): fancy indexing reads only these
        return out

    def initial(self):
        """``(2k, L + 2)`` the pre-emission values at a chain's first step: 1 at its two start positions."""
        k = self.k
        init = np.zeros((2 * k, self.L + 2))
        init[:k, 2:4] = 1.0  # forward: s = 0, 1
        n = np.arange(k)
        init[k + n, self.lengths + 1] = 1.0  # reversed: s = L_n - 1
        init[k + n[self.lengths > 1], self.lengths[self.lengths > 1]] = 1.0  # reversed: s = L_n - 2
        return init


def _recursion(emit, lattice, scratch, tag):
    """Run the ``2k`` scaled chains over ``t_max`` steps.

    Each step works on the rows of each direction flattened into one contiguous vector of ``k (L + 2)`` values
    (strided 2-D operations cost NumPy about three times more).

    Returns:
        ``(q, log_scale)``: ``q`` ``(t_max, 2k, L + 2)`` pre-emission values (column ``s + 2`` is position ``s``;
        padding columns hold values that zero emission cancels). ``log_scale``
        ``(t_max, 2k)``: the log of the normalisers divided out of ``q`` since the chain started (true
        ``q = q_hat * exp(log_scale + sum of the m's of the frames already emitted)``).
    """
    t_max, k, width = emit.shape
    chains, half = 2 * k, k * width
    init = lattice.initial()  # (2k, L + 2)
    q = scratch.array("chains" + tag, (t_max, chains, width))
    q[:, 0, :2] = 0.0  # the only cells the flattened updates never write
    q[0] = init
    flat_emit = emit.reshape(t_max, half)
    up, down = lattice.skip_up.reshape(-1)[2:], lattice.skip_down.reshape(-1)
    a = np.zeros(chains * width + 2)  # a_t = q_t * y_t, both directions, and two zeros read by the last shift
    a_rows = a[:-2].reshape(chains, width)
    a_fwd, a_rev = a[:half], a[half:2 * half]
    up0, up1, up2 = a[2:half], a[1:half - 1], a[:half - 2]  # s, s - 1, s - 2 (forward)
    down0, down1, down2 = a[half:2 * half], a[half + 1:2 * half + 1], a[half + 2:]  # s, s + 1, s + 2 (reversed)
    skipped_up, skipped_down = np.empty(half - 2), np.empty(half)
    norm = np.ones((t_max, chains))
    for t in range(t_max):
        q_t = q[t]
        if t in lattice.starts:
            q_t[lattice.starts[t]] = init[lattice.starts[t]]
        if t == t_max - 1:
            break
        q_flat = q_t.reshape(-1)
        np.multiply(q_flat[:half], flat_emit[t], out=a_fwd)
        np.multiply(q_flat[half:], flat_emit[t_max - 1 - t], out=a_rev)
        if t % _RESCALE_EVERY == 0:
            c = norm[t]
            np.max(a_rows, axis=1, out=c)
            c[c == 0.0] = 1.0  # a chain without mass stays 0 rather than 0 / 0 (NaN that would cross chains)
            np.divide(a_rows, c[:, None], out=a_rows)
        q_next = q[t + 1].reshape(-1)
        fwd_next, rev_next = q_next[2:half], q_next[half:]
        np.multiply(up2, up, out=skipped_up)
        np.add(up0, up1, out=fwd_next)
        np.add(fwd_next, skipped_up, out=fwd_next)
        np.multiply(down2, down, out=skipped_down)
        np.add(down0, down1, out=rev_next)
        np.add(rev_next, skipped_down, out=rev_next)
    log_norm = np.log(norm)  # (t_max, chains)
    for step, chains_starting in lattice.starts.items():
        log_norm[:step, chains_starting] = 0.0  # normalisers of a reversed chain before it starts don't count
    log_scale = np.zeros((t_max, chains))
    np.cumsum(log_norm[:-1], axis=0, out=log_scale[1:])
    return q, log_scale


def _posterior_and_gradient(q, emit, lattice, lp, run, grad, grad_scale, convention, scratch, tag, frames, log_z):
    """Posteriors and the gradient, fused over blocks of frames so each block stays cache-resident.

    For frames ``t0 <= t < t1``: ``g_t(s) = q_fwd_t(s) y_hat_t(s) q_rev_{t_max-1-t}(s)``,
    ``Z_t = sum_s g_t(s)``, ``gamma = g / Z``, and ``grad[t, n, c] = grad_scale[n] * (exp(lp) - sum_{s: l'_s = c}
    gamma_t(s))`` for ``t < T_n`` (``-sum gamma`` for the "plain" convention); ``grad`` ``(T, k, C)`` arrives zeroed.

    Only frames ``frames = (ta, tb)`` are handled; ``log Z_t`` goes to rows ``ta:tb`` of ``log_z`` ``(t_max, k)``
    for the consistency check.
    """
    t_max = q.shape[0]
    k, L, il = lattice.k, lattice.L, lattice.il
    T, _, C = grad.shape
    q_fwd = q[:, :k, 2:]  # (t_max, k, L)
    beta = q[::-1, k:, 2:]  # (t_max, k, L) beta'_t(s): the reversed chains, time-reversed view
    # Labels (odd positions) are summed per (sample, class) group; the blank (every even position) separately.
    labels = lattice.valid & run[:, None]  # (k, L)
    labels[:, 0::2] = False
    cells, starts, columns = logspace.class_groups(lattice.ext, labels, C)
    group_sample = columns // C  # (G,)
    column_scale = grad_scale[group_sample]  # (G,)
    blank_scale = np.where(run, grad_scale, 0.0)  # (k,)
    blank_columns = np.arange(k) * C + lattice.ext[:, 0]  # (k,)
    scale = None if np.all(grad_scale[run] == 1.0) else grad_scale.astype(grad.dtype)[None, :, None]  # (1, k, 1)
    flat_grad = grad.reshape(T, k * C) if grad.flags.c_contiguous else None
    short = [(int(length), np.flatnonzero(il == length)) for length in np.unique(il) if length < t_max]
    ta, tb = frames
    step = max(1, (2 << 20) // (k * max(L, C) * 8))
    block_buffer = scratch.array("posterior" + tag, (max(1, min(step, tb - ta)), k, L))
    for t0 in range(ta, tb, step):
        t1 = min(t0 + step, tb)
        g = np.multiply(q_fwd[t0:t1], emit[t0:t1, :, 2:], out=block_buffer[: t1 - t0])  # (B, k, L); 0 where invalid
        g *= beta[t0:t1]
        block = grad[t0:t1]  # (B, k, C)
        if convention == "torch":
            np.exp(lp[t0:t1], out=block)
            if scale is not None:
                np.multiply(block, scale, out=block)
        for length, samples in short:  # frames past a sample's end: no posterior, zero gradient
            if length < t1:
                g[max(length - t0, 0):, samples] = 0.0
                block[max(length - t0, 0):, samples] = 0.0
        z = g.sum(axis=2)  # (B, k)
        log_z[t0:t1] = np.log(z)
        inverse_z = np.where(z > 0, 1.0 / z, 0.0)  # (B, k): gamma = g / Z, applied to the sums below
        blank = g[:, :, 0::2].sum(axis=2) * inverse_z * blank_scale  # (B, k)
        if cells.size:
            agg = np.add.reduceat(np.take(g.reshape(t1 - t0, k * L), cells, axis=1), starts, axis=1)  # (B, G)
            agg *= inverse_z[:, group_sample]
            agg *= column_scale
        if flat_grad is not None:
            rows = flat_grad[t0:t1]
            rows[:, blank_columns] -= blank.astype(grad.dtype, copy=False)
            if cells.size:
                rows[:, columns] -= agg.astype(grad.dtype, copy=False)
        else:
            block[:, np.arange(k), lattice.ext[:, 0]] -= blank.astype(grad.dtype, copy=False)
            if cells.size:
                block[:, group_sample, columns % C] -= agg.astype(grad.dtype, copy=False)
