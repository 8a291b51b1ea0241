"""A two-layer acoustic model written directly in ONNX, with a torch float64 twin as the gradient oracle.

    x (T, N, F) -> MatMul W1 (F, H) -> Tanh -> MatMul W2 (H, C) -> Add b (C,) -> LogSoftmax over C -> log_probs

Built by hand (not exported from torch) so the parameter names are known and the graph does not depend on an
exporter; ``make_model`` writes the current onnx's IR version (14 for onnx 1.23), which exercises the IR fix-up.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PARAMETERS = ("W1", "W2", "b")


def make_parameters(rng, F=5, H=7, C=6) -> dict:
    """float32 parameters {name: array}; W2 scaled so the initial log-probs are far from uniform."""
    return {
        "W1": (rng.standard_normal((F, H)) / np.sqrt(F)).astype(np.float32),
        "W2": (rng.standard_normal((H, C)) * 0.5).astype(np.float32),
        "b": (rng.standard_normal(C) * 0.1).astype(np.float32),
    }


def make_model(params: dict, opset: int = 18) -> onnx.ModelProto:
    """The ONNX model (opset 18: the lowest the portable CTC bodies take)."""
    F, _ = params["W1"].shape
    C = params["b"].shape[0]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h_pre"]),  # (T, N, H)
            helper.make_node("Tanh", ["h_pre"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["z_pre"]),  # (T, N, C)
            helper.make_node("Add", ["z_pre", "b"], ["z"]),
            helper.make_node("LogSoftmax", ["z"], ["log_probs"], axis=-1),
        ],
        "tiny_acoustic_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", F])],
        [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["T", "N", C])],
        [numpy_helper.from_array(params[name], name) for name in PARAMETERS],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def torch_loss_and_grads(params: dict, x, targets, input_lengths, target_lengths, blank=0, reduction="mean",
                         zero_infinity=False):
    """torch float64 autograd of the training loss: (loss, {name: d loss / d param}).

    The training loss is the CTC loss for "mean"/"sum" and ``sum_n loss[n]`` for "none" (what the training
    graph optimizes); the returned loss has torch's shape.
    """
    import torch

    leaves = {name: torch.tensor(value, dtype=torch.float64, requires_grad=True) for name, value in params.items()}
    h = torch.tanh(torch.from_numpy(np.asarray(x, np.float64)) @ leaves["W1"])  # (T, N, H)
    log_probs = torch.log_softmax(h @ leaves["W2"] + leaves["b"], dim=-1)  # (T, N, C)
    loss = torch.nn.functional.ctc_loss(
        log_probs, torch.from_numpy(targets), torch.from_numpy(input_lengths), torch.from_numpy(target_lengths),
        blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    loss.sum().backward()
    return loss.detach().numpy(), {name: leaf.grad.numpy() for name, leaf in leaves.items()}


def reference_log_probs(params: dict, x) -> np.ndarray:
    """The model's forward pass in float64: (T, N, C) log-probabilities."""
    h = np.tanh(np.asarray(x, np.float64) @ params["W1"].astype(np.float64))
    z = h @ params["W2"].astype(np.float64) + params["b"].astype(np.float64)
    return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
