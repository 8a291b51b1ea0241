"""The public functions: ``torch.nn.functional.ctc_loss``'s behaviour on NumPy and CuPy arrays.

Each call validates its arguments (:mod:`deploy_ctc.validation`), hands the canonical problem to the backend that
owns the array (NumPy: :mod:`deploy_ctc._backends.cpu.native` or :mod:`deploy_ctc._backends.cpu.pure_numpy`, chosen by
:mod:`deploy_ctc._backends.cpu`; CuPy: :mod:`deploy_ctc._backends.cuda.cupy_kernels`), then applies ``zero_infinity``
and the reduction exactly as torch does.
"""

from __future__ import annotations

import numpy as np

from ._backends import backend_for
from ._typing import Array, IntArrayLike
from .validation import CONVENTIONS, check_convention, check_options, validate

__all__ = ["CONVENTIONS", "CTCLoss", "ctc_loss", "ctc_loss_and_grad"]


def ctc_loss(log_probs: Array, targets: IntArrayLike, input_lengths: IntArrayLike, target_lengths: IntArrayLike,
             blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> Array:
    """Connectionist Temporal Classification loss (Graves et al., 2006), as ``torch.nn.functional.ctc_loss``.

    .. math::

        \\ell_n = -\\log p(l_n \\mid x_n) = -\\log \\sum_{\\pi \\in \\mathcal{B}^{-1}(l_n)}
                  \\prod_{t < T_n} y^{(n)}_t(\\pi_t)

    summed over every alignment ``pi`` of length ``T_n = input_lengths[n]`` that collapses (merge repeats, drop
    blanks) to the target ``l_n``.

    Args:
        log_probs: ``(T, N, C)`` or unbatched ``(T, C)`` NumPy or CuPy array of log-probabilities (e.g. from
            log_softmax), float32 or float64; float16 is accepted and computed in float32. May be strided.
        targets: ``(N, S)`` padded, 1-D concatenated (length ``sum(target_lengths)``), or ``(S,)`` unbatched;
            integer values in ``[0, C)``, never ``blank`` (checked within each target's length only).
        input_lengths: ``(N,)`` (or a single length when unbatched): int, tuple/list of ints or integer array,
            each in ``[0, T]``; frames at ``t >= input_lengths[n]`` are never used.
        target_lengths: ``(N,)`` (or single) lengths, each ``<= S`` for padded targets.
        blank: index of the blank class, in ``[0, C)``.
        reduction: ``"none"`` → ``(N,)`` losses (``()`` unbatched); ``"sum"``; ``"mean"`` → each loss divided by
            ``max(target_length, 1)``, then averaged over the batch.
        zero_infinity: replace infinite losses (input too short for its target) by 0 (and their gradients by 0).

    Returns:
        The loss in the array library and dtype of ``log_probs``: shape ``()`` for mean/sum, ``(N,)`` for none.

    Raises:
        TypeError, ValueError: invalid arguments; the message names the argument and the offending value
        (see :func:`deploy_ctc.validation.validate`).

    References:
        A. Graves, S. Fernández, F. Gomez, J. Schmidhuber. Connectionist Temporal Classification: Labelling
        Unsegmented Sequence Data with Recurrent Neural Networks. ICML 2006.
    """
    problem = validate(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)
    nll, _ = backend_for(problem).forward_backward(problem)
    return _reduce(problem, nll)


def ctc_loss_and_grad(log_probs: Array, targets: IntArrayLike, input_lengths: IntArrayLike,
                      target_lengths: IntArrayLike, blank: int = 0, reduction: str = "mean",
                      zero_infinity: bool = False, *, grad_output: Array | float | None = None,
                      convention: str = "torch") -> tuple[Array, Array]:
    """The loss of :func:`ctc_loss` and its gradient with respect to ``log_probs``.

    Args:
        log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity: as :func:`ctc_loss`.
        grad_output: upstream gradient of the loss (a scalar for mean/sum, ``(N,)`` for none); default 1. For
            ``reduction="none"`` the default gives the gradient of ``loss.sum()``.
        convention: ``"torch"`` (default) returns torch's gradient ``exp(log_probs) - posterior``: the gradient
            through an upstream ``log_softmax`` (Graves eq. 16; pytorch issue #52241), which is what autograd on
            ``F.ctc_loss`` yields. ``"plain"`` returns the true partial derivative ``-posterior``, for log-probs
            that do not come from a log_softmax.

    Returns:
        ``(loss, grad)``: ``grad`` has the shape, dtype and array library of ``log_probs``; rows
        ``t >= input_lengths[n]`` are 0; rows of a sample with an infinite loss are NaN, or 0 with ``zero_infinity``.

    Raises:
        TypeError, ValueError: invalid arguments, a ``grad_output`` of the wrong shape, an unknown ``convention``.
    """
    check_convention(convention)
    problem = validate(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity)
    scale = grad_scale(problem, grad_output)
    nll, grad = backend_for(problem).forward_backward(problem, scale, convention)
    if not problem.batched:
        grad = grad[:, 0, :]  # (T, C)
    return _reduce(problem, nll), grad.astype(problem.out_dtype, copy=False)


class CTCLoss:
    """Callable mirroring ``torch.nn.CTCLoss(blank=0, reduction='mean', zero_infinity=False)``.

    ``CTCLoss(...)(log_probs, targets, input_lengths, target_lengths)`` returns :func:`ctc_loss`;
    :meth:`loss_and_grad` returns :func:`ctc_loss_and_grad`. Options are validated at construction.
    """

    def __init__(self, blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> None:
        self.blank, self.reduction, self.zero_infinity = check_options(blank, reduction, zero_infinity)

    def __call__(self, log_probs: Array, targets: IntArrayLike, input_lengths: IntArrayLike,
                 target_lengths: IntArrayLike) -> Array:
        return ctc_loss(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                        self.zero_infinity)

    def loss_and_grad(self, log_probs: Array, targets: IntArrayLike, input_lengths: IntArrayLike,
                      target_lengths: IntArrayLike, *, grad_output: Array | float | None = None,
                      convention: str = "torch") -> tuple[Array, Array]:
        return ctc_loss_and_grad(log_probs, targets, input_lengths, target_lengths, self.blank, self.reduction,
                                 self.zero_infinity, grad_output=grad_output, convention=convention)

    def __repr__(self) -> str:
        return (f"CTCLoss(blank={self.blank}, reduction={self.reduction!r}, "
                f"zero_infinity={self.zero_infinity})")


def _reduce(problem, nll):
    """Apply zero_infinity and the reduction to the ``(N,)`` per-sample losses, as torch does."""
    xp = problem.xp
    if problem.zero_infinity:
        nll = xp.where(nll == np.inf, 0.0, nll)
    if problem.reduction == "mean":
        divisor = xp.asarray(np.maximum(problem.target_lengths, 1.0), dtype=nll.dtype)  # (N,)
        per_label = nll / divisor  # (N,)
        # NumPy: mean()'s own value, without the Python wrapper of ndarray.mean (microseconds per call).
        loss = np.add.reduce(per_label) / per_label.size if xp is np else per_label.mean()
    elif problem.reduction == "sum":
        loss = nll.sum()
    else:
        loss = nll if problem.batched else nll[0]
    return xp.asarray(loss, dtype=problem.out_dtype)


def grad_scale(problem, grad_output):
    """Per-sample gradient weights ``(N,)`` float64: ``grad_output`` times the reduction's factor."""
    xp = problem.xp
    N = problem.log_probs.shape[1]
    loss_shape = (N,) if problem.reduction == "none" and problem.batched else ()
    if grad_output is None:
        if problem.reduction == "mean":
            return 1.0 / xp.asarray(N * np.maximum(problem.target_lengths, 1), dtype=np.float64)
        go = xp.ones(N)
    else:
        go = xp.asarray(grad_output, dtype=np.float64)
        if go.shape != loss_shape and go.size != 1:
            raise ValueError(f"grad_output must be a scalar or have the loss's shape {loss_shape}, "
                             f"got shape {tuple(go.shape)}")
        go = xp.broadcast_to(go.reshape(-1) if go.size == 1 else go, (N,))
    if problem.reduction == "mean":
        go = go / xp.asarray(N * np.maximum(problem.target_lengths, 1), dtype=np.float64)
    return go
