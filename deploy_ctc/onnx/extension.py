"""Fast path: deploy_ctc::CTCLoss / CTCLossGrad as onnxruntime-extensions Python custom ops.

The kernels call deploy_ctc's own API (``ctc_loss`` / ``ctc_loss_and_grad``), so a session built with
:func:`session_options` computes exactly what the Python API computes.  One registration per
(float type x targets x input_lengths x target_lengths int type) combination: onnxruntime-extensions
dispatches Python ops by their declared input types, and ORT picks the registration matching the node.

onnxruntime-extensions' invocation hook returns each output as ``rv.flatten().tolist()`` (a Python
float per element, ~140 ns each).  Its native side then reads that value with ``py::array`` and memcpys
it into the ORT output, so a C-contiguous ndarray is accepted just as well (and keeps its shape, 0-d
included).  :class:`_ArrayOutput` gives the hook an object whose ``flatten().tolist()`` is that ndarray:
no per-element conversion, and no global hook replaced.

A Python exception inside a kernel cannot become an ORT error: onnxruntime-extensions lets it escape
through a C boundary and the process aborts.  The kernels therefore never raise: on bad attributes or
inputs they log the deploy_ctc error message (logger ``deploy_ctc.onnx``) and return NaN of the
output's shape.  Attribute values are also checked earlier, by the registered schemas' shape inference
(onnx.checker) and by ``export`` / ``append_ctc_loss``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from deploy_ctc.onnx._deps import require_extensions, require_onnxruntime
from deploy_ctc.onnx.attributes import check_node_attributes
from deploy_ctc.onnx.schemas import ATTRIBUTE_DEFAULTS, DOMAIN

_logger = logging.getLogger("deploy_ctc.onnx")
_registered = False


class _ArrayOutput:
    """Wraps an output so onnxruntime-extensions' ``rv.flatten().tolist()`` is the C-contiguous ndarray itself."""

    __slots__ = ("shape", "_array")

    def __init__(self, array: np.ndarray):
        self._array = np.require(array, requirements="C")  # (ascontiguousarray would make 0-d 1-d)
        self.shape = self._array.shape

    def flatten(self) -> "_ArrayOutput":
        return self

    def tolist(self) -> np.ndarray:
        return self._array


def _loss(log_probs, targets, input_lengths, target_lengths, *, blank, reduction, zero_infinity):
    """CTCLoss: (T, N, C) log_probs -> () or (N,) loss in log_probs' dtype."""
    import deploy_ctc

    loss = deploy_ctc.ctc_loss(log_probs, targets, input_lengths, target_lengths,
                               blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    return np.asarray(loss, dtype=log_probs.dtype)


def _loss_nan_shape(log_probs, *_, reduction) -> tuple:
    return (log_probs.shape[1],) if reduction == "none" and log_probs.ndim == 3 else ()


def _grad(d_loss, log_probs, targets, input_lengths, target_lengths, *, blank, reduction, zero_infinity):
    """CTCLossGrad: d_loss-weighted d loss / d log_probs, (T, N, C) in log_probs' dtype."""
    import deploy_ctc

    _, grad = deploy_ctc.ctc_loss_and_grad(log_probs, targets, input_lengths, target_lengths,
                                           blank=blank, reduction=reduction, zero_infinity=zero_infinity,
                                           grad_output=d_loss)
    return np.asarray(grad, dtype=log_probs.dtype)


def _grad_nan_shape(d_loss, log_probs, *_, reduction) -> tuple:
    return log_probs.shape


def _kernel(op_type: str, compute, nan_shape, float_input: int):
    """An onnxruntime-extensions kernel around ``compute`` that never raises (see the module docstring)."""

    def kernel(*inputs, blank, reduction, zero_infinity):
        try:
            options = check_node_attributes(blank, reduction, zero_infinity)
            return _ArrayOutput(compute(*inputs, **dict(zip(ATTRIBUTE_DEFAULTS, options))))
        except Exception as exc:  # noqa: BLE001 -- any escape would abort the process
            _logger.error("%s::%s: %s: %s", DOMAIN, op_type, type(exc).__name__, exc)
            dtype = inputs[float_input].dtype
            return _ArrayOutput(np.full(nan_shape(*inputs, reduction=reduction), np.nan, dtype=dtype))

    return kernel


def _register_ops() -> None:
    """Declare every dtype combination of both ops to onnxruntime-extensions, once per process."""
    global _registered
    if _registered:
        return
    ext = require_extensions()
    dt = ext.PyCustomOpDef
    attrs = {"blank": dt.dt_int64, "reduction": dt.dt_string, "zero_infinity": dt.dt_int64}
    ints = (dt.dt_int32, dt.dt_int64)
    loss_kernel = _kernel("CTCLoss", _loss, _loss_nan_shape, float_input=0)
    grad_kernel = _kernel("CTCLossGrad", _grad, _grad_nan_shape, float_input=1)
    for float_type in (dt.dt_float, dt.dt_double):
        for index_types in [(a, b, c) for a in ints for b in ints for c in ints]:
            ext.onnx_op(op_type=f"{DOMAIN}::CTCLoss", inputs=[float_type, *index_types],
                        outputs=[float_type], attrs=attrs)(loss_kernel)
            ext.onnx_op(op_type=f"{DOMAIN}::CTCLossGrad", inputs=[float_type, float_type, *index_types],
                        outputs=[float_type], attrs=attrs)(grad_kernel)
    _registered = True


def custom_op_library_path() -> str:
    """Path of the custom-op library serving deploy_ctc's ops (register it on SessionOptions).

    Registers the Python kernels first: the library collects them when ORT loads it.
    """
    _register_ops()
    return require_extensions().get_library_path()


def session_options(so: Any = None) -> Any:
    """onnxruntime SessionOptions whose sessions run deploy_ctc::CTCLoss / CTCLossGrad with deploy_ctc.

    Args:
        so: existing ``onnxruntime.SessionOptions`` to extend in place; a new one when None.
    Returns:
        ``so`` with the custom-op library registered.
    Raises:
        ImportError: onnxruntime or onnxruntime-extensions missing (``pip install deploy_ctc[onnx]``).
    """
    ort = require_onnxruntime()
    if so is None:
        so = ort.SessionOptions()
    so.register_custom_ops_library(custom_op_library_path())
    return so
