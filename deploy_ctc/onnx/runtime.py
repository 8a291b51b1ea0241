"""onnxruntime SessionOptions that run deploy_ctc::CTCLoss / CTCLossGrad / CTCAlign with deploy_ctc's native library.

Two ways a session computes the ops:

- the native custom-op library (:mod:`deploy_ctc.onnx.native_library`), registered by :func:`session_options`:
  the CPU engine on the session's buffers, bit-identical to :func:`deploy_ctc.ctc_loss`; invalid inputs fail the
  ``run`` call with an ``InvalidArgument`` error carrying the Python API's message;
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
_warned = False


def session_options(so: Any = None) -> Any:
    """onnxruntime SessionOptions whose sessions run deploy_ctc's ops (CTCLoss, CTCLossGrad, CTCAlign) with the
    native library.

    Thread-safe; the first call in a process may build the library (seconds, once per machine).

    Args:
        so: an ``onnxruntime.SessionOptions`` to extend in place (registering on it again does nothing); a new
            one when None.
    Returns:
        ``so``, with the library registered where it is available (else unchanged, after a ``RuntimeWarning``
        naming the reason: the models' portable function bodies run instead).
    Raises:
        ImportError: onnxruntime is missing (``pip install deploy_ctc[onnx]``).
    """
    global _warned
    ort = require_onnxruntime()
    if so is None:
        so = ort.SessionOptions()
    try:
        path = library_path()
    except NativeUnavailable as error:
        with _lock:
            if not _warned:
                _warned = True
                warnings.warn(f"deploy_ctc: the native ONNX Runtime library is unavailable ({error}); sessions run "
                              "the models' portable function bodies", RuntimeWarning, stacklevel=2)
        return so
    with _lock:
        if so not in _registered:
            so.register_custom_ops_library(path)
            _registered.add(so)
    return so
