"""Add a deploy_ctc::CTCLoss or CTCAlign node to an ONNX model that already produces log-probabilities."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deploy_ctc.onnx._deps import require_onnx
from deploy_ctc.onnx.attributes import node_attributes
from deploy_ctc.onnx.functions import attach_functions, ensure_opset_imports
from deploy_ctc.onnx.schemas import DOMAIN

if TYPE_CHECKING:  # onnx is imported when first used
    import onnx

# The log-probability element types the op takes: TensorProto data type name -> NumPy dtype name.
_FLOAT_TYPES = {"FLOAT": "float32", "DOUBLE": "float64"}


def _float_types(onnx) -> dict:
    """``{TensorProto data type number: NumPy dtype name}`` of :data:`_FLOAT_TYPES`."""
    return {onnx.TensorProto.DataType.Value(name): dtype for name, dtype in _FLOAT_TYPES.items()}


def _value_type(model, name: str):
    """TypeProto of value ``name`` (graph input/output/value_info, else by shape inference), or None."""
    onnx = require_onnx()
    graph = model.graph
    for info in list(graph.input) + list(graph.output) + list(graph.value_info):
        if info.name == name:
            return info.type
    inferred = onnx.shape_inference.infer_shapes(model).graph
    for info in list(inferred.value_info) + list(inferred.output):
        if info.name == name:
            return info.type
    return None


def _dim(type_proto, axis: int, fallback: str):
    """Dim ``axis`` of a tensor type as make_tensor_value_info accepts it (int, name or None)."""
    dims = type_proto.tensor_type.shape.dim if type_proto.tensor_type.HasField("shape") else []
    if axis < len(dims):
        d = dims[axis]
        return d.dim_value if d.HasField("dim_value") else (d.dim_param or fallback)
    return fallback


def append_ctc_loss(model: onnx.ModelProto, log_probs_name: str, *, targets_name: str = "targets",
                    input_lengths_name: str = "input_lengths", target_lengths_name: str = "target_lengths",
                    loss_name: str = "loss", blank: int = 0, reduction: str = "mean",
                    zero_infinity: bool = False, embed_functions: bool = True,
                    keep_outputs: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` that also computes the CTC loss of its value ``log_probs_name``.

    Adds graph inputs ``targets`` (N, S) int64, ``input_lengths`` (N,) int64, ``target_lengths`` (N,) int64,
    one ``deploy_ctc::CTCLoss`` node with every attribute explicit, and the output ``loss`` (() or (N,) for
    reduction "none", in log_probs' float type).  ``log_probs_name`` must be a (T, N, C) float/double value
    of log-probabilities (append a LogSoftmax first if the model emits logits).

    Args:
        model: onnx.ModelProto (not modified).
        log_probs_name: name of the (T, N, C) value in ``model.graph``.
        blank, reduction, zero_infinity: as torch.nn.CTCLoss.
        embed_functions: attach the portable function body (plain onnxruntime runs it); False leaves the
            op to the native library (:func:`deploy_ctc.onnx.session_options`).
        keep_outputs: keep the model's outputs next to ``loss`` (False: ``loss`` only).
    Returns:
        The new onnx.ModelProto.
    Raises:
        ValueError: unknown ``log_probs_name``, a non-float or non-3-D log_probs, a name already in use,
            bad option values (messages of deploy_ctc.ctc_loss), or an ONNX opset < 18 with embed_functions.
    """
    onnx = require_onnx()
    attrs = node_attributes(blank, reduction, zero_infinity)
    out, elem_type, batch = _copy_with_inputs(model, log_probs_name, targets_name, input_lengths_name,
                                              target_lengths_name, {"loss_name": loss_name})
    graph = out.graph
    graph.node.append(onnx.helper.make_node(
        "CTCLoss", [log_probs_name, targets_name, input_lengths_name, target_lengths_name], [loss_name],
        domain=DOMAIN, name=f"{DOMAIN}.CTCLoss", **attrs))
    if not keep_outputs:
        del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(
        loss_name, elem_type, [batch] if attrs["reduction"] == "none" else []))
    ensure_opset_imports(out)
    if embed_functions:
        attach_functions(out)
    return out


def append_forced_align(model: onnx.ModelProto, log_probs_name: str, *, targets_name: str = "targets",
                        input_lengths_name: str = "input_lengths", target_lengths_name: str = "target_lengths",
                        alignment_name: str = "alignment", scores_name: str = "scores", blank: int = 0,
                        embed_functions: bool = True, keep_outputs: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the forced alignment (:func:`deploy_ctc.forced_align`) of its value
    ``log_probs_name`` to the targets given at run time.

    Adds graph inputs ``targets`` (N, S) int64, ``input_lengths`` (N,) int64, ``target_lengths`` (N,) int64, one
    ``deploy_ctc::CTCAlign`` node and the outputs ``alignment`` (T, N) int64 and ``scores`` (T, N) in log_probs'
    float type. ``log_probs_name`` must be a (T, N, C) float/double value of log-probabilities.

    Args:
        model: onnx.ModelProto (not modified).
        log_probs_name: name of the (T, N, C) value in ``model.graph``.
        blank: index of the blank class.
        embed_functions: attach the portable function body (plain onnxruntime runs it).
        keep_outputs: keep the model's outputs next to the alignment (False: ``alignment`` and ``scores`` only).
    Returns:
        The new onnx.ModelProto.
    Raises:
        ValueError: as :func:`append_ctc_loss`.
    """
    onnx = require_onnx()
    blank = node_attributes(blank)["blank"]
    out, elem_type, batch = _copy_with_inputs(model, log_probs_name, targets_name, input_lengths_name,
                                              target_lengths_name,
                                              {"alignment_name": alignment_name, "scores_name": scores_name})
    graph = out.graph
    graph.node.append(onnx.helper.make_node(
        "CTCAlign", [log_probs_name, targets_name, input_lengths_name, target_lengths_name],
        [alignment_name, scores_name], domain=DOMAIN, name=f"{DOMAIN}.CTCAlign", blank=blank))
    if not keep_outputs:
        del graph.output[:]
    frames = _dim(_value_type(model, log_probs_name), 0, "T")
    graph.output.extend([onnx.helper.make_tensor_value_info(alignment_name, onnx.TensorProto.INT64, [frames, batch]),
                         onnx.helper.make_tensor_value_info(scores_name, elem_type, [frames, batch])])
    ensure_opset_imports(out)
    if embed_functions:
        attach_functions(out)
    return out


def _copy_with_inputs(model, log_probs_name, targets_name, input_lengths_name, target_lengths_name, outputs):
    """``(copy, elem_type, batch)``: a copy of ``model`` with the targets and lengths inputs added, after checking
    that ``log_probs_name`` is a (T, N, C) float value and that no new name (inputs and ``outputs``, a dict of
    argument name -> value name) is taken."""
    onnx = require_onnx()
    lp_type = _value_type(model, log_probs_name)
    if lp_type is None:
        raise ValueError(f"log_probs_name {log_probs_name!r} is not a value of the model's graph")
    elem_type = lp_type.tensor_type.elem_type
    if elem_type not in _float_types(onnx):
        raise ValueError(f"log_probs_name {log_probs_name!r} must be float32 or float64, got element type "
                         f"{onnx.helper.tensor_dtype_to_np_dtype(elem_type) if elem_type else 'unknown'}")
    rank = len(lp_type.tensor_type.shape.dim) if lp_type.tensor_type.HasField("shape") else 3
    if rank != 3:
        raise ValueError(f"log_probs_name {log_probs_name!r} must be (T, N, C), got rank {rank}")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = ({i.name for i in graph.input} | {o for n in graph.node for o in n.output}
             | {i.name for i in graph.initializer})
    for arg, name in (("targets_name", targets_name), ("input_lengths_name", input_lengths_name),
                      ("target_lengths_name", target_lengths_name), *outputs.items()):
        if name in taken:
            raise ValueError(f"{arg} {name!r} is already a value of the model's graph")

    batch = _dim(lp_type, 1, "N")
    int64 = onnx.TensorProto.INT64
    graph.input.extend([
        onnx.helper.make_tensor_value_info(targets_name, int64, [batch, "S"]),
        onnx.helper.make_tensor_value_info(input_lengths_name, int64, [batch]),
        onnx.helper.make_tensor_value_info(target_lengths_name, int64, [batch]),
    ])
    return out, elem_type, batch


def ctc_loss_model(dtype: str = "float32", *, blank: int = 0, reduction: str = "mean",
                   zero_infinity: bool = False, embed_functions: bool = True, opset: int = 18) -> onnx.ModelProto:
    """A model computing only the loss: inputs log_probs (T, N, C), targets, input_lengths, target_lengths.

    Handy to evaluate losses in onnxruntime (benchmarks, services); arguments as :func:`append_ctc_loss`.
    """
    onnx = require_onnx()
    types = {v: k for k, v in _float_types(onnx).items()}
    if dtype not in types:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    graph = onnx.helper.make_graph([], "ctc_loss", [onnx.helper.make_tensor_value_info(
        "log_probs", types[dtype], ["T", "N", "C"])], [])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return append_ctc_loss(model, "log_probs", blank=blank, reduction=reduction, zero_infinity=zero_infinity,
                           embed_functions=embed_functions)


def forced_align_model(dtype: str = "float32", *, blank: int = 0, embed_functions: bool = True,
                       opset: int = 18) -> onnx.ModelProto:
    """A model computing only the forced alignment: inputs log_probs (T, N, C), targets, input_lengths,
    target_lengths; outputs alignment and scores. Arguments as :func:`append_forced_align`."""
    onnx = require_onnx()
    types = {v: k for k, v in _float_types(onnx).items()}
    if dtype not in types:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    graph = onnx.helper.make_graph([], "ctc_align", [onnx.helper.make_tensor_value_info(
        "log_probs", types[dtype], ["T", "N", "C"])], [])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    return append_forced_align(model, "log_probs", blank=blank, embed_functions=embed_functions)
