"""The onnxruntime-extensions fast path against torch float64, and its failure modes."""

import logging

import numpy as np
import pytest

pytest.importorskip("onnxruntime_extensions")
pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import deploy_ctc  # noqa: E402
import deploy_ctc.onnx as dco  # noqa: E402
from deploy_ctc.onnx.append import ctc_loss_model  # noqa: E402
from tests.onnx.helpers import grad_model, make_problem, session  # noqa: E402
from tests.utils.oracles import assert_close, non_finite_batch, torch_reference  # noqa: E402


@pytest.mark.parametrize("int_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_grad_match_torch(rng, dtype, int_dtype, reduction):
    problem = make_problem(rng, T=30, N=4, C=6, S=5, dtype=dtype, blank=2)
    attrs = dict(blank=2, reduction=reduction, zero_infinity=True)
    loss_model = ctc_loss_model(np.dtype(dtype).name, embed_functions=False, **attrs)
    g_model = grad_model(np.dtype(dtype).name, **attrs)
    for model in (loss_model, g_model):  # every int input declared int32 / int64
        for value in model.graph.input:
            if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
                value.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(int_dtype))
    feeds = problem.feeds(int_dtype)
    loss = session(loss_model, extension=True).run(None, feeds)[0]
    d_loss = rng.uniform(0.5, 2.0, loss.shape).astype(dtype)
    grad = session(g_model, extension=True).run(None, {"d_loss": d_loss, **feeds})[0]
    want_loss, want_grad = torch_reference(*problem.args(), grad_output=d_loss, **attrs)
    assert loss.dtype == dtype and loss.shape == np.shape(want_loss)
    assert_close(loss, want_loss, dtype, "loss")
    assert_close(grad, want_grad, dtype, "grad")


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_non_finite_losses_follow_torch(rng, reduction, zero_infinity):
    """torch's rules for inf and NaN losses (tests/utils/oracles.py::non_finite_batch) through the kernels."""
    lp, targets, il, tl = non_finite_batch(rng, with_nan=True, unused_class_nan=True)
    attrs = dict(reduction=reduction, zero_infinity=zero_infinity)
    feeds = {"log_probs": lp, "targets": targets, "input_lengths": il, "target_lengths": tl}
    loss = session(ctc_loss_model("float64", embed_functions=False, **attrs), extension=True).run(None, feeds)[0]
    d_loss = rng.uniform(0.5, 2.0, loss.shape)
    grad = session(grad_model("float64", **attrs), extension=True).run(None, {"d_loss": d_loss, **feeds})[0]
    want_loss, want_grad = torch_reference(lp, targets, il, tl, grad_output=d_loss, **attrs)
    assert_close(loss, want_loss, np.float64, "loss")
    assert_close(grad, want_grad, np.float64, "grad")


def test_extension_kernel_is_used_over_the_body(rng, monkeypatch):
    """With the extension registered, ORT runs deploy_ctc even when the node carries its body."""
    calls = []
    real = deploy_ctc.ctc_loss
    monkeypatch.setattr(deploy_ctc, "ctc_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    problem = make_problem(rng, T=10, N=2, C=4, S=3)
    session(ctc_loss_model(), extension=True).run(None, problem.feeds())
    assert calls == [1]


def test_large_output_returns_exactly(rng):
    """The gradient goes back as an ndarray (not .tolist()): bit-identical to the direct call."""
    problem = make_problem(rng, T=200, N=8, C=40, S=20)
    feeds = problem.feeds()
    d_loss = np.array(1.5, np.float32)
    grad = session(grad_model(), extension=True).run(None, {"d_loss": d_loss, **feeds})[0]
    _, want = deploy_ctc.ctc_loss_and_grad(*problem.args(), grad_output=d_loss)
    np.testing.assert_array_equal(grad, want)


def _with_attribute(model, name, value):
    for a in model.graph.node[0].attribute:
        if a.name == name:
            a.CopyFrom(onnx.helper.make_attribute(name, value))
    return model


@pytest.mark.parametrize("name, value, message", [
    ("reduction", "average", "reduction must be one of 'none', 'mean', 'sum', got 'average'"),
    ("zero_infinity", 5, "zero_infinity must be a bool (or 0/1), got 5"),
])
def test_bad_attribute_logs_api_message_and_returns_nan(rng, caplog, name, value, message):
    """A Python exception would abort the process inside onnxruntime-extensions: NaN + the API's message."""
    problem = make_problem(rng, T=10, N=2, C=4, S=3)
    model = _with_attribute(ctc_loss_model(embed_functions=False), name, value)
    with caplog.at_level(logging.ERROR, logger="deploy_ctc.onnx"):
        loss = session(model, extension=True).run(None, problem.feeds())[0]
    assert loss.shape == () and np.isnan(loss)
    assert message in caplog.text and "deploy_ctc::CTCLoss" in caplog.text


def test_bad_inputs_log_validation_message(rng, caplog):
    problem = make_problem(rng, T=10, N=2, C=4, S=3, target_lengths=[3, 3])
    problem.targets[1, 2] = 9  # outside [0, C)
    with caplog.at_level(logging.ERROR, logger="deploy_ctc.onnx"):
        out = session(grad_model(), extension=True).run(
            None, {"d_loss": np.array(1, np.float32), **problem.feeds()})[0]
    assert out.shape == problem.log_probs.shape and np.isnan(out).all()
    with pytest.raises(ValueError) as direct:
        deploy_ctc.ctc_loss(*problem.args())
    assert str(direct.value) in caplog.text


def test_missing_attribute_fails_at_session_creation():
    model = ctc_loss_model(embed_functions=False)
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "reduction"]
    del node.attribute[:]
    node.attribute.extend(kept)
    with pytest.raises(Exception, match="reduction"):
        session(model, extension=True)


def test_library_path_and_options_reuse():
    import onnxruntime as ort

    so = ort.SessionOptions()
    assert dco.session_options(so) is so
    assert dco.custom_op_library_path().endswith((".so", ".pyd", ".dylib"))


WRAPPING_LENGTHS_SCRIPT = """
import logging, sys
import numpy as np
import deploy_ctc.onnx  # noqa: F401
from deploy_ctc.onnx.append import ctc_loss_model
from tests.onnx.helpers import session
logging.basicConfig(stream=sys.stdout, level=logging.ERROR)
model = ctc_loss_model(embed_functions=False)
model.graph.input[1].type.tensor_type.ClearField("shape")  # concatenated targets
feeds = {"log_probs": np.log(np.full((8, 3, 5), 0.2, np.float32)), "targets": np.array([1, 2, 3, 4]),
         "input_lengths": np.array([8, 8, 8]), "target_lengths": np.array([2**63 - 1, 2**63 - 1, 6])}
print("loss", session(model, extension=True).run(None, feeds)[0])
"""


def test_wrapping_target_lengths_are_refused_without_crashing_the_session():
    """target_lengths whose int64 sum wraps to the targets' length: the server process must survive (the kernel
    logs the validation error and returns NaN). In a subprocess, so that a crash fails the test."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", WRAPPING_LENGTHS_SCRIPT], capture_output=True, text=True,
                            timeout=300, cwd=root, env=env)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    assert "target_lengths[0] = 9223372036854775807" in result.stdout and "loss nan" in result.stdout, result.stdout
