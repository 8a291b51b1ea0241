"""deploy_ctc on torch tensors: a drop-in for ``torch.nn.functional.ctc_loss`` and ``torch.nn.CTCLoss``.

The loss is the ``torch.library`` custom op ``deploy_ctc::ctc_loss`` (``torch.ops.deploy_ctc.ctc_loss``), with a
fake implementation (shapes only), a registered autograd formula and an autocast rule, so it works under
``torch.compile`` (``fullgraph=True`` included), ``torch.export`` and :func:`deploy_ctc.onnx.export` like any
torch operator. Tensors cross to deploy_ctc's backends without copies through DLPack: CPU tensors become NumPy
arrays (the native engine, or the NumPy fallback), CUDA tensors become CuPy arrays (CUDA kernels, run on torch's
current stream of the tensor's device).

The op computes the gradient together with the loss (one forward-backward pass) when ``log_probs`` requires grad;
``backward`` scales it by the upstream gradient, so ``loss.backward()`` gives torch's gradients. Unlike torch's
``ctc_loss``, that gradient is differentiable again (double backward: gradient penalties, Hessian-vector products):
the op ``deploy_ctc::ctc_loss_hvp`` computes the exact derivative of the gradient
(:mod:`deploy_ctc._backends.cpu.hessian`, on the CPU in float64 for tensors on any device). A third derivative
raises a RuntimeError.

Beyond torch: target values are validated (torch reads out of bounds), float16 and bfloat16 ``log_probs`` are
accepted outside autocast (computed in float32, returned in the input dtype), and the CUDA gradient is
deterministic. Under ``torch.autocast`` (CPU or CUDA) the loss is computed and returned in float32, as torch's
autocast policy does for ``ctc_loss``.

:func:`patch` makes third-party code that calls ``torch.nn.functional.ctc_loss`` / ``torch.nn.CTCLoss`` use
deploy_ctc. :func:`forced_align` is ``torchaudio.functional.forced_align`` (batch-first, any batch size) on the same
backends.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any

import numpy as np

try:
    import torch
except ImportError as error:  # pragma: no cover - exercised only without torch
    raise ImportError("deploy_ctc.torch needs PyTorch: pip install torch (CPU wheels suffice)") from error

from . import align, api
from .validation import check_options, integer_array, validate

__all__ = ["CTCLoss", "CTCTypeError", "CTCValueError", "ctc_loss", "forced_align", "patch"]

class CTCValueError(ValueError, RuntimeError):
    """An invalid argument value. A ``ValueError`` like every deploy_ctc argument error, and a ``RuntimeError``
    like the error ``torch.nn.functional.ctc_loss`` raises for the same input, so code written against torch's
    loss keeps catching it."""


class CTCTypeError(TypeError, RuntimeError):
    """An argument of the wrong type: a ``TypeError``, and a ``RuntimeError`` like torch's (see
    :class:`CTCValueError`)."""


def _torch_errors(function):
    """Raise ``function``'s argument errors as :class:`CTCValueError` / :class:`CTCTypeError` (same message)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (CTCValueError, CTCTypeError):
            raise
        except ValueError as error:
            raise CTCValueError(str(error)) from None
        except TypeError as error:
            raise CTCTypeError(str(error)) from None

    return wrapper


THIRD_DERIVATIVE_ERROR = ("deploy_ctc::ctc_loss: derivatives of third and higher order are not implemented "
                          "(the gradient and its derivative, double backward, are)")


@_torch_errors
def ctc_loss(log_probs: torch.Tensor, targets: Any, input_lengths: Any, target_lengths: Any, blank: int = 0,
             reduction: str = "mean", zero_infinity: bool = False) -> torch.Tensor:
    """``torch.nn.functional.ctc_loss`` computed by deploy_ctc; differentiable with respect to ``log_probs``.

    Args:
        log_probs: ``(T, N, C)`` or ``(T, C)`` tensor of log-probabilities, float32/float64 (float16/bfloat16
            computed in float32), on the CPU or a CUDA device.
        targets: ``(N, S)`` padded, 1-D concatenated or ``(S,)`` unbatched integer tensor (or array/sequence), on
            the CPU or ``log_probs``'s device.
        input_lengths, target_lengths: tensors (CPU or ``log_probs``'s device), tuples/lists or ints, as torch
            accepts.
        blank, reduction, zero_infinity: as ``torch.nn.CTCLoss``.

    Returns:
        The loss on ``log_probs``'s device, of its dtype (float32 under autocast for float16/bfloat16/float32
        input, like torch): shape ``()`` for mean/sum, ``(N,)`` for none (``()`` unbatched).

    Raises:
        CTCTypeError, CTCValueError: invalid arguments (the messages of :func:`deploy_ctc.ctc_loss`); a tensor on
        a device other than the CPU or ``log_probs``'s. They are TypeError / ValueError and also RuntimeError, the
        type torch raises.
    """
    blank, reduction, zero_infinity = check_options(blank, reduction, zero_infinity)
    if not isinstance(log_probs, torch.Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    _check_device("log_probs", log_probs, log_probs.device)
    targets = _integer_tensor(targets, "targets", log_probs.device)
    input_lengths = _integer_tensor(input_lengths, "input_lengths", log_probs.device)
    target_lengths = _integer_tensor(target_lengths, "target_lengths", log_probs.device)
    with_grad = torch.is_grad_enabled() and log_probs.requires_grad
    loss, _ = _ctc_loss_op(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity,
                           with_grad)
    return loss


@_torch_errors
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
        CTCTypeError, CTCValueError: invalid arguments (see :func:`deploy_ctc.forced_align`); also RuntimeError.
    """
    if not isinstance(log_probs, torch.Tensor):
        raise TypeError(f"log_probs must be a torch.Tensor, got {type(log_probs).__name__}")
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be (N, T, C) (batch first), got shape {tuple(log_probs.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an (N, L) tensor, got {shape}")
    N, T, _ = log_probs.shape
    _check_device("targets", targets, log_probs.device)
    input_lengths = (torch.full((N,), T, dtype=torch.int64) if input_lengths is None
                     else _integer_tensor(input_lengths, "input_lengths", log_probs.device))
    target_lengths = (torch.full((N,), targets.shape[1], dtype=torch.int64) if target_lengths is None
                      else _integer_tensor(target_lengths, "target_lengths", log_probs.device))
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

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False):
        super().__init__()
        self.blank, self.reduction, self.zero_infinity = check_options(blank, reduction, zero_infinity)

    def forward(self, log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
                target_lengths: torch.Tensor) -> torch.Tensor:
        """:func:`ctc_loss` with the module's options (eager: every argument form it takes; TorchScript: tensors)."""
        if torch.jit.is_scripting():
            # The op itself: argument conversion and device checks are Python; the op validates the values.
            with_grad = torch.is_grad_enabled() and log_probs.requires_grad
            return torch.ops.deploy_ctc.ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank,
                                                 self.reduction, self.zero_infinity, with_grad)[0]
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                        self.zero_infinity)

    def extra_repr(self) -> str:
        return f"blank={self.blank}, reduction={self.reduction!r}, zero_infinity={self.zero_infinity}"


# ---- argument conversion -----------------------------------------------------------------------------

def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Tensors must live on the CPU or on ``log_probs``'s device, and that device must be the CPU or CUDA."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"deploy_ctc.torch supports CPU and CUDA tensors, got log_probs on device {device}")
    if tensor.device.type != "cpu" and tensor.device != device:
        raise ValueError(f"{name} must be on the CPU or on log_probs's device ({device}), got device "
                         f"{tensor.device}")


def _integer_tensor(value: Any, name: str, device: torch.device) -> torch.Tensor:
    """Targets or lengths as a tensor: tensors pass (device-checked); ints, sequences and arrays become int64
    CPU tensors, with :func:`deploy_ctc.validation.integer_array`'s messages for anything else."""
    if isinstance(value, torch.Tensor):
        _check_device(name, value, device)
        return value
    if torch.compiler.is_compiling():  # a traced constant: NumPy conversion is not traceable
        return torch.as_tensor(value, dtype=torch.int64)
    return torch.from_numpy(np.array(integer_array(value, name, np), dtype=np.int64))


def _array(value: torch.Tensor):
    """A tensor as a NumPy (CPU) or CuPy (CUDA) array, without copying."""
    value = value.detach()
    if value.device.type == "cuda":
        import cupy

        return cupy.from_dlpack(value)
    if value.device.type != "cpu":
        raise ValueError(f"deploy_ctc.torch supports CPU and CUDA tensors, got device {value.device}")
    return np.from_dlpack(value.resolve_conj().resolve_neg())


def _tensor(array) -> torch.Tensor:
    """The inverse of :func:`_array` for backend results (NumPy or CuPy arrays, 0-d included)."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array if array.flags.c_contiguous else array.copy())
    return torch.from_dlpack(array)


def _device_context(tensor: torch.Tensor):
    """For CUDA tensors: make CuPy use the tensor's device and torch's current stream on it."""
    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    stream = torch.cuda.current_stream(tensor.device)
    stack = contextlib.ExitStack()
    stack.enter_context(cupy.cuda.Device(tensor.device.index))
    stack.enter_context(cupy.cuda.ExternalStream(stream.cuda_stream, tensor.device.index))
    return stack


# ---- the custom op -----------------------------------------------------------------------------------

# Defined through torch.library.Library rather than torch.library.custom_op, whose kernels import torch._dynamo
# (seconds) on the first call of every process.
_LIBRARY = torch.library.Library("deploy_ctc", "DEF")
_LIBRARY.define("ctc_loss(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
                "int blank, str reduction, bool zero_infinity, bool with_grad) -> (Tensor, Tensor)")


@_torch_errors
def _ctc_loss_kernel(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
                     target_lengths: torch.Tensor, blank: int, reduction: str, zero_infinity: bool,
                     with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, grad)``: the loss of :func:`deploy_ctc.ctc_loss` in ``log_probs``'s dtype and, when
    ``with_grad``, ``d loss / d log_probs`` for a unit upstream gradient (torch's convention, reduction factors
    included; shape and dtype of ``log_probs``), else an empty ``(0,)`` tensor.

    ``with_grad`` only decides when the gradient is computed: in this one pass, or by backward if it is needed.
    """
    compute = log_probs.detach()
    if compute.dtype == torch.bfloat16:  # NumPy and CuPy have no bfloat16
        compute = compute.float()
    with _device_context(log_probs):
        args = (_array(compute), _array(targets), _array(input_lengths), _array(target_lengths), blank, reduction,
                zero_infinity)
        if with_grad:
            loss, grad = api.ctc_loss_and_grad(*args)
            grad = _tensor(grad).to(log_probs.dtype)
        else:
            loss, grad = api.ctc_loss(*args), log_probs.new_empty((0,))
    return _tensor(loss).to(log_probs.dtype), grad


_LIBRARY.define("ctc_loss_hvp(Tensor log_probs, Tensor targets, Tensor input_lengths, Tensor target_lengths, "
                "Tensor direction, int blank, str reduction, bool zero_infinity) -> Tensor")
_ctc_loss_op = torch.ops.deploy_ctc.ctc_loss.default
_ctc_loss_hvp_op = torch.ops.deploy_ctc.ctc_loss_hvp.default


def _ctc_loss_fake(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, with_grad):
    per_sample = reduction == "none" and log_probs.dim() == 3
    loss = log_probs.new_empty((log_probs.shape[1],) if per_sample else ())
    grad = log_probs.new_empty(log_probs.shape if with_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, with_grad = inputs
    ctx.options = (blank, reduction, zero_infinity)
    ctx.per_sample = reduction == "none" and log_probs.dim() == 3
    ctx.with_grad = with_grad
    ctx.save_for_backward(log_probs, targets, input_lengths, target_lengths, output[1] if with_grad else None)
    # An absent gradient for the ``grad`` output stays None: it is how backward tells a first-order call from a
    # call that differentiates the returned gradient again.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_of_grad):
    log_probs, targets, input_lengths, target_lengths, grad = ctx.saved_tensors
    result = None
    if grad_loss is not None:
        if grad is None:  # called with with_grad=False (a performance hint only): compute the gradient now
            grad = _ctc_loss_op(log_probs, targets, input_lengths, target_lengths, *ctx.options, True)[1]
        # grad holds d loss / d log_probs for a unit upstream gradient; the product keeps ``grad``'s graph, so
        # differentiating it again comes back here (or to the recomputing call's node) with grad_of_grad set.
        weight = grad_loss[None, :, None] if ctx.per_sample else grad_loss
        result = grad * weight.to(grad.dtype)
    if ctx.with_grad and grad_of_grad is not None:
        # Double backward: the vector-Jacobian product of the gradient output (its Jacobian is symmetric).
        second = _ctc_loss_hvp_op(log_probs, targets, input_lengths, target_lengths, grad_of_grad, *ctx.options)
        result = second if result is None else result + second
    return (result,) + (None,) * 7


@_torch_errors
def _ctc_loss_hvp_kernel(log_probs, targets, input_lengths, target_lengths, direction, blank, reduction,
                         zero_infinity):
    """``d/de grad(log_probs + e direction)`` for the unit-upstream ``grad`` of :func:`_ctc_loss_kernel`, computed
    on the CPU in float64 (:mod:`deploy_ctc._backends.cpu.hessian`); shape, dtype and device of ``log_probs``."""
    from ._backends.cpu.hessian import hessian_vector_product

    host = [value.detach().cpu() for value in (log_probs, targets, input_lengths, target_lengths, direction)]
    # NumPy has no bfloat16: log_probs and the direction (which has log_probs' dtype) go through float32, exactly.
    host = [value.float() if value.dtype == torch.bfloat16 else value for value in host]
    arrays = [_array(value) for value in host]
    problem = validate(*arrays[:4], blank, reduction, zero_infinity)
    scale = api.grad_scale(problem, None)  # (N,) the reduction's factor per sample
    direction = arrays[4] if problem.batched else arrays[4][:, None, :]  # (T, N, C)
    product = hessian_vector_product(problem, direction, scale)  # (T, N, C) float64
    product = product if problem.batched else product[:, 0, :]
    return torch.from_numpy(product).to(device=log_probs.device, dtype=log_probs.dtype)


def _ctc_loss_hvp_fake(log_probs, targets, input_lengths, target_lengths, direction, blank, reduction,
                       zero_infinity):
    return torch.empty_like(log_probs)


def _hvp_backward(ctx, grad):
    raise RuntimeError(THIRD_DERIVATIVE_ERROR)


for _dispatch_key in ("CPU", "CUDA"):
    _LIBRARY.impl("ctc_loss", _ctc_loss_kernel, _dispatch_key)
    _LIBRARY.impl("ctc_loss_hvp", _ctc_loss_hvp_kernel, _dispatch_key)
torch.library.register_fake("deploy_ctc::ctc_loss_hvp", _ctc_loss_hvp_fake, lib=_LIBRARY)
torch.library.register_autograd("deploy_ctc::ctc_loss_hvp", _hvp_backward, lib=_LIBRARY)
torch.library.register_fake("deploy_ctc::ctc_loss", _ctc_loss_fake, lib=_LIBRARY)
torch.library.register_autograd("deploy_ctc::ctc_loss", _backward, setup_context=_setup_context, lib=_LIBRARY)
# torch's autocast policy runs ctc_loss in float32 (float16/bfloat16/float32 inputs cast; float64 kept).
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("deploy_ctc::ctc_loss", _device_type, torch.float32, lib=_LIBRARY)


# ---- patch(): deploy_ctc inside third-party code -----------------------------------------------------

class patch(contextlib.ContextDecorator):  # noqa: N801 -- used like a function: ``with patch():``
    """Make ``torch.nn.functional.ctc_loss`` and ``torch.nn.CTCLoss`` compute with deploy_ctc inside a block.

    As a context manager (``with deploy_ctc.torch.patch(): model(**batch)``) or a decorator
    (``@deploy_ctc.torch.patch()``). Inside, code that looks the functions up at call time
    (``F.ctc_loss(...)``, ``nn.functional.ctc_loss(...)``, ``nn.CTCLoss(...)(...)``, existing ``nn.CTCLoss``
    instances) runs :func:`ctc_loss`; on exit, normal or by an exception, torch's functions are restored.
    Names bound before the block (``from torch.nn.functional import ctc_loss``) are not affected.

    Patches nest (each exit restores what its entry found). The patch is process-global: other threads see
    deploy_ctc while any block is open; open and close blocks from one thread, or around all threads' work.
    """

    _lock = threading.Lock()

    def __init__(self) -> None:
        # One entry per open block of this instance (a decorated function may call itself).
        self._saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> "patch":
        with self._lock:
            self._saved.append((torch.nn.functional.ctc_loss, torch.nn.CTCLoss.__dict__["forward"]))
            _swap(_patched_functional, _patched_forward)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            _swap(*self._saved.pop())


def _swap(functional: Any, forward: Any) -> None:
    """Install ``functional`` as ``torch.nn.functional.ctc_loss`` and ``forward`` as ``torch.nn.CTCLoss.forward``."""
    setattr(torch.nn.functional, "ctc_loss", functional)  # noqa: B010 -- assigning over a typed module attribute
    setattr(torch.nn.CTCLoss, "forward", forward)  # noqa: B010


@functools.wraps(torch.nn.functional.ctc_loss)
def _patched_functional(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean",
                        zero_infinity=False):
    return ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)


def _patched_forward(self, log_probs, targets, input_lengths, target_lengths):
    return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                    self.zero_infinity)
