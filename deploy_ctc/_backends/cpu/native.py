r"""Native CPU backend: the NumPy backend's algorithm as compiled code (``kernels/ctc_cpu.cpp``).

Same contract as :func:`deploy_ctc._backends.cpu.pure_numpy.forward_backward` (the :class:`deploy_ctc._backends.Backend`
protocol). Each sample runs its scaled probability-space forward and backward recursions in float64, vectorized over the
lattice's blank and label positions, and writes its gradient rows directly into the ``(T, N, C)`` output: no ``T x N x
(2S + 1)`` table outlives its sample, so peak memory is the gradient plus about ``3 T_n S_n`` float64 of scratch per
sample in flight (one per worker thread, or up to four short ones in lockstep). Samples whose consistency check fails
(long lattices, confident outputs that disagree with the target) are redone by the engine with an exponent per
lattice position (exact by construction), or in log space where even that is out of range; only samples with NaN
log-probs come back here, for :mod:`deploy_ctc._backends.cpu.logspace`.

Samples are dealt to the worker threads of :func:`deploy_ctc._backends.cpu.common.pool` by estimated cost (the engine
releases the GIL); small batches run on the calling thread.
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import common, native_build
from .. import paths

# Below this much work (lattice cells plus gradient cells) a batch runs on the calling thread: handing it to a
# worker costs more than it saves.
_PARALLEL_MIN_CELLS = 200_000

# What the engine writes to ``ok[n]`` for each sample it was given (kernels/ctc_cpu.cpp, ``run``): left for
# :func:`deploy_ctc._backends.cpu.common.redo_exact` (NaN log-probs), done by the scaled recursions, or redone
# exactly in log space by the engine itself.
ENGINE_LEFT, ENGINE_FAST, ENGINE_EXACT = 0, 1, 2


def forward_backward(problem, grad_scale=None, convention="torch"):
    """Per-sample negative log-likelihoods ``(N,)`` and, with ``grad_scale``, the scaled ``(T, N, C)`` gradient:
    the arguments and results of :func:`deploy_ctc._backends.cpu.pure_numpy.forward_backward` (the
    :class:`deploy_ctc._backends.Backend` protocol). Without ``grad_scale`` only the forward recursion runs (the
    engine's loss-only pass, exact by construction; see kernels/README.md).

    Raises:
        deploy_ctc._backends.cpu.native_build.NativeUnavailable: the engine cannot be built here.
        MemoryError: the engine's scratch memory could not be allocated.
    """
    lib = native_build.library()
    if problem.log_probs.dtype.char == "e":  # float16
        return common.in_float32_groups(problem, grad_scale, convention, forward_backward)
    nll, grad, grad_scale, run = common.start(problem, grad_scale)
    samples = run.nonzero()[0]  # (R,)
    if samples.size:
        # The engine's ENGINE_* code of each sample; those it is not given count as fast (they need no redo).
        ok = np.empty(nll.shape, dtype=np.uint8)  # (N,)
        ok.fill(ENGINE_FAST)
        parts = _run_engine(lib, problem, samples, nll, ok, grad, grad_scale, convention)
        if np.minimum.reduce(ok) == ENGINE_LEFT:  # a sample left to the exact log-space redo (the lowest code)
            with np.errstate(all="ignore"):
                common.redo_exact(problem, np.flatnonzero(ok == ENGINE_LEFT), nll, grad, grad_scale, convention)
        if paths.recording_now():
            paths.record("native", samples, np.flatnonzero(ok != ENGINE_FAST), parts)
    return common.finish(problem, nll, grad)


def _run_engine(lib, problem, samples, nll, ok, grad, grad_scale, convention):
    """Call the engine on ``samples`` (its loss-only entry point without ``grad``), split across the worker threads
    when the work is large enough; returns how many parts it was split into."""
    lp = problem.log_probs  # (T, N, C)
    T, N, C = lp.shape
    itemsize = lp.itemsize
    st, sn, sc = lp.strides
    if st % itemsize or sn % itemsize or sc % itemsize:
        lp = np.ascontiguousarray(lp)  # strides that are not whole elements (a view into a packed record)
        st, sn, sc = lp.strides
    # The engine indexes these as dense arrays: grad_output reaches grad_scale as a stride-0 broadcast, say.
    il = np.ascontiguousarray(problem.input_lengths, dtype=np.int64)  # (N,)
    tl = np.ascontiguousarray(problem.target_lengths, dtype=np.int64)  # (N,)
    targets = np.ascontiguousarray(problem.targets, dtype=np.int64)  # (N, S)
    S = targets.shape[1]
    gradient_cells = 0 if grad is None else C
    if T * N * (2 * S + 1 + gradient_cells) >= _PARALLEL_MIN_CELLS:  # a bound on the cost below
        cost = il[samples] * (2 * tl[samples] + 1 + gradient_cells)  # (R,) cells each sample touches
        parts = common.deal(samples, cost, common.workers() if cost.sum() >= _PARALLEL_MIN_CELLS else 1)
    else:  # too little work to hand to threads, or to order for the engine's lanes: one call, on this thread
        parts = [np.ascontiguousarray(samples, dtype=np.int64)]
    loss_only, with_gradient = native_build.entry_points(lp.dtype)
    strides = (st // itemsize, sn // itemsize, sc // itemsize)
    shared = (_address(targets), S, _address(il), _address(tl), problem.blank)
    if grad is None:  # the loss-only entry point: the forward recursion alone
        entry = loss_only
        head, tail = (_address(lp), C, *strides, *shared), (_address(nll), _address(ok))
    else:
        entry = with_gradient
        grad_scale = np.ascontiguousarray(grad_scale, dtype=np.float64)  # (N,)
        head = (_address(lp), N, C, *strides, *shared)
        tail = (_address(grad), _address(grad_scale), int(convention == "plain"), _address(nll), _address(ok))

    def call(part):
        if entry(*head, _address(part), part.size, *tail) != 0:
            raise MemoryError(f"deploy_ctc's native engine could not allocate its scratch memory for "
                              f"{part.size} samples of up to T={int(il[part].max())} frames")

    common.run_parts(call, parts)
    return len(parts)


_char_at = ctypes.c_char.from_buffer


def _address(array) -> int:
    """The address of ``array``'s first element (``array.ctypes.data``): through the buffer protocol where the array
    is writable, C-contiguous and not empty (a quarter of the cost of ``array.ctypes.data``, which builds a Python
    object per call), else ``array.ctypes.data``."""
    try:
        return ctypes.addressof(_char_at(array))
    except (TypeError, ValueError, BufferError):  # read-only, strided, or no byte to view
        return array.ctypes.data
