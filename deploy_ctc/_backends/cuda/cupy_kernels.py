"""CUDA backend: CTC loss and gradient of a validated batch on CuPy arrays, with the kernels of ``kernels/ctc.cu``.

Three launches on the current CuPy stream of the device holding ``log_probs``; nothing of size T*N*C leaves
the device, and nothing is synchronized:

1. ``ctc_lattice``: alpha (and beta when a gradient is wanted) tables ``(N, T, 2S+1)`` and ``nll (N,)``;
   one block per (direction, sample), one barrier per frame; with a gradient, further blocks write its dense
   part ``w_n * exp(lp)`` (0 for "plain") meanwhile, the one pass over the (T, N, C) arrays.
2. ``ctc_label_links``: for each target position, the previous/next position with the same label ``(N, S, 2)``.
3. ``ctc_grad``: one block per (frame, sample) overwrites the target's classes of ``grad[t, n, :]``; each
   class's posterior is summed in a fixed order (label chains, a fixed-shape block reduction for the blank),
   so results are bitwise reproducible.

The launch code (:func:`run_kernels`) is shared with the CPU test harness, which executes the same kernels from
NumPy arrays through an object with the same ``launch(name, grid, block, args, shared_mem)`` method.
"""

from __future__ import annotations

import numpy as np

from deploy_ctc._backends.cuda import loader
from deploy_ctc.validation import check_convention

#: Dynamic shared memory a lattice block may use for its two rows; longer targets take the global-memory path.
#: 48 KiB is what every CUDA device grants without opting in.
SHARED_BUDGET = 48 * 1024
#: Frames of emissions a lattice block gathers ahead into shared memory (bounded by SHARED_BUDGET).
MAX_STAGE_FRAMES = 64
LATTICE_MAX_THREADS = 512
#: Dense-gradient blocks of the lattice launch (grid-stride over the T*N rows) and the classes one covers at once.
DENSE_MAX_BLOCKS = 2048
DENSE_THREADS = 256
LINKS_THREADS = 128
GRAD_MAX_THREADS = 256
MAX_GRID_Y = 65535
INT32_MAX = 2**31 - 1


def forward_backward(problem, grad_scale=None, convention="torch"):
    """Per-sample ``nll`` and, when ``grad_scale`` is given, the gradient, on the device of ``problem.log_probs``.

    Args:
        problem: a validated :class:`deploy_ctc.validation.CTCProblem` of CuPy arrays; log_probs (T, N, C).
        grad_scale: None, or cupy (N,) float64 weights ``w_n`` (grad_output times the reduction factor).
        convention: ``"torch"``: ``grad = w_n * (exp(lp) - posterior)``; ``"plain"``: ``-w_n * posterior``.

    Returns:
        ``(nll, grad)``: nll (N,) in the compute dtype, ``-log p(target_n | x_n)``, +inf if infeasible;
        grad (T, N, C) in log_probs' dtype or None. Rows t >= input_lengths[n] are 0; rows of an infinite nll
        are NaN (0 with ``problem.zero_infinity``).
    """
    device = problem.log_probs.device
    with device:
        return run_kernels(problem, grad_scale, convention, loader.launcher(device.id))


def _int32(value: int, what: str) -> np.int32:
    if value > INT32_MAX:
        raise ValueError(f"{what} = {value} exceeds the CUDA backend's limit of {INT32_MAX}")
    return np.int32(value)


def _threads(work: int, limit: int) -> int:
    """Block size: ``work`` rounded up to whole warps, between one warp and ``limit``."""
    return min(limit, max(32, -(-work // 32) * 32))


def run_kernels(problem, grad_scale, convention, launcher):
    """Launches the kernels for ``problem`` through ``launcher``; see :func:`forward_backward`.

    Array allocations use ``problem.xp`` (cupy on a GPU, numpy in the CPU test harness).
    """
    check_convention(convention)
    xp = problem.xp
    lp = problem.log_probs                                   # (T, N, C)
    T, N, C = lp.shape
    S = problem.targets.shape[1]
    dtype = lp.dtype
    nll = xp.empty(N, dtype=dtype)                           # (N,)
    want_grad = grad_scale is not None
    grad = xp.empty((T, N, C), dtype=dtype) if want_grad else None  # (T, N, C)
    if N == 0:
        return nll, grad

    row = 2 * S + 1                                          # lattice positions of the longest target
    lp_strides = tuple(np.int64(stride // lp.itemsize) for stride in lp.strides)
    targets = xp.ascontiguousarray(problem.targets, dtype=np.int64)     # (N, S)
    input_lengths = xp.asarray(problem.input_lengths, dtype=np.int64)   # (N,)
    target_lengths = xp.asarray(problem.target_lengths, dtype=np.int64)  # (N,)
    n32 = _int32(N, "batch size")
    common = (lp, *lp_strides, targets, _int32(S, "max target length"), input_lengths, target_lengths, n32,
              _int32(T, "input length"), _int32(C, "number of classes"), np.int32(problem.blank))
    plain = convention == "plain"

    alpha = xp.empty((N, T, row), dtype=dtype)               # (N, T, 2S+1)
    beta = xp.empty((N, T, row), dtype=dtype) if want_grad else alpha  # a forward-only launch never writes it
    scale = xp.ascontiguousarray(grad_scale if want_grad else xp.empty(0), dtype=np.float64)  # (N,)
    # Lattice shared memory: the two rows when they fit, then as many frames of staged emissions as fit.
    row_bytes = row * lp.itemsize
    rows_in_shared = 2 * row_bytes <= SHARED_BUDGET
    stage_frames = min(MAX_STAGE_FRAMES, (SHARED_BUDGET - 2 * row_bytes * rows_in_shared) // row_bytes)
    shared = (2 * rows_in_shared + stage_frames) * row_bytes
    # Blocks beyond the 2N lattice blocks write the dense part of the gradient meanwhile.
    dense_blocks = min(T * N, DENSE_MAX_BLOCKS) if want_grad else 0
    threads = _threads(max(row, min(C, DENSE_THREADS)) if want_grad else row, LATTICE_MAX_THREADS)
    launcher.launch(loader.kernel_name("ctc_lattice", dtype),
                    ((2 if want_grad else 1) * N + dense_blocks, 1, 1), (threads, 1, 1),
                    (*common, np.int32(rows_in_shared), np.int32(stage_frames), alpha, beta, nll, scale,
                     np.int32(plain), grad if want_grad else alpha), shared)
    if not want_grad:
        return nll, grad

    links = xp.empty((N, S, 2), dtype=np.int32)              # (N, S, 2)
    grid_y = min(N, MAX_GRID_Y)
    if S > 0:
        launcher.launch(loader.kernel_name("ctc_label_links"),
                        (-(-S // LINKS_THREADS), grid_y, 1), (LINKS_THREADS, 1, 1),
                        (targets, np.int32(S), target_lengths, n32, links))
    if T > 0:
        launcher.launch(loader.kernel_name("ctc_grad", dtype),
                        (T, grid_y, 1), (_threads(S + 1, GRAD_MAX_THREADS), 1, 1),
                        (*common, links, alpha, beta, nll, scale, np.int32(problem.zero_infinity),
                         np.int32(plain), grad))
    return nll, grad
