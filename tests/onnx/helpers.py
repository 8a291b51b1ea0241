"""Shared pieces of the ONNX tests: random CTC problems, sessions on loss-only models, tolerances."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tests.utils.oracles import Tolerance, concatenate_targets, random_log_probs, random_targets

#: The portable body computes in the input's float type: float32 log-space recursions over T <= 60 frames
#: lose ~T*6e-8 relative (here < 1e-6); gradient entries lie in [-|d_loss|, |d_loss|] with |d_loss| < 4.
PORTABLE = {
    np.dtype(np.float32): Tolerance(1e-5, 1e-5, "float32 Loop in log space, T <= 60 (the issue's 1e-5 bar)"),
    np.dtype(np.float64): Tolerance(1e-10, 1e-10, "float64 Loop in log space"),
}


@dataclass
class Problem:
    log_probs: np.ndarray  # (T, N, C)
    targets: np.ndarray  # (N, S) or concatenated
    input_lengths: np.ndarray  # (N,)
    target_lengths: np.ndarray  # (N,)
    blank: int = 0

    def feeds(self, int_dtype=np.int64) -> dict:
        return {"log_probs": self.log_probs, "targets": np.asarray(self.targets, dtype=int_dtype),
                "input_lengths": np.asarray(self.input_lengths, dtype=int_dtype),
                "target_lengths": np.asarray(self.target_lengths, dtype=int_dtype)}

    def args(self, layout: str = "padded"):
        """``(log_probs, targets, input_lengths, target_lengths)`` with targets "padded" (N, S), "concatenated"
        (sum of the target lengths,), or "unbatched": sample 0 alone, log_probs (T, C) and targets (S,)."""
        lp, targets, il, tl = self.log_probs, self.targets, self.input_lengths, self.target_lengths
        if layout == "concatenated":
            targets = concatenate_targets(targets, tl)
        elif layout == "unbatched":
            lp, targets, il, tl = lp[:, 0], targets[0, :tl[0]], il[0], tl[0]
        return lp, targets, il, tl


def make_problem(rng, T, N, C, S, dtype=np.float32, blank=0, input_lengths=None, target_lengths=None,
                 repeat_prob=0.3) -> Problem:
    """Random problem; lengths drawn so most samples are feasible unless given."""
    tl = rng.integers(0, S + 1, N) if target_lengths is None else np.asarray(target_lengths)
    il = rng.integers(np.minimum(2 * tl + 1, T), T + 1) if input_lengths is None else np.asarray(input_lengths)
    return Problem(random_log_probs(rng, T, N, C, dtype), random_targets(rng, tl, C, blank, S, repeat_prob),
                   il.astype(np.int64), tl.astype(np.int64), blank)


def native_library_or_skip() -> str:
    """Path of deploy_ctc's native ONNX Runtime library; skips the test (naming why) where it cannot be built."""
    import pytest

    from deploy_ctc.onnx.native_library import NativeUnavailable, library_path

    try:
        return library_path()
    except NativeUnavailable as error:
        pytest.skip(f"the native ONNX Runtime library is unavailable here: {error}")


def session(model, native: bool = False, **options):
    """onnxruntime CPU session on ``model``: plain, or with deploy_ctc's native library registered."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    for name, value in options.items():
        setattr(so, name, value)
    if native:
        so.register_custom_ops_library(native_library_or_skip())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def grad_model(dtype: str = "float32", **attrs):
    """A model with one CTCLossGrad node: inputs d_loss, log_probs, targets, input_lengths, target_lengths."""
    import onnx
    from onnx import helper

    from deploy_ctc.onnx.attributes import node_attributes
    from deploy_ctc.onnx.functions import attach_functions

    elem = {"float32": onnx.TensorProto.FLOAT, "float64": onnx.TensorProto.DOUBLE}[dtype]
    int64 = onnx.TensorProto.INT64
    names = ["d_loss", "log_probs", "targets", "input_lengths", "target_lengths"]
    d_loss_shape = ["N"] if attrs.get("reduction") == "none" else []
    inputs = [helper.make_tensor_value_info("d_loss", elem, d_loss_shape),
              helper.make_tensor_value_info("log_probs", elem, ["T", "N", "C"]),
              helper.make_tensor_value_info("targets", int64, ["N", "S"]),
              helper.make_tensor_value_info("input_lengths", int64, ["N"]),
              helper.make_tensor_value_info("target_lengths", int64, ["N"])]
    node = helper.make_node("CTCLossGrad", names, ["d_log_probs"], domain="deploy_ctc", **node_attributes(**attrs))
    graph = helper.make_graph([node], "ctc_grad", inputs,
                              [helper.make_tensor_value_info("d_log_probs", elem, ["T", "N", "C"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    attach_functions(model)
    return model


def onnx_elem(array) -> int:
    """The ONNX element type of ``array``'s dtype (float32/64, int32/64)."""
    import onnx

    types = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float64): onnx.TensorProto.DOUBLE,
             np.dtype(np.int32): onnx.TensorProto.INT32, np.dtype(np.int64): onnx.TensorProto.INT64}
    return types[np.asarray(array).dtype]


def node_model(op: str, feeds: dict, **attrs):
    """One deploy_ctc node over inputs typed like ``feeds`` (rank left open), attributes only those given; its output
    ``out`` (CTCAlign: ``alignment`` and ``scores``)."""
    import onnx

    helper = onnx.helper
    inputs = [helper.make_tensor_value_info(name, onnx_elem(value), None) for name, value in feeds.items()]
    float_out = onnx_elem(feeds["log_probs"])
    outputs = ([helper.make_tensor_value_info("alignment", onnx.TensorProto.INT64, None),
                helper.make_tensor_value_info("scores", float_out, None)] if op == "CTCAlign" else
               [helper.make_tensor_value_info("out", float_out, None)])
    node = helper.make_node(op, list(feeds), [output.name for output in outputs], domain="deploy_ctc", **attrs)
    graph = helper.make_graph([node], op, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("deploy_ctc", 1)])
    model.ir_version = 10  # what onnxruntime-training 1.19.2, the oldest runtime tested, loads
    return model
