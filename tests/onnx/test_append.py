"""append_ctc_loss on an existing ONNX model (logits -> LogSoftmax), run in plain onnxruntime."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import helper  # noqa: E402

import deploy_ctc.onnx as dco  # noqa: E402
from tests.onnx.helpers import PORTABLE, session  # noqa: E402
from tests.utils.oracles import assert_close, log_softmax, random_targets, torch_reference  # noqa: E402


def _acoustic_model(opset=18):
    """features (T, N, 4) -> MatMul (4 x 5) -> LogSoftmax -> log_probs (T, N, 5)."""
    weight = np.linspace(-1, 1, 20, dtype=np.float32).reshape(4, 5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["logits"]),
         helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1)],
        "acoustic", [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["T", "N", 4])],
        [helper.make_tensor_value_info("log_probs", onnx.TensorProto.FLOAT, ["T", "N", 5])],
        initializer=[onnx.numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), weight


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_append_and_run(rng, reduction):
    model, weight = _acoustic_model()
    before = model.SerializeToString()
    full = dco.append_ctc_loss(model, "log_probs", reduction=reduction, blank=4)
    assert model.SerializeToString() == before  # input untouched
    dco.register_schemas()
    onnx.checker.check_model(full, full_check=True)
    assert [o.name for o in full.graph.output] == ["log_probs", "loss"]
    features = rng.standard_normal((9, 3, 4)).astype(np.float32)
    tl = np.array([3, 0, 2])
    feeds = {"features": features, "targets": random_targets(rng, tl, 5, blank=4, S=3),
             "input_lengths": np.array([9, 8, 5]), "target_lengths": tl}
    log_probs, loss = session(full).run(None, feeds)
    want, _ = torch_reference(log_softmax(features.astype(np.float64) @ weight), feeds["targets"],
                              feeds["input_lengths"], tl, blank=4, reduction=reduction)
    assert_close(loss, want, np.float32, "loss", PORTABLE[np.dtype(np.float32)])


def test_without_bodies_needs_the_native_library():
    model, _ = _acoustic_model()
    full = dco.append_ctc_loss(model, "log_probs", embed_functions=False, keep_outputs=False)
    assert len(full.functions) == 0 and [o.name for o in full.graph.output] == ["loss"]
    with pytest.raises(Exception, match="CTCLoss"):
        session(full)


@pytest.mark.parametrize("kwargs, message", [
    (dict(log_probs_name="nope"), "log_probs_name 'nope' is not a value"),
    (dict(log_probs_name="log_probs", targets_name="features"), "targets_name 'features' is already"),
    (dict(log_probs_name="log_probs", reduction="avg"), "reduction must be one of"),
    (dict(log_probs_name="log_probs", blank=-1.5), "blank must be an integer"),
])
def test_bad_arguments(kwargs, message):
    model, _ = _acoustic_model()
    with pytest.raises((ValueError, TypeError), match=message):
        dco.append_ctc_loss(model, **kwargs)


def test_old_opset_is_refused_with_bodies():
    model, _ = _acoustic_model(opset=13)
    with pytest.raises(ValueError, match="opset >= 18"):
        dco.append_ctc_loss(model, "log_probs")
    assert dco.append_ctc_loss(model, "log_probs", embed_functions=False).graph.node[-1].op_type == "CTCLoss"
