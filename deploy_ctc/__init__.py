"""deploy_ctc: the CTC loss of ``torch.nn.CTCLoss`` for NumPy, CuPy (CUDA) and ONNX Runtime.

Public API (torch's argument names, order and defaults):

- :func:`ctc_loss` — the loss.
- :func:`ctc_loss_and_grad` — the loss and its gradient with respect to ``log_probs``.
- :class:`CTCLoss` — a callable mirroring ``nn.CTCLoss``.
- :func:`forced_align` — the best alignment of each target (Viterbi) and its per-frame log-probs;
  :func:`token_spans` — an alignment's labels as frame spans with mean scores.
- :mod:`deploy_ctc.backends` — choose the CPU backend (:func:`~deploy_ctc.backends.using`), free scratch memory.
- :mod:`deploy_ctc.torch` — the torch operator ``deploy_ctc::ctc_loss`` and an ``nn.Module`` running these backends on
  torch tensors (torch.compile, torch.export, autocast), and ``patch()`` for third-party models.
- :mod:`deploy_ctc.onnx` — the ``deploy_ctc::CTCLoss`` ONNX op, its native ONNX Runtime custom-op library and torch
  export.
"""

from . import backends
from .align import TokenSpan, forced_align, token_spans
from .api import CTCLoss, ctc_loss, ctc_loss_and_grad

__version__ = "0.1.0"
__all__ = ["CTCLoss", "TokenSpan", "backends", "ctc_loss", "ctc_loss_and_grad", "forced_align", "token_spans",
           "__version__"]
