"""ONNX operator schemas for ``deploy_ctc::CTCLoss``, ``CTCLossGrad`` and ``CTCAlign`` (opset 1).

``CTCLoss(log_probs, targets, input_lengths, target_lengths) -> loss``
    log_probs       (T, N, C) float/double, log-probabilities (e.g. from LogSoftmax over C)
    targets         (N, S) padded or (sum(target_lengths),) concatenated, int32/int64
    input_lengths   (N,) int32/int64, each <= T
    target_lengths  (N,) int32/int64
    loss            () for reduction "mean"/"sum", (N,) for "none"; dtype of log_probs
    (unbatched as torch: log_probs (T, C), targets (S,), 0-d lengths, loss ())

``CTCLossGrad(d_loss, log_probs, targets, input_lengths, target_lengths) -> d_log_probs``
    d_loss          upstream gradient of ``loss`` (same shape as ``loss``)
    d_log_probs     (T, N, C): d_loss-weighted ``exp(log_probs) - posterior`` (torch's convention,
                    the gradient through an upstream log_softmax); 0 for frames t >= input_lengths[n]

Attributes (both ops): ``blank`` (int, 0), ``reduction`` (string, "mean"), ``zero_infinity`` (int, 0),
with exactly torch.nn.CTCLoss's meaning.

``CTCAlign(log_probs, targets, input_lengths, target_lengths) -> alignment, scores``
    the inputs of CTCLoss (same layouts); attribute ``blank`` (int, 0) only
    alignment       (T, N) int64 (unbatched (T,)): the label of the best path at each frame, blank for
                    t >= input_lengths[n] and for infeasible samples
    scores          (T, N), dtype of log_probs: log_probs at the chosen labels; 0 for t >= input_lengths[n],
                    -inf for infeasible samples (ties and conventions: deploy_ctc.align)

The schemas live in the ONNX Python registry of this process only: ``register_schemas()`` lets
``onnx.checker.check_model(full_check=True)`` and ``onnx.shape_inference`` validate models using the ops.
ONNX Runtime never sees them; it runs either the node's model-local function body or the native library's kernel.
"""

from __future__ import annotations

from deploy_ctc.onnx._deps import require_onnx

DOMAIN = "deploy_ctc"
OPSET_VERSION = 1

# Attribute name -> default, in torch.nn.CTCLoss's order.
ATTRIBUTE_DEFAULTS = {"blank": 0, "reduction": "mean", "zero_infinity": 0}
# CTCAlign's attributes.
ALIGN_ATTRIBUTE_DEFAULTS = {"blank": 0}

_FLOAT_TYPES = ["tensor(float)", "tensor(double)"]
_INT_TYPES = ["tensor(int32)", "tensor(int64)"]


def _attribute_values(ctx) -> tuple[int, str, bool]:
    """The node's ``(blank, reduction, zero_infinity)`` with schema defaults filled in, checked like the Python API."""
    from deploy_ctc.onnx.attributes import check_node_attributes

    onnx = require_onnx()
    values = {}
    for name, default in ATTRIBUTE_DEFAULTS.items():
        proto = ctx.get_attribute(name)
        values[name] = default if proto is None else onnx.helper.get_attribute_value(proto)
    if isinstance(values["reduction"], bytes):
        values["reduction"] = values["reduction"].decode()
    return check_node_attributes(**values)


def _infer_ctc_loss(ctx) -> None:
    """loss: dtype of log_probs; () for mean/sum or unbatched (T, C), (N,) for none with N = log_probs.shape[1]."""
    onnx = require_onnx()
    _, reduction, _ = _attribute_values(ctx)
    lp_type = ctx.get_input_type(0)
    elem_type = lp_type.tensor_type.elem_type
    rank = len(lp_type.tensor_type.shape.dim) if lp_type.tensor_type.HasField("shape") else None
    if reduction != "none" or rank == 2:
        out = onnx.helper.make_tensor_type_proto(elem_type, [])
    elif rank == 3:
        out = onnx.helper.make_tensor_type_proto(elem_type, [None])
        out.tensor_type.shape.dim[0].CopyFrom(lp_type.tensor_type.shape.dim[1])
    else:
        out = onnx.helper.make_tensor_type_proto(elem_type, [None])
    ctx.set_output_type(0, out)


def _infer_ctc_loss_grad(ctx) -> None:
    """d_log_probs: the type and shape of log_probs."""
    _attribute_values(ctx)
    ctx.set_output_type(0, ctx.get_input_type(1))


def _infer_ctc_align(ctx) -> None:
    """alignment int64 and scores in log_probs' type, both of log_probs' shape without its last axis."""
    onnx = require_onnx()
    from deploy_ctc.validation import check_options

    blank = ctx.get_attribute("blank")
    check_options(0 if blank is None else onnx.helper.get_attribute_value(blank), "mean", False)
    lp_type = ctx.get_input_type(0)
    elem_type = lp_type.tensor_type.elem_type
    if lp_type.tensor_type.HasField("shape"):
        dims = list(lp_type.tensor_type.shape.dim)[:-1]
        for index, elem in enumerate((onnx.TensorProto.INT64, elem_type)):
            out = onnx.helper.make_tensor_type_proto(elem, [None] * len(dims))
            for axis, dim in enumerate(dims):
                out.tensor_type.shape.dim[axis].CopyFrom(dim)
            ctx.set_output_type(index, out)
    else:
        ctx.set_output_type(0, onnx.helper.make_tensor_type_proto(onnx.TensorProto.INT64, None))
        ctx.set_output_type(1, onnx.helper.make_tensor_type_proto(elem_type, None))


def _attributes(onnx) -> list:
    docs = {
        "blank": "index of the blank class in [0, C)",
        "reduction": "'none' | 'mean' | 'sum', as torch.nn.CTCLoss",
        "zero_infinity": "1: infinite losses (infeasible alignments) and their gradients become 0",
    }
    return [
        onnx.defs.OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), docs[name])
        for name, default in ATTRIBUTE_DEFAULTS.items()
    ]


def _ctc_inputs(onnx) -> list:
    param = onnx.defs.OpSchema.FormalParameter
    return [
        param("log_probs", "T", "(T, N, C) log-probabilities"),
        param("targets", "I", "(N, S) padded or (sum(target_lengths),) concatenated class indices"),
        param("input_lengths", "I2", "(N,) frames used per sample"),
        param("target_lengths", "I3", "(N,) target length per sample"),
    ]


def _type_constraints() -> list:
    return [
        ("T", _FLOAT_TYPES, "log-probabilities and loss"),
        ("I", _INT_TYPES, "targets"),
        ("I2", _INT_TYPES, "input lengths"),
        ("I3", _INT_TYPES, "target lengths"),
    ]


def make_schemas() -> tuple:
    """Build (not register) the CTCLoss, CTCLossGrad and CTCAlign OpSchemas."""
    onnx = require_onnx()
    param = onnx.defs.OpSchema.FormalParameter
    loss = onnx.defs.OpSchema(
        "CTCLoss", DOMAIN, OPSET_VERSION,
        "CTC loss with torch.nn.CTCLoss's exact behaviour (Graves et al., ICML 2006).",
        inputs=_ctc_inputs(onnx),
        outputs=[param("loss", "T", "() for mean/sum, (N,) for none")],
        type_constraints=_type_constraints(),
        attributes=_attributes(onnx),
    )
    loss.set_type_and_shape_inference_function(_infer_ctc_loss)
    grad = onnx.defs.OpSchema(
        "CTCLossGrad", DOMAIN, OPSET_VERSION,
        "Gradient of CTCLoss w.r.t. log_probs, weighted by d_loss (torch's exp(lp) - posterior convention).",
        inputs=[param("d_loss", "T", "upstream gradient, shape of CTCLoss's loss")] + _ctc_inputs(onnx),
        outputs=[param("d_log_probs", "T", "(T, N, C)")],
        type_constraints=_type_constraints(),
        attributes=_attributes(onnx),
    )
    grad.set_type_and_shape_inference_function(_infer_ctc_loss_grad)
    align = onnx.defs.OpSchema(
        "CTCAlign", DOMAIN, OPSET_VERSION,
        "CTC forced alignment: the best path of each target (Viterbi) and the log-probability of each frame's label.",
        inputs=_ctc_inputs(onnx),
        outputs=[param("alignment", "A", "(T, N) int64 labels of the best path"),
                 param("scores", "T", "(T, N) log-probabilities of those labels")],
        type_constraints=_type_constraints() + [("A", ["tensor(int64)"], "alignment")],
        attributes=[onnx.defs.OpSchema.Attribute("blank", onnx.helper.make_attribute("blank", 0),
                                                 "index of the blank class in [0, C)")],
    )
    align.set_type_and_shape_inference_function(_infer_ctc_align)
    return loss, grad, align


def register_schemas() -> None:
    """Register both schemas with onnx.defs, once per process (later calls do nothing).

    Raises:
        ImportError: onnx is not installed (``pip install deploy_ctc[onnx]``).
    """
    onnx = require_onnx()
    for schema in make_schemas():
        if not onnx.defs.has(schema.name, OPSET_VERSION, DOMAIN):
            onnx.defs.register_schema(schema)
