"""deploy_ctc on torch tensors: a drop-in for ``torch.nn.functional.ctc_loss`` and ``torch.nn.CTCLoss``.

Tensors cross to deploy_ctc's backends without copies through DLPack: CPU tensors become NumPy arrays (NumPy
backend), CUDA tensors become CuPy arrays (CUDA kernels, run on torch's current stream of the tensor's device). The
autograd Function computes the gradient together with the loss (one forward-backward pass) and scales it by the
upstream gradient in ``backward``, so ``loss.backward()`` gives the same gradients as torch's own ``ctc_loss``.

Beyond torch: target values are validated (torch reads out of bounds), float16 and bfloat16 ``log_probs`` are
accepted (computed in float32), and the CUDA gradient is deterministic.

:func:`forced_align` is ``torchaudio.functional.forced_align`` (batch-first, any batch size) on the same backends.
"""

from __future__ import annotations

import numpy as np

try:
    import torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError("deploy_ctc.torch needs PyTorch: pip install torch (CPU wheels suffice)") from error

from . import align, api
from .validation import check_options

__all__ = ["CTCLoss", "ctc_loss", "forced_align"]


def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean", zero_infinity=False):
    """``torch.nn.functional.ctc_loss`` computed by deploy_ctc; differentiable with respect to ``log_probs``.

    Args:
        log_probs: ``(T, N, C)`` or ``(T, C)`` tensor of log-probabilities, float32/float64 (float16/bfloat16
            computed in float32), on the CPU or a CUDA device.
        targets: ``(N, S)`` padded, 1-D concatenated or ``(S,)`` unbatched integer tensor (or array/sequence).
        input_lengths, target_lengths: tensors, tuples/lists or ints, as torch accepts.
        blank, reduction, zero_infinity: as ``torch.nn.CTCLoss``.

    Returns:
        The loss as a tensor on ``log_probs``'s device and of its dtype.

    Raises:
        TypeError, ValueError: invalid arguments (see :func:`deploy_ctc.ctc_loss`).
    """
    blank, reduction, zero_infinity = check_options(blank, reduction, zero_infinity)
    if not isinstance(log_probs, torch.Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    return _CTCLossFunction.apply(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)


def forced_align(log_probs, targets, input_lengths=None, target_lengths=None, blank=0):
    """``torchaudio.functional.forced_align`` (torchaudio 2.11) computed by deploy_ctc, for any batch size.

    Args:
        log_probs: ``(N, T, C)`` batch-first tensor of log-probabilities, float16/bfloat16/float32/float64, on the
            CPU or a CUDA device.
        targets: ``(N, L)`` padded integer tensor (int32 or int64), values in ``[0, C)`` other than ``blank``.
        input_lengths: ``(N,)`` frames per sample, default ``T`` for all.
        target_lengths: ``(N,)`` target lengths, default ``L`` for all.
        blank: index of the blank class.

    Returns:
        ``(alignments, scores)``, both ``(N, T)`` on ``log_probs``' device: the label of the best path at each
        frame (dtype of ``targets``) and its log-probability (dtype of ``log_probs``). Frames
        ``t >= input_lengths[n]`` are ``blank`` with score 0; an infeasible sample (torchaudio raises) is all
        ``blank`` with ``-inf`` scores. Ties follow :mod:`deploy_ctc.align`, which is torchaudio's rule except
        where torchaudio keeps a strictly worse predecessor.

    Raises:
        TypeError, ValueError: invalid arguments (see :func:`deploy_ctc.forced_align`).
    """
    if not isinstance(log_probs, torch.Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (N, T, C) (batch first), got shape {tuple(log_probs.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an (N, L) tensor, got {shape}")
    N, T, _ = log_probs.shape
    if input_lengths is None:
        input_lengths = torch.full((N,), T, dtype=torch.int64, device=targets.device)
    if target_lengths is None:
        target_lengths = torch.full((N,), targets.shape[1], dtype=torch.int64, device=targets.device)
    compute = log_probs.detach()
    if compute.dtype == torch.bfloat16:  # NumPy and CuPy have no bfloat16
        compute = compute.float()
    with _device_context(log_probs):
        alignment, scores = align.forced_align(_array(compute.transpose(0, 1)), _array(targets),
                                               _array(input_lengths), _array(target_lengths), blank)  # (T, N)
        alignment = _tensor(alignment).T.to(targets.dtype).contiguous()
        scores = _tensor(scores).T.to(log_probs.dtype).contiguous()
    return alignment, scores


class CTCLoss(torch.nn.Module):
    """``torch.nn.CTCLoss(blank=0, reduction='mean', zero_infinity=False)`` computed by deploy_ctc."""

    def __init__(self, blank=0, reduction="mean", zero_infinity=False):
        super().__init__()
        self.blank, self.reduction, self.zero_infinity = check_options(blank, reduction, zero_infinity)

    def forward(self, log_probs, targets, input_lengths, target_lengths):
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                        self.zero_infinity)

    def extra_repr(self):
        return f"blank={self.blank}, reduction={self.reduction!r}, zero_infinity={self.zero_infinity}"


class _CTCLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity):
        compute = log_probs.detach()
        if compute.dtype == torch.bfloat16:  # NumPy and CuPy have no bfloat16
            compute = compute.float()
        with _device_context(log_probs):
            args = (_array(compute), _array(targets), _array(input_lengths), _array(target_lengths), blank,
                    reduction, zero_infinity)
            if ctx.needs_input_grad[0]:
                loss, grad = api.ctc_loss_and_grad(*args)
                ctx.save_for_backward(_tensor(grad).to(log_probs.dtype))
            else:
                loss = api.ctc_loss(*args)
        ctx.per_sample = reduction == "none" and log_probs.dim() == 3
        return _tensor(loss).to(log_probs.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # grad holds d loss / d log_probs for a unit upstream gradient (reduction factors included).
        weight = grad_output[None, :, None] if ctx.per_sample else grad_output
        return grad * weight.to(grad.dtype), None, None, None, None, None, None


def _array(value):
    """Tensors become NumPy (CPU) or CuPy (CUDA) arrays without copying; anything else passes through."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    if value.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(value)
    if value.device.type != "cpu":
        raise ValueError(f"deploy_ctc.torch supports CPU and CUDA tensors, got device {value.device}")
    return np.from_dlpack(value.resolve_conj().resolve_neg())


def _tensor(array):
    """The inverse of :func:`_array` for backend results (NumPy or CuPy arrays, 0-d included)."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array if array.flags.c_contiguous else array.copy())
    return torch.from_dlpack(array)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _device_context(tensor):
    """For CUDA tensors: make CuPy use the tensor's device and torch's current stream on it."""
    if tensor.device.type != "cuda":
        return _NullContext()
    import contextlib

    import cupy

    stream = torch.cuda.current_stream(tensor.device)
    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(tensor.device.index))
    stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, tensor.device.index))
    return stack
