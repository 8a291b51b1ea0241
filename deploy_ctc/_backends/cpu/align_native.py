"""Forced alignment in the native engine (``kernels/ctc_align_cpu.cpp``): the Viterbi of
:mod:`deploy_ctc._backends.cpu.align_numpy` as compiled code, one sample at a time in float64.

Samples are dealt to the worker threads of :func:`deploy_ctc._backends.cpu.common.pool` by their lattice size (the
engine releases the GIL); small batches run on the calling thread. Scratch per call: the two frames of ``delta``
and one byte per lattice cell for the backpointers, ``T_n (2 S_n + 1)`` bytes for its largest sample.
"""

from __future__ import annotations

import numpy as np

from . import common, native_build

# Below this many lattice cells a batch runs on the calling thread.
_PARALLEL_MIN_CELLS = 200_000


def forced_align(problem):
    """``(alignment, scores)`` ``(T, N)``: the results of :func:`deploy_ctc._backends.cpu.align_numpy.forced_align`
    (float16 log-probs are read through a float32 copy; their scores come back in float32, exactly).

    Raises:
        deploy_ctc._backends.cpu.native_build.NativeUnavailable: the engine cannot be built here.
        MemoryError: the engine's scratch memory could not be allocated.
    """
    lib = native_build.library()
    lp = problem.log_probs  # (T, N, C)
    if lp.dtype == np.float16:  # the engine reads float and double; float32 holds every float16 (and its scores)
        lp = lp.astype(np.float32)
    T, N, _ = lp.shape
    if lp.dtype == np.float16:
        lp = lp.astype(np.float32)  # the engine reads float or double; float16 values are exact in float32
    if any(stride % lp.itemsize for stride in lp.strides):
        lp = np.ascontiguousarray(lp)  # strides that are not whole elements (a view into a packed record)
    st, sn, sc = (stride // lp.itemsize for stride in lp.strides)
    il, tl = (np.ascontiguousarray(a, dtype=np.int64) for a in (problem.input_lengths, problem.target_lengths))
    targets = np.ascontiguousarray(problem.targets, dtype=np.int64)  # (N, S)
    alignment = np.full((T, N), problem.blank, dtype=np.int64)  # (T, N)
    scores = np.zeros((T, N), dtype=lp.dtype)  # (T, N)
    entry = getattr(lib, native_build.ALIGN_ENTRY_POINTS[lp.dtype.name])

    samples = np.flatnonzero(il > 0)  # (R,)
    cost = il[samples] * (2 * tl[samples] + 1)  # (R,) lattice cells
    parts = common.deal(samples, cost, common.workers() if cost.sum() >= _PARALLEL_MIN_CELLS else 1)

    def call(part):
        status = entry(lp.ctypes.data, N, st, sn, sc, targets.ctypes.data, targets.shape[1], il.ctypes.data,
                       tl.ctypes.data, problem.blank, part.ctypes.data, part.size, alignment.ctypes.data,
                       scores.ctypes.data)
        if status != 0:
            raise MemoryError(f"deploy_ctc's native engine could not allocate its alignment scratch for "
                              f"{part.size} samples of up to T={int(il[part].max())} frames")

    common.run_parts(call, parts)
    return alignment, scores
