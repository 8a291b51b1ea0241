"""OpSchemas: idempotent registration, checker, shape inference, attribute validation."""

import pytest

onnx = pytest.importorskip("onnx")

import deploy_ctc.onnx as dco  # noqa: E402
from deploy_ctc.onnx.append import ctc_loss_model  # noqa: E402
from tests.onnx.helpers import grad_model  # noqa: E402


@pytest.fixture(autouse=True)
def _schemas():
    dco.register_schemas()


def test_registration_is_idempotent():
    dco.register_schemas()
    for name in ("CTCLoss", "CTCLossGrad"):
        schema = onnx.defs.get_schema(name, 1, "deploy_ctc")
        assert sorted(schema.attributes) == ["blank", "reduction", "zero_infinity"]
        assert schema is not None and schema.domain == dco.schemas.DOMAIN


@pytest.mark.parametrize("reduction, shape", [("mean", []), ("sum", []), ("none", ["N"])])
def test_checker_and_shape_inference(reduction, shape):
    model = ctc_loss_model("float64", reduction=reduction)
    onnx.checker.check_model(model, full_check=True)
    node = model.graph.node[0]
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_value_info("loss", onnx.TypeProto()))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True).graph.output[0]
    assert inferred.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    dims = [d.dim_param or d.dim_value for d in inferred.type.tensor_type.shape.dim]
    assert dims == shape, node


def test_grad_shape_inference():
    model = grad_model("float32")
    onnx.checker.check_model(model, full_check=True)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_value_info("d_log_probs", onnx.TypeProto()))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0]
    assert [d.dim_param for d in inferred.type.tensor_type.shape.dim] == ["T", "N", "C"]


@pytest.mark.parametrize("attribute, value, error, message", [
    ("reduction", "average", ValueError, "reduction must be one of"),
    ("zero_infinity", 2, ValueError, "zero_infinity"),
])
def test_checker_reports_bad_attributes_with_api_messages(attribute, value, error, message):
    model = ctc_loss_model()
    node = model.graph.node[0]
    for a in node.attribute:
        if a.name == attribute:
            a.CopyFrom(onnx.helper.make_attribute(attribute, value))
    with pytest.raises(error, match=message):
        onnx.checker.check_model(model, full_check=True)


def test_checker_rejects_integer_log_probs():
    model = ctc_loss_model()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError), match="tensor.int32"):
        onnx.checker.check_model(model, full_check=True)


def test_unbatched_none_loss_is_a_scalar():
    model = ctc_loss_model(reduction="none")
    model.graph.input[0].type.tensor_type.shape.ClearField("dim")
    for name in ("T", "C"):
        model.graph.input[0].type.tensor_type.shape.dim.add().dim_param = name
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_value_info("loss", onnx.TypeProto()))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0]
    assert inferred.type.tensor_type.HasField("shape") and len(inferred.type.tensor_type.shape.dim) == 0


def test_missing_onnx_names_the_extra(monkeypatch):
    import sys

    from deploy_ctc.onnx import _deps

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install deploy_ctc\[onnx\]"):
        _deps.require_onnxruntime()
