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
    if problem.log_probs.dtype == np.float16:
        return common.in_float32_groups(problem, grad_scale, convention, forward_backward)
    nll, grad, grad_scale, run = common.start(problem, grad_scale)
    samples = np.flatnonzero(run)  # (R,)
    if samples.size:
        ok = np.zeros(nll.shape, dtype=np.uint8)  # (N,) the engine's ENGINE_* code of each sample
        parts = _run_engine(lib, problem, samples, nll, ok, grad, grad_scale, convention)
        redo = samples[ok[samples] == ENGINE_LEFT]
        if redo.size:
            with np.errstate(all="ignore"):
                common.redo_exact(problem, redo, nll, grad, grad_scale, convention)
        paths.record("native", samples, samples[ok[samples] != ENGINE_FAST], parts)
    return common.finish(problem, nll, grad)


def _run_engine(lib, problem, samples, nll, ok, grad, grad_scale, convention):
    """Call the engine on ``samples`` (its loss-only entry point without ``grad``), split across the worker threads
    when the work is large enough; returns how many parts it was split into."""
    lp = problem.log_probs  # (T, N, C)
    T, N, C = lp.shape
    if any(stride % lp.itemsize for stride in lp.strides):
        lp = np.ascontiguousarray(lp)  # strides that are not whole elements (a view into a packed record)
    st, sn, sc = (stride // lp.itemsize for stride in lp.strides)
    # The engine indexes these as dense arrays: grad_output reaches grad_scale as a stride-0 broadcast, say.
    il, tl = (np.ascontiguousarray(a, dtype=np.int64) for a in (problem.input_lengths, problem.target_lengths))
    targets = np.ascontiguousarray(problem.targets, dtype=np.int64)  # (N, S)
    grad_scale = None if grad_scale is None else np.ascontiguousarray(grad_scale, dtype=np.float64)  # (N,)
    address = lambda array: None if array is None else array.ctypes.data  # noqa: E731

    cost = il[samples] * (2 * tl[samples] + 1 + (C if grad is not None else 0))  # (R,) cells each sample touches
    parts = common.deal(samples, cost, common.workers() if cost.sum() >= _PARALLEL_MIN_CELLS else 1)
    shared = (address(targets), targets.shape[1], address(il), address(tl), problem.blank)
    if grad is None:  # the loss-only entry point: the forward recursion alone
        entry = getattr(lib, native_build.NLL_ENTRY_POINTS[lp.dtype.name])
        head, tail = (address(lp), C, st, sn, sc) + shared, (address(nll), address(ok))
    else:
        entry = getattr(lib, native_build.ENTRY_POINTS[lp.dtype.name])
        head = (address(lp), N, C, st, sn, sc) + shared
        tail = (address(grad), address(grad_scale), int(convention == "plain"), address(nll), address(ok))

    def call(part):
        if entry(*head, part.ctypes.data, part.size, *tail) != 0:
            raise MemoryError(f"deploy_ctc's native engine could not allocate its scratch memory for "
                              f"{part.size} samples of up to T={int(il[part].max())} frames")

    common.run_parts(call, parts)
    return len(parts)

