"""CUDA forced alignment: the Viterbi of :mod:`deploy_ctc.align` on CuPy arrays, kernel ``ctc_align`` of
``kernels/ctc.cu``.

One launch on the current CuPy stream: a block per sample, threads over its lattice positions, one barrier per frame,
``delta`` in double; backpointers take one byte per cell in a ``(N, T, 2S + 1)`` device buffer. Nothing is
synchronized. :func:`run_align` is shared with the CPU test harness, which runs the same kernel from NumPy arrays.
"""

from __future__ import annotations

import numpy as np

from deploy_ctc._backends.cuda import loader
from deploy_ctc._backends.cuda.cupy_kernels import LATTICE_MAX_THREADS, SHARED_BUDGET, _int32, _threads


def forced_align(problem):
    """``(alignment, scores)`` ``(T, N)`` on the device of ``problem.log_probs`` (see :mod:`deploy_ctc.align`)."""
    device = problem.log_probs.device
    with device:
        return run_align(problem, loader.launcher(device.id))


def run_align(problem, launcher):
    """Launch ``ctc_align`` for ``problem`` through ``launcher``; allocations use ``problem.xp``."""
    xp = problem.xp
    lp = problem.log_probs  # (T, N, C)
    T, N, _ = lp.shape
    S = problem.targets.shape[1]
    row = 2 * S + 1  # lattice positions of the longest target
    alignment = xp.full((T, N), problem.blank, dtype=np.int64)  # (T, N)
    scores = xp.zeros((T, N), dtype=lp.dtype)  # (T, N)
    lp_strides = tuple(np.int64(stride // lp.itemsize) for stride in lp.strides)
    targets = xp.ascontiguousarray(problem.targets, dtype=np.int64)  # (N, S)
    input_lengths = xp.asarray(problem.input_lengths, dtype=np.int64)  # (N,)
    target_lengths = xp.asarray(problem.target_lengths, dtype=np.int64)  # (N,)
    rows_in_shared = 2 * row * 8 <= SHARED_BUDGET
    rows = xp.empty(0 if rows_in_shared else N * 2 * row, dtype=np.float64)  # (N, 2, 2S + 1) when not shared
    moves = xp.empty((N, T, row), dtype=np.uint8)  # (N, T, 2S + 1) backpointers
    launcher.launch(loader.kernel_name("ctc_align", lp.dtype), (N, 1, 1), (_threads(row, LATTICE_MAX_THREADS), 1, 1),
                    (lp, *lp_strides, targets, _int32(S, "max target length"), input_lengths, target_lengths,
                     _int32(N, "batch size"), _int32(T, "input length"), np.int32(problem.blank),
                     np.int32(rows_in_shared), rows, moves, alignment, scores),
                    2 * row * 8 if rows_in_shared else 0)
    return alignment, scores
