"""The backends that run the CTC recursions, and the one rule that picks among them.

A backend is a module with the :class:`Backend` interface. NumPy arrays run on the CPU backend chosen by
:mod:`deploy_ctc._backends.cpu` (the native engine of ``kernels/ctc_cpu.cpp`` where it builds, else pure NumPy);
CuPy arrays run on the CUDA kernels of ``kernels/ctc.cu`` (:mod:`deploy_ctc._backends.cuda.cupy_kernels`).
:func:`backend_for` is the dispatcher; the API applies ``zero_infinity`` and the reduction to what a backend returns.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .._typing import Array
from ..validation import CTCProblem


class Backend(Protocol):
    """What every backend module provides.

    ``forward_backward(problem, grad_scale=None, convention="torch") -> (nll, grad)``

    Args:
        problem: a validated :class:`~deploy_ctc.validation.CTCProblem`. ``log_probs`` ``(T, N, C)`` float32 or
            float64 (half precision already upcast), possibly a strided view; ``targets`` ``(N, S)`` int64,
            C-contiguous, zero beyond each target length; the lengths are host int64 ``(N,)`` arrays.
        grad_scale: None for the loss alone, else ``(N,)`` float64 per-sample gradient weights (the API passes
            ``grad_output`` times the reduction's factor; mean: ``1 / (N * max(target_length, 1))``).
        convention: ``"torch"`` or ``"plain"`` (see below).

    Returns:
        ``nll``: ``(N,)``, ``-log p(target_n | x_n)``; ``+inf`` for an infeasible target, never zeroed here.
        ``grad``: None without ``grad_scale``, else ``(T, N, C)`` in ``problem.log_probs.dtype``:

        .. math::
            g_{t,n,c} = s_n \\left(e^{lp_{t,n,c}} - \\gamma_{t,n,c}\\right) \\quad (\\text{torch}), \\qquad
            g_{t,n,c} = -s_n \\gamma_{t,n,c} \\quad (\\text{plain})

        with :math:`\\gamma` the posterior of class ``c`` at frame ``t`` and :math:`s_n` = ``grad_scale[n]``, for
        ``t < input_lengths[n]``; exactly 0 for ``t >= input_lengths[n]``; where ``nll[n]`` is inf, the rows
        ``t < input_lengths[n]`` are NaN, or 0 when ``problem.zero_infinity``.

    Frames ``t >= input_lengths[n]`` are never read, so NaN there cannot leak. Inputs are never modified.
    """

    def forward_backward(self, problem: CTCProblem, grad_scale: np.ndarray | None = None,
                         convention: str = "torch") -> tuple[Array, Array]: ...


def backend_for(problem: CTCProblem) -> Backend:
    """The backend for the array library of ``problem`` (NumPy: the selected CPU backend; CuPy: the CUDA kernels)."""
    if problem.xp is np:
        from . import cpu

        return cpu.current()
    from .cuda import cupy_kernels

    return cupy_kernels
