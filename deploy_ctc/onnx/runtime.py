"""onnxruntime SessionOptions that run deploy_ctc::CTCLoss / CTCLossGrad / CTCAlign with deploy_ctc's native library.

Two ways a session computes the ops:

- the native custom-op library (:mod:`deploy_ctc.onnx.native_library`), registered by :func:`session_options`:
  the CPU engine on the session's buffers, bit-identical to :func:`deploy_ctc.ctc_loss`; invalid inputs fail the
  ``run`` call with an ``InvalidArgument`` error carrying the Python API's message; ``session_options(cuda=True)``
  registers its CUDA variant, whose ops also run on ``CUDAExecutionProvider`` (not yet run on a
  GPU);
- the portable model-local function bodies (standard ONNX ops, :mod:`deploy_ctc.onnx.functions`) that exported
  models carry by default: plain onnxruntime runs them, on any execution provider, more slowly.

Where the library cannot be built here, :func:`session_options` warns once, naming the reason, and registers
nothing: sessions then run the portable bodies (a model exported without them fails at session creation with
"not a registered function/op").
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any

from deploy_ctc.onnx._deps import require_onnxruntime
from deploy_ctc.onnx.native_library import NativeUnavailable, library_path

_lock = threading.Lock()
# SessionOptions the library is registered on (registering it twice fails at session creation).
_registered: weakref.WeakSet[Any] = weakref.WeakSet()
_warned: set[bool] = set()  # the variants (cuda or not) already warned about


def session_options(so: Any = None, cuda: bool = False) -> Any:
    """onnxruntime SessionOptions whose sessions run deploy_ctc's ops (CTCLoss, CTCLossGrad, CTCAlign) with the
    native library.

    Thread-safe; the first call in a process may build the library (seconds, once per machine).

    Args:
        so: an ``onnxruntime.SessionOptions`` to extend in place (registering on it again does nothing); a new
            one when None.
        cuda: register the library's CUDA variant (``library_path(cuda=True)``, built with nvcc), whose ops also
            run on ``CUDAExecutionProvider``; for sessions on a GPU. Where it cannot be built, the
            CPU library is registered instead, after a ``RuntimeWarning`` naming the reason. Not yet run on a GPU.
    Returns:
        ``so``, with the library registered where it is available (else unchanged, after a ``RuntimeWarning``
        naming the reason: the models' portable function bodies run instead).
    Raises:
        ImportError: onnxruntime is missing (``pip install deploy_ctc[onnx]``).
    """
    ort = require_onnxruntime()
    if so is None:
        so = ort.SessionOptions()
    path = None
    for variant in ((True, False) if cuda else (False,)):
        try:
            path = library_path(cuda=variant)
            break
        except NativeUnavailable as error:
            _warn_once(variant, error)
    if path is None:
        return so
    with _lock:
        if so not in _registered:
            so.register_custom_ops_library(path)
            _registered.add(so)
    return so


def _warn_once(cuda: bool, error: NativeUnavailable) -> None:
    with _lock:
        if cuda in _warned:
            return
        _warned.add(cuda)
    what = "CUDA build of the native ONNX Runtime library" if cuda else "native ONNX Runtime library"
    then = "the CPU library is registered instead" if cuda else "sessions run the models' portable function bodies"
    warnings.warn(f"deploy_ctc: the {what} is unavailable ({error}); {then}", RuntimeWarning, stacklevel=3)
