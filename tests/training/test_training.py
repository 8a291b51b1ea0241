"""deploy_ctc.training: ONNX Runtime training artifacts with deploy_ctc::CTCLoss, checked against torch autograd.

Runs only where onnxruntime-training is installed (its own environment: see .ci/training.sh); elsewhere the
module is skipped with the reason.
"""

import copy
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("onnxruntime.training", reason="needs onnxruntime-training (pip install deploy_ctc[train], "
                    "own environment: bash .ci/training.sh)")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

from deploy_ctc import training  # noqa: E402
from deploy_ctc.onnx import native_library  # noqa: E402
from tests.onnx.helpers import native_library_or_skip  # noqa: E402
from tests.training import tiny_model  # noqa: E402

T, N, F, C, S = 12, 4, 5, 6, 4

# float32 model and kernels (the native library computes in float64 and rounds once) vs torch float64 autograd:
# parameter gradients sum O(T*N) float32 products through Tanh/MatMul, ~1e-7 relative each.
RTOL, ATOL = 1e-5, 1e-6
# The portable bodies run the recursions in float32 (a Loop in log space) and exceed 1e-5 relative on some cases.
PORTABLE_RTOL = 1e-4


def make_batch(rng, blank=0, infeasible=False):
    """x (T, N, F) float32, padded targets (N, S), lengths (N,); targets avoid ``blank``.

    ``infeasible`` makes sample 1 impossible (3 distinct labels in 2 frames): its loss is +inf.
    """
    x = rng.standard_normal((T, N, F)).astype(np.float32)
    labels = np.array([c for c in range(C) if c != blank])
    targets = rng.choice(labels, size=(N, S)).astype(np.int64)
    input_lengths = np.array([T, T - 1, T - 3, T - 5], np.int64)
    target_lengths = np.array([S, 3, 2, 1], np.int64)
    if infeasible:
        targets[1, :3] = labels[:3]
        input_lengths[1] = 2
    return x, targets, input_lengths, target_lengths


@pytest.fixture
def params(rng):
    return tiny_model.make_parameters(rng, F=F, C=C)


@pytest.fixture(params=[False, True], ids=["native", "portable"])
def portable(request, monkeypatch):
    """Both ways of running CTCLoss / CTCLossGrad; the portable one where the native library cannot be built."""
    if request.param:
        unavailable = native_library.NativeUnavailable("not built for this test")
        monkeypatch.setattr(native_library, "_failures", {False: unavailable})
    else:
        native_library_or_skip()
    return request.param


def generate(params, tmp_path, **options):
    if not options.get("portable"):
        native_library_or_skip()
    options.setdefault("requires_grad", list(tiny_model.PARAMETERS))
    return training.generate_artifacts(tiny_model.make_model(params), artifact_directory=tmp_path / "artifacts",
                                       **options)


def test_artifacts_written_at_ir10_with_grad_attributes(params, tmp_path):
    model = tiny_model.make_model(params)
    model.ir_version = 14  # what onnx >= 1.23 writes; onnxruntime-training 1.19.2 refuses it
    original = model.SerializeToString()
    artifacts = training.generate_artifacts(model, list(tiny_model.PARAMETERS), artifact_directory=tmp_path / "a",
                                            blank=2, reduction="sum", zero_infinity=True)

    for path in (artifacts.training_model, artifacts.eval_model, artifacts.optimizer_model):
        assert onnx.load(path).ir_version <= training.MAX_IR_VERSION, path.name
    assert artifacts.checkpoint.exists()
    assert artifacts.needs_library and artifacts.log_probs == "log_probs"

    nodes = {node.op_type: node for node in onnx.load(artifacts.training_model).graph.node
             if node.domain == "deploy_ctc"}
    assert sorted(nodes) == ["CTCLoss", "CTCLossGrad"]
    for node in nodes.values():
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes == {"blank": 2, "reduction": b"sum", "zero_infinity": 1}, node.op_type
    assert list(nodes["CTCLossGrad"].input[1:]) == list(nodes["CTCLoss"].input)

    assert training.TrainingArtifacts.in_directory(tmp_path / "a") == artifacts
    assert model.SerializeToString() == original  # the caller's model is not modified


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_training_graph_gradients_match_torch(params, tmp_path, rng, reduction, zero_infinity, portable):
    blank = 3 if reduction == "sum" else 0  # one case with a blank that is not class 0
    batch = make_batch(rng, blank=blank, infeasible=zero_infinity)
    artifacts = generate(params, tmp_path, blank=blank, reduction=reduction, zero_infinity=zero_infinity,
                         portable=portable)
    assert artifacts.needs_library is not portable
    state, module, _ = training.open_training(artifacts)

    loss = module(*batch)

    expected_loss, expected_grads = tiny_model.torch_loss_and_grads(
        params, *batch, blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    np.testing.assert_allclose(loss, expected_loss.sum(), rtol=RTOL, err_msg="training loss")
    for name in tiny_model.PARAMETERS:
        np.testing.assert_allclose(state.parameters[name].grad, expected_grads[name],
                                   rtol=PORTABLE_RTOL if portable else RTOL, atol=ATOL, err_msg=f"d loss / d {name}")
    assert np.any(expected_grads["W1"] != 0)


def test_infeasible_sample_without_zero_infinity_gives_inf_loss_and_nan_gradients(params, tmp_path, rng, portable):
    batch = make_batch(rng, infeasible=True)
    state, module, _ = training.open_training(generate(params, tmp_path, reduction="mean", portable=portable))

    loss = module(*batch)

    expected_loss, expected_grads = tiny_model.torch_loss_and_grads(params, *batch, reduction="mean")
    assert np.isposinf(expected_loss) and np.isposinf(loss)
    for name in tiny_model.PARAMETERS:
        np.testing.assert_array_equal(np.isnan(state.parameters[name].grad), np.isnan(expected_grads[name]),
                                      err_msg=f"NaN pattern of d loss / d {name}")


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_optimizer_steps_reduce_the_loss(params, tmp_path, rng, optimizer, portable):
    batch = make_batch(rng)
    state, module, opt = training.open_training(generate(params, tmp_path, optimizer=optimizer, portable=portable))
    opt.set_learning_rate(0.05)

    losses = []
    for _ in range(4):
        losses.append(float(module(*batch)))
        opt.step()
        module.lazy_reset_grad()
    losses.append(float(module(*batch)))

    assert all(after < before for before, after in zip(losses, losses[1:])), losses
    # The first loss is the untrained model's, computed by torch independently.
    expected_loss, _ = tiny_model.torch_loss_and_grads(params, *batch)
    np.testing.assert_allclose(losses[0], expected_loss, rtol=RTOL)


def test_frozen_parameters_stay_put_and_inference_export_matches(params, tmp_path, rng, portable):
    batch = make_batch(rng)
    artifacts = generate(params, tmp_path, requires_grad=["W2", "b"], frozen_params=["W1"], portable=portable)
    state, module, opt = training.open_training(artifacts)
    opt.set_learning_rate(0.05)
    for _ in range(2):
        module(*batch)
        opt.step()
        module.lazy_reset_grad()

    trained = {name: np.array(state.parameters[name].data) for name in tiny_model.PARAMETERS}
    np.testing.assert_array_equal(trained["W1"], params["W1"])
    assert not np.array_equal(trained["W2"], params["W2"])
    assert not state.parameters["W1"].requires_grad

    inference_path = tmp_path / "inference.onnx"
    training.export_inference_model(state, artifacts, inference_path)
    session = onnxruntime.InferenceSession(str(inference_path), providers=["CPUExecutionProvider"])
    (log_probs,) = session.run(None, {"x": batch[0]})
    np.testing.assert_allclose(log_probs, tiny_model.reference_log_probs(trained, batch[0]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Bad configurations
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, error, message", [
    ({"requires_grad": ["W1", "W9"]}, ValueError, r"requires_grad: \['W9'\] are not initializers"),
    ({"requires_grad": []}, ValueError, "requires_grad must name at least one parameter"),
    ({"requires_grad": "W1"}, TypeError, "requires_grad must be a list of parameter names"),
    ({"frozen_params": ["encoder.weight"]}, ValueError, r"frozen_params: \['encoder.weight'\] are not initial"),
    ({"requires_grad": ["W1"], "frozen_params": ["W1"]}, ValueError, r"\['W1'\] are listed in both"),
    ({"optimizer": "Adam"}, ValueError, "optimizer must be one of"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"blank": 0.5}, TypeError, "blank must be an integer"),
    ({"zero_infinity": 2}, ValueError, "zero_infinity must be a bool"),
    ({"log_probs": "logits"}, ValueError, "log_probs: the model has no graph output 'logits'"),
])
def test_bad_configuration_is_refused_before_anything_is_written(params, tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        generate(params, tmp_path, **options)
    assert not (tmp_path / "artifacts").exists()


def test_model_opset_newer_than_the_training_runtime_is_refused(params, tmp_path):
    model = tiny_model.make_model(params, opset=training.MAX_ONNX_OPSET + 2)
    with pytest.raises(ValueError, match="opset 23 is newer than onnxruntime-training 1.19.2 runs"):
        training.generate_artifacts(model, list(tiny_model.PARAMETERS), artifact_directory=tmp_path)


def test_portable_bodies_need_opset_18(params, tmp_path):
    model = tiny_model.make_model(params, opset=17)
    with pytest.raises(ValueError, match="portable=True needs an ONNX opset >= 18"):
        training.generate_artifacts(model, list(tiny_model.PARAMETERS), artifact_directory=tmp_path, portable=True)


def test_log_probs_output_must_be_float_rank3(params, tmp_path):
    model = tiny_model.make_model(params)
    del model.graph.output[0].type.tensor_type.shape.dim[2]
    with pytest.raises(ValueError, match=r"log_probs: output 'log_probs' must have shape \(T, N, C\), got rank 2"):
        training.generate_artifacts(model, list(tiny_model.PARAMETERS), artifact_directory=tmp_path)


def test_unavailable_library_is_explained(params, tmp_path, monkeypatch):
    artifacts = generate(params, tmp_path)
    path = native_library_or_skip()
    monkeypatch.setattr(native_library, "_failures", {False: native_library.NativeUnavailable("no headers here")})

    with pytest.raises(native_library.NativeUnavailable, match=r"no headers here; .*portable=True"):
        training.generate_artifacts(tiny_model.make_model(params), list(tiny_model.PARAMETERS),
                                    artifact_directory=tmp_path / "again")
    with pytest.raises(native_library.NativeUnavailable, match="no headers here"):
        training.open_training(artifacts)
    state, module, _ = training.open_training(artifacts, library=path)
    assert state is not None and module is not None  # an explicit library file needs no build


def test_training_session_without_the_library_names_the_op(params, tmp_path):
    """A device that opens the artifacts without deploy_ctc's kernels gets ORT's error naming the op."""
    from onnxruntime.training import api

    artifacts = generate(params, tmp_path)
    state = api.CheckpointState.load_checkpoint(str(artifacts.checkpoint))
    with pytest.raises(Exception, match="CTCLoss"):
        api.Module(str(artifacts.training_model), state, str(artifacts.eval_model))


def test_loss_block_options_are_checked():
    with pytest.raises(ValueError, match="reduction must be one of"):
        training.CTCLossBlock(reduction="batchmean")
    with pytest.raises(TypeError, match="zero_infinity must be a bool"):
        training.CTCLossBlock(zero_infinity="yes")


# ------------------------------------------------------------------------------------------------------------
# A torch-exported encoder: frozen bidirectional LSTM, input lengths computed by the model
# ------------------------------------------------------------------------------------------------------------
def make_encoder():
    """torch module (features (N, T, F), lengths (N,)) -> (log_probs (T', N, C), lengths' (N,)).

    Frames are subsampled by 2 (lengths' = ceil(lengths / 2)), as in acoustic front-ends, so the CTC input
    lengths are a model output, not a graph input.
    """
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(F, 6, batch_first=True, bidirectional=True)
            self.head = torch.nn.Linear(12, C)

        def forward(self, features, lengths):
            h, _ = self.lstm(features[:, ::2])  # (N, T', 12)
            return self.head(h).log_softmax(-1).transpose(0, 1), (lengths + 1) // 2

    torch.manual_seed(0)
    return Encoder()


def test_frozen_bidirectional_lstm_with_model_computed_input_lengths(tmp_path, rng, portable):
    """ORT 1.19.2's LSTMGrad refuses bidirectional LSTMs; frozen, the LSTM runs as the standard op."""
    import torch

    model = make_encoder()
    features = rng.standard_normal((N, 2 * T, F)).astype(np.float32)
    lengths = np.array([2 * T, 2 * T - 1, 2 * T - 5, T], np.int64)
    targets = rng.integers(1, C, (N, S)).astype(np.int64)
    target_lengths = np.array([S, 3, 2, 1], np.int64)
    path = tmp_path / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.from_numpy(features), torch.from_numpy(lengths)), str(path), dynamo=False,
                          opset_version=18, do_constant_folding=False, input_names=["features", "lengths"],
                          output_names=["log_probs", "out_lengths"],
                          dynamic_axes={"features": {0: "N", 1: "T"}, "lengths": {0: "N"},
                                        "log_probs": {0: "T2", 1: "N"}, "out_lengths": {0: "N"}})
    head = ["head.weight", "head.bias"]
    frozen = [name for name, _ in model.named_parameters() if name not in head]
    artifacts = training.generate_artifacts(str(path), head, frozen, artifact_directory=tmp_path / "artifacts",
                                            reduction="sum", log_probs="log_probs", input_lengths="out_lengths",
                                            portable=portable)
    assert training.TrainingArtifacts.in_directory(tmp_path / "artifacts") == artifacts
    state, module, _ = training.open_training(artifacts)

    loss = module(features, lengths, targets, target_lengths)

    reference = copy.deepcopy(model).double()
    log_probs, out_lengths = reference(torch.from_numpy(features).double(), torch.from_numpy(lengths))
    expected = torch.nn.functional.ctc_loss(log_probs, torch.from_numpy(targets), out_lengths,
                                            torch.from_numpy(target_lengths), reduction="sum")
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=RTOL)
    for name, parameter in reference.named_parameters():
        if name in head:
            np.testing.assert_allclose(state.parameters[name].grad, parameter.grad.numpy(), rtol=RTOL, atol=ATOL,
                                       err_msg=f"d loss / d {name}")

    inference_path = tmp_path / "inference.onnx"
    training.export_inference_model(state, artifacts, inference_path)
    session = onnxruntime.InferenceSession(str(inference_path), providers=["CPUExecutionProvider"])
    got_log_probs, got_lengths = session.run(None, {"features": features, "lengths": lengths})
    np.testing.assert_array_equal(got_lengths, out_lengths.numpy())
    np.testing.assert_allclose(got_log_probs, log_probs.detach().numpy(), rtol=1e-5, atol=1e-5)


DEVICE_SCRIPT = """
import sys
sys.modules["deploy_ctc"] = None  # the device has onnxruntime-training and, for native artifacts, the library file
import numpy as np
import onnxruntime
from onnxruntime.training import api

directory, batch_path, library = sys.argv[1], sys.argv[2], sys.argv[3:]
options = onnxruntime.SessionOptions()
if library:
    options.register_custom_ops_library(library[0])
else:
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
state = api.CheckpointState.load_checkpoint(directory + "/checkpoint")
module = api.Module(directory + "/training_model.onnx", state, directory + "/eval_model.onnx",
                    session_options=options)
optimizer = api.Optimizer(directory + "/optimizer_model.onnx", module)
batch = np.load(batch_path)
losses = []
for _ in range(3):
    losses.append(float(module(batch["x"], batch["targets"], batch["input_lengths"], batch["target_lengths"])))
    optimizer.step()
    module.lazy_reset_grad()
print(" ".join(repr(loss) for loss in losses))
"""


def test_artifacts_train_without_deploy_ctc_on_the_device(params, tmp_path, rng, portable):
    """A 'device' process that cannot import deploy_ctc trains the artifacts: the portable ones with
    onnxruntime-training alone, the native ones with the library file registered."""
    import shutil
    import subprocess

    artifacts = generate(params, tmp_path, portable=portable)
    library = [] if portable else [native_library_or_skip()]
    device_dir = tmp_path / "device"
    shutil.copytree(artifacts.training_model.parent, device_dir)  # what ships to the device
    batch = make_batch(rng)
    np.savez(tmp_path / "batch.npz", **dict(zip(["x", "targets", "input_lengths", "target_lengths"], batch)))

    result = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(device_dir), str(tmp_path / "batch.npz"),
                             *library],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(value) for value in result.stdout.split()]
    expected_loss, _ = tiny_model.torch_loss_and_grads(params, *batch)
    np.testing.assert_allclose(losses[0], expected_loss, rtol=RTOL)
    assert losses[2] < losses[1] < losses[0], losses


def test_incomplete_artifact_directory_names_the_missing_files(params, tmp_path):
    artifacts = generate(params, tmp_path)
    artifacts.optimizer_model.unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \[.*optimizer_model.onnx'\]"):
        training.TrainingArtifacts.in_directory(tmp_path / "artifacts")
