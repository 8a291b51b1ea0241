"""torch.onnx.export for modules whose forward calls ``F.ctc_loss`` / ``nn.CTCLoss``.

torch cannot export ctc_loss by itself (onnxscript's translation raises NotImplementedError).  Around one
``torch.onnx.export`` call, and only then, :func:`export` teaches both exporters to emit one
``deploy_ctc::CTCLoss`` node per call:

- ``dynamo=False`` (TorchScript): a custom symbolic for ``aten::ctc_loss`` (both overloads).
- ``dynamo=True`` (torch.export, the default): a fake implementation of ``aten::_ctc_loss`` whose
  ``log_alpha`` has the static upper-bound shape (N, T, 2 S + 1) -- torch's own raises
  DynamicOutputShapeException -- plus a ``custom_translation_table`` entry for ``aten::ctc_loss``.

Both registrations are undone when the call returns (or raises): torch behaves as before afterwards.
The exported model then gets the portable function bodies (unless ``embed_functions=False``), the
``deploy_ctc`` / ``ai.onnx.ml`` opset imports, and is written to ``f``.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import TYPE_CHECKING, Any, BinaryIO

from deploy_ctc.onnx._deps import require_onnx, require_torch
from deploy_ctc.onnx.attributes import node_attributes
from deploy_ctc.onnx.functions import MIN_OPSET, attach_functions, ensure_opset_imports
from deploy_ctc.onnx.schemas import DOMAIN, OPSET_VERSION, register_schemas
from deploy_ctc.validation import REDUCTIONS

if TYPE_CHECKING:  # imported when first used
    import onnx
    import torch


def _attributes(blank, reduction, zero_infinity) -> dict:
    """Node attributes from aten::ctc_loss's scalar arguments (reduction as the enum or a string)."""
    if not isinstance(reduction, str):  # torch's at::Reduction enum, whose order REDUCTIONS follows
        code = int(reduction)
        reduction = REDUCTIONS[code] if 0 <= code < len(REDUCTIONS) else reduction
    return node_attributes(int(blank), reduction, bool(zero_infinity))


# ---- dynamo=False: TorchScript symbolic -------------------------------------------------------------

def _lengths_value(g, value):
    """A (N,) int64 graph value for lengths given as a tensor value or a constant int list."""
    from torch.onnx import symbolic_helper

    torch = require_torch()
    const = symbolic_helper._maybe_get_const(value, "is")
    if isinstance(const, (list, tuple)):
        return g.op("Constant", value_t=torch.tensor(list(const), dtype=torch.int64))
    return value


def _symbolic_attributes(blank, reduction, zero_infinity, reduction_kind="i") -> dict:
    """g.op keyword attributes from the graph constants of the three options (reduction: enum "i" or "s")."""
    from torch.onnx import symbolic_helper

    attrs = _attributes(symbolic_helper._maybe_get_const(blank, "i"),
                        symbolic_helper._maybe_get_const(reduction, reduction_kind),
                        symbolic_helper._maybe_get_const(zero_infinity, "b"))
    return {"blank_i": attrs["blank"], "reduction_s": attrs["reduction"], "zero_infinity_i": attrs["zero_infinity"]}


def _symbolic(g, log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity,
              reduction_kind="i"):
    attrs = _symbolic_attributes(blank, reduction, zero_infinity, reduction_kind)
    loss = g.op(f"{DOMAIN}::CTCLoss", log_probs, targets, _lengths_value(g, input_lengths),
                _lengths_value(g, target_lengths), **attrs)
    sizes = log_probs.type().varyingSizes() if log_probs.type().dim() is not None else None
    batch = [sizes[1]] if sizes is not None and len(sizes) == 3 else [None]
    loss.setType(log_probs.type().with_sizes(batch if attrs["reduction_s"] == "none" else []))
    return loss


def _deploy_ctc_symbolic(g, log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity,
                         with_grad):
    """deploy_ctc::ctc_loss (loss, grad) -> CTCLoss and, in a training graph, CTCLossGrad with d_loss = 1."""
    from torch.onnx import symbolic_helper

    torch = require_torch()
    loss = _symbolic(g, log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity, "s")
    if symbolic_helper._maybe_get_const(with_grad, "b"):
        ones = g.op("Expand", g.op("CastLike", g.op("Constant", value_t=torch.tensor(1.0)), log_probs),
                    g.op("Shape", loss))
        grad = g.op(f"{DOMAIN}::CTCLossGrad", ones, log_probs, targets, _lengths_value(g, input_lengths),
                    _lengths_value(g, target_lengths),
                    **_symbolic_attributes(blank, reduction, zero_infinity, "s"))
        grad.setType(log_probs.type())
    else:
        grad = g.op("CastLike", g.op("Constant", value_t=torch.zeros(0)), log_probs)
    return loss, grad


# (operator, symbolic) pairs registered around a TorchScript export.
_TORCHSCRIPT_SYMBOLICS = (("aten::ctc_loss", _symbolic), ("deploy_ctc::ctc_loss", _deploy_ctc_symbolic))


@contextlib.contextmanager
def _torchscript_symbolic(opset: int):
    """aten::ctc_loss and deploy_ctc::ctc_loss -> deploy_ctc::CTCLoss for the TorchScript exporter, for the
    duration of the block."""
    torch = require_torch()
    import deploy_ctc.torch  # noqa: F401 -- registers deploy_ctc::ctc_loss

    registered = []
    try:
        for name, symbolic in _TORCHSCRIPT_SYMBOLICS:
            torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
            registered.append(name)
        yield
    finally:
        for name in registered:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


# ---- dynamo=True: torch.export + onnxscript ---------------------------------------------------------

def _fake_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, zero_infinity=False):
    """Fake aten::_ctc_loss: nll (N,) and log_alpha at its static upper bound (N, T, 2 S + 1).

    S is targets' padded width, or its total length for concatenated 1-D targets (an upper bound).
    """
    batched = log_probs.dim() == 3
    n = log_probs.shape[1] if batched else 1
    s = targets.shape[-1] if targets.dim() > 0 else 1
    nll = log_probs.new_empty((n,) if batched else ())
    log_alpha = log_probs.new_empty((n, log_probs.shape[0], 2 * s + 1))
    return nll, log_alpha


@contextlib.contextmanager
def _fake_ctc_override():
    """Let torch.export trace aten::_ctc_loss with :func:`_fake_ctc_loss`; restored afterwards."""
    torch = require_torch()
    lib = torch.library.Library("aten", "FRAGMENT")
    try:
        for overload in ("aten::_ctc_loss", "aten::_ctc_loss.Tensor"):
            torch.library.register_fake(overload, _fake_ctc_loss, lib=lib, allow_override=True)
        yield
    finally:
        lib._destroy()  # drops exactly the registrations made through ``lib``


def _translation_table() -> dict:
    """custom_translation_table entries mapping both aten::ctc_loss overloads to deploy_ctc::CTCLoss."""
    torch = require_torch()
    import onnxscript

    import deploy_ctc.torch  # noqa: F401 -- registers deploy_ctc::ctc_loss

    custom = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)
    std = onnxscript.opset18

    def as_tensor(lengths):
        if isinstance(lengths, (list, tuple)):
            return std.Constant(value_ints=[int(v) for v in lengths])
        return lengths

    def ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=0, reduction=1, zero_infinity=False):
        attrs = _attributes(blank, reduction, zero_infinity)
        return custom.CTCLoss(log_probs, targets, as_tensor(input_lengths), as_tensor(target_lengths), **attrs)

    def deploy_ctc_loss(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity,
                        with_grad):
        # deploy_ctc::ctc_loss returns (loss, grad for a unit upstream gradient); grad is used only by a
        # training graph, and is then CTCLossGrad with d_loss = 1.
        attrs = _attributes(blank, reduction, zero_infinity)
        loss = custom.CTCLoss(log_probs, targets, input_lengths, target_lengths, **attrs)
        if with_grad:
            ones = std.Expand(std.CastLike(std.Constant(value_float=1.0), log_probs), std.Shape(loss))
            grad = custom.CTCLossGrad(ones, log_probs, targets, input_lengths, target_lengths, **attrs)
        else:
            grad = std.CastLike(std.Constant(value_floats=[0.0]), log_probs)
            grad = std.Slice(grad, std.Constant(value_ints=[0]), std.Constant(value_ints=[0]))  # (0,)
        return loss, grad

    return {torch.ops.aten.ctc_loss.IntList: ctc_loss, torch.ops.aten.ctc_loss.Tensor: ctc_loss,
            torch.ops.deploy_ctc.ctc_loss.default: deploy_ctc_loss}


# ---- the public wrapper -----------------------------------------------------------------------------

def export(model: torch.nn.Module, args: tuple, f: str | os.PathLike | BinaryIO | None = None, *, dynamo: bool = True,
           embed_functions: bool = True, **kwargs: Any) -> onnx.ModelProto:
    """``torch.onnx.export(model, args, ...)`` emitting deploy_ctc::CTCLoss for every CTC loss call.

    Args:
        model: torch.nn.Module whose forward calls ``torch.nn.functional.ctc_loss`` / ``nn.CTCLoss``
            (batched (T, N, C) log_probs).
        args: example inputs, as for torch.onnx.export.
        f: path or binary file object to write the model to; None writes nothing.
        dynamo: which torch exporter (True: torch.export-based, torch's default; False: TorchScript).
        embed_functions: attach the portable function bodies so plain onnxruntime runs the loss;
            False leaves it to the native library (:func:`deploy_ctc.onnx.session_options`).
        **kwargs: passed to torch.onnx.export (``input_names``, ``output_names``, ``dynamic_axes`` or
            ``dynamic_shapes``, ``opset_version`` -- default 18, the bodies' minimum, ...).
    Returns:
        The exported onnx.ModelProto.
    Raises:
        ValueError: ``opset_version`` < 18 while ``embed_functions``; bad ctc_loss options (the messages
            of deploy_ctc.ctc_loss).
    """
    torch = require_torch()
    onnx = require_onnx()
    register_schemas()  # onnxscript builds deploy_ctc::CTCLoss through the registered schema
    opset = kwargs.setdefault("opset_version", MIN_OPSET)
    if embed_functions and opset < MIN_OPSET:
        raise ValueError(f"opset_version must be >= {MIN_OPSET} to embed the portable CTC bodies, got {opset}; "
                         "or pass embed_functions=False")
    if dynamo:
        table = dict(kwargs.pop("custom_translation_table", None) or {})
        table.update(_translation_table())
        with _fake_ctc_override():
            program = torch.onnx.export(model, args, None, dynamo=True, custom_translation_table=table, **kwargs)
        proto = program.model_proto
    else:
        buffer = io.BytesIO()
        with _torchscript_symbolic(opset):
            torch.onnx.export(model, args, buffer, dynamo=False, **kwargs)
        proto = onnx.load_from_string(buffer.getvalue())
    ensure_opset_imports(proto)
    if embed_functions:
        attach_functions(proto)
    if f is not None:
        if isinstance(f, (str, os.PathLike)):
            onnx.save(proto, os.fspath(f))
        else:
            f.write(proto.SerializeToString())
    return proto
