"""Fine-tune an exported acoustic model with ONNX Runtime training, its CTC loss inside the training graph.

Run in the onnxruntime-training environment (``bash .ci/training.sh`` builds it)::

    .venv-train/bin/python export_examples/finetune_ort.py [--portable] [--steps 50] [--out DIR]

1. export the ONNX example's acoustic model (``acoustic_model.AcousticModel``: conv + BiLSTM, outputs
   ``log_probs`` (T', N, C) and ``output_lengths`` (N,)) to ONNX *without* the loss;
2. ``deploy_ctc.training.generate_artifacts``: training / eval / optimizer models and checkpoint, loss
   ``deploy_ctc::CTCLoss(log_probs, targets, output_lengths, target_lengths)`` with gradient
   ``deploy_ctc::CTCLossGrad``;
3. fine-tune with ``CheckpointState`` / ``Module`` / ``Optimizer`` on synthetic utterances whose labels are
   recoverable (each label is a noisy class prototype held for several frames, between silences), printing
   the loss of every step; the first step's parameter gradients are checked against torch autograd in
   float64 (relative tolerance 1e-5);
4. export the inference model, check it against the torch model carrying the fine-tuned weights and
   greedy-decode a held-out batch.

The last line reads ``finetune: first loss X -> last loss Y``; the script exits non-zero unless
Y < 0.7 X and every check passed.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from deploy_ctc import training

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from acoustic_model import N_CLASSES, N_MELS, AcousticModel  # noqa: E402  (the ONNX example's model)

OPSET = 18  # the portable CTC bodies need >= 18; onnxruntime-training 1.19.2 runs <= 21
GRAD_RTOL = 1e-5
BLANK = 0  # class 0 is blank; its prototype is "silence"
# onnxruntime-training 1.19.2's LSTMGrad kernel supports only forward LSTMs ("LSTM and LSTMGrad kernel only
# supports the forward direction for now"); the model's LSTM is bidirectional, so the conv front-end and the
# BiLSTM stay frozen and the classifier is fine-tuned (the usual on-device personalization split).
TRAINABLE = ("classifier.weight", "classifier.bias")


def recoverable_batch(rng, prototypes: np.ndarray, batch_size: int = 8, max_labels: int = 6) -> dict:
    """Synthetic utterances whose labels can be read back from the features.

    Each label l is its prototype ``prototypes[l]`` (80-dim) held for 4-8 frames, preceded by 2-4 frames
    of silence (``prototypes[0]``), plus Gaussian noise. After the model's 2x subsampling every label keeps
    >= 2 frames and repeated labels a blank between them, so every target is feasible.

    Returns the model's and the loss's inputs, in the training model's input order:
    features (N, T, 80) float32, feature_lengths (N,), targets (N, S), target_lengths (N,) int64.
    """
    n_classes = prototypes.shape[0]
    target_lengths = rng.integers(2, max_labels + 1, batch_size)
    targets = np.zeros((batch_size, max_labels), np.int64)
    frame_classes = []
    for n, length in enumerate(target_lengths):
        targets[n, :length] = rng.integers(1, n_classes, length)
        classes = []
        for label in targets[n, :length]:
            classes += [BLANK] * int(rng.integers(2, 5)) + [int(label)] * int(rng.integers(4, 9))
        frame_classes.append(classes + [BLANK] * int(rng.integers(2, 5)))
    feature_lengths = np.array([len(classes) for classes in frame_classes], np.int64)
    features = np.zeros((batch_size, feature_lengths.max(), prototypes.shape[1]), np.float32)
    for n, classes in enumerate(frame_classes):
        noise = 0.5 * rng.standard_normal((len(classes), prototypes.shape[1]))
        features[n, :len(classes)] = prototypes[classes] + noise
    return {"features": features, "feature_lengths": feature_lengths,
            "targets": targets[:, :target_lengths.max()], "target_lengths": target_lengths.astype(np.int64)}


def export_without_loss(model: torch.nn.Module, batch: dict, path: pathlib.Path) -> None:
    """TorchScript export of ``(features, feature_lengths) -> (log_probs, output_lengths)``, dynamic N and T.

    ``do_constant_folding=False`` keeps every parameter as an initializer named as in ``state_dict``
    (constant folding would replace transposed weights by anonymous folded copies).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model, (torch.from_numpy(batch["features"]), torch.from_numpy(batch["feature_lengths"])), str(path),
            dynamo=False, opset_version=OPSET, do_constant_folding=False,
            input_names=["features", "feature_lengths"], output_names=["log_probs", "output_lengths"],
            dynamic_axes={"features": {0: "N", 1: "T"}, "feature_lengths": {0: "N"},
                          "log_probs": {0: "T'", 1: "N"}, "output_lengths": {0: "N"}},
        )


def torch_gradients(model: torch.nn.Module, batch: dict) -> tuple[float, dict]:
    """Float64 torch autograd of the mean CTC loss: (loss, {parameter name: gradient})."""
    reference = copy.deepcopy(model).double()
    tensors = {key: torch.from_numpy(value) for key, value in batch.items()}
    log_probs, output_lengths = reference(tensors["features"].double(), tensors["feature_lengths"])
    loss = torch.nn.functional.ctc_loss(log_probs, tensors["targets"], output_lengths, tensors["target_lengths"],
                                        blank=BLANK)
    loss.backward()
    return loss.item(), {name: p.grad.numpy() for name, p in reference.named_parameters()}


def check_gradients(state, expected: dict) -> float:
    """Largest ``max |ort - torch| / max |torch|`` over the trained parameters; raises above GRAD_RTOL.

    The error is taken relative to each gradient's largest entry: entries near zero carry float32 rounding
    of the whole forward/backward pass (~1e-7 absolute), which no per-entry relative bound can absorb.
    """
    worst = 0.0
    for name in TRAINABLE:
        grad = expected[name]
        got = np.asarray(state.parameters[name].grad, dtype=np.float64)
        error = float(np.abs(got - grad).max() / np.abs(grad).max())
        if not error <= GRAD_RTOL:  # also catches NaN
            raise AssertionError(f"d loss / d {name}: max |ort - torch| / max |torch| = {error:.2e} > {GRAD_RTOL:g}")
        worst = max(worst, error)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--portable", action="store_true",
                        help="carry the portable ONNX function bodies instead of using the native library")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (>= 2)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="artifact folder (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2, got {args.steps}")

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = AcousticModel()
    prototypes = rng.standard_normal((N_CLASSES, N_MELS)).astype(np.float32)
    batches = [recoverable_batch(rng, prototypes) for _ in range(4)]  # the small fine-tuning set, cycled

    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or pathlib.Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = out / "acoustic.onnx"
        export_without_loss(model, batches[0], onnx_path)
        frozen = [name for name, _ in model.named_parameters() if name not in TRAINABLE]
        artifacts = training.generate_artifacts(onnx_path, requires_grad=list(TRAINABLE), frozen_params=frozen,
                                                optimizer="AdamW",
                                                artifact_directory=out / "artifacts", blank=BLANK,
                                                log_probs="log_probs", input_lengths="output_lengths",
                                                portable=args.portable)
        kernels = "portable ONNX function bodies" if args.portable else "deploy_ctc's native library"
        print(f"artifacts: {artifacts.training_model.parent} (training {', '.join(TRAINABLE)}; "
              f"{len(frozen)} frozen; CTC via {kernels})")

        state, module, optimizer = training.open_training(artifacts)
        optimizer.set_learning_rate(args.lr)
        losses, seconds = [], 0.0
        for step in range(args.steps):
            batch = batches[step % len(batches)]
            start = time.perf_counter()
            loss = float(module(*batch.values()))
            seconds += time.perf_counter() - start
            if step == 0:
                expected_loss, expected_grads = torch_gradients(model, batch)
                error = check_gradients(state, expected_grads)
                print(f"step 0 vs torch float64 autograd: loss {loss:.6f} (torch {expected_loss:.6f}); "
                      f"gradients max |ort - torch| / max |torch| = {error:.1e} <= {GRAD_RTOL:g}")
            start = time.perf_counter()
            optimizer.step()
            module.lazy_reset_grad()
            seconds += time.perf_counter() - start
            losses.append(loss)
            print(f"step {step + 1:3d}  loss {loss:.4f}")
        print(f"{seconds / args.steps * 1e3:.1f} ms per training step (forward, backward, AdamW)")

        inference_path = out / "acoustic_finetuned.onnx"
        training.export_inference_model(state, artifacts, inference_path)
        held_out = recoverable_batch(rng, prototypes)
        decoded = check_inference_model(model, state, inference_path, held_out)
        print(f"inference model: {inference_path.name} matches torch with the fine-tuned weights; greedy "
              f"decoding of a held-out batch recovers {decoded}/{len(held_out['targets'])} label sequences")

    first, last = losses[0], losses[-1]
    print(f"finetune: first loss {first:.4f} -> last loss {last:.4f}")
    if not last < 0.7 * first:
        print(f"the loss did not fall below 0.7 x {first:.4f} in {args.steps} steps", file=sys.stderr)
        return 1
    return 0


def check_inference_model(model: torch.nn.Module, state, path: pathlib.Path, batch: dict) -> int:
    """Run the exported model with onnxruntime, compare with the torch model given the fine-tuned weights.

    Returns how many utterances greedy decoding (argmax per frame, merge repeats, drop blanks) gets right.
    """
    import onnxruntime

    tuned = copy.deepcopy(model)
    tuned.load_state_dict({name: torch.from_numpy(np.array(state.parameters[name].data))
                           for name, _ in tuned.named_parameters()}, strict=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = {"features": batch["features"], "feature_lengths": batch["feature_lengths"]}
    log_probs, output_lengths = session.run(["log_probs", "output_lengths"], inputs)
    with torch.no_grad():
        expected, _ = tuned(*(torch.from_numpy(value) for value in inputs.values()))
    np.testing.assert_allclose(log_probs, expected.numpy(), rtol=1e-4, atol=1e-5, err_msg="inference model vs torch")

    correct = 0
    for n, length in enumerate(output_lengths):
        best = log_probs[:length, n].argmax(-1)  # (T'_n,)
        merged = best[np.r_[True, best[1:] != best[:-1]]]
        decoded = merged[merged != BLANK]
        correct += np.array_equal(decoded, batch["targets"][n, :batch["target_lengths"][n]])
    return correct


if __name__ == "__main__":
    sys.exit(main())
