"""``deploy-ctc demo``: export an acoustic model together with its CTC loss and run it in onnxruntime.

On built-in synthetic data (no downloads) the demo

1. builds :class:`AcousticModel` (conv front-end + BiLSTM over 80-dim features, 30 classes) wrapped in
   :class:`AcousticModelWithLoss`, whose forward ends in ``F.ctc_loss``;
2. exports it with :func:`deploy_ctc.onnx.export` (dynamic batch, frames and target length);
3. evaluates the loss with plain onnxruntime (the portable function body) and with the deploy_ctc
   native library, and prints parity against torch eager and median timings.

The model goes to a temporary file (deleted at the end) unless ``output`` names one. ``deploy-ctc demo``
(:mod:`deploy_ctc.cli`) parses the options and calls :func:`run`.

This module also holds the model and batch generator the examples and the training helper share
(``export_examples/acoustic_model.py`` re-exports them), so the installed command needs no checkout.
Needs torch and ``deploy_ctc[onnx]``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("deploy_ctc.demo needs torch: pip install torch (CPU wheel) and deploy_ctc[onnx]") from exc

N_MELS = 80
N_CLASSES = 30  # blank (0) + 29 symbols
# Parity bar between onnxruntime and torch eager, float32 losses of order 1-100.
RTOL = 1e-4


class AcousticModel(torch.nn.Module):
    """Conv front-end (2x time subsampling) + BiLSTM + linear classifier, emitting CTC log-probs.

    forward(features (N, T, 80) float32, feature_lengths (N,) int64)
        -> log_probs (T', N, C) with T' = ceil(T / 2), output_lengths (N,) = ceil(feature_lengths / 2)
    """

    def __init__(self, n_mels: int = N_MELS, n_classes: int = N_CLASSES, hidden: int = 64):
        super().__init__()
        self.conv = torch.nn.Conv1d(n_mels, hidden, kernel_size=3, stride=2, padding=1)
        self.lstm = torch.nn.LSTM(hidden, hidden, batch_first=True, bidirectional=True)
        self.classifier = torch.nn.Linear(2 * hidden, n_classes)

    def forward(self, features, feature_lengths):
        x = torch.relu(self.conv(features.transpose(1, 2)))  # (N, H, T')
        x, _ = self.lstm(x.transpose(1, 2))  # (N, T', 2H)
        log_probs = self.classifier(x).log_softmax(-1).transpose(0, 1)  # (T', N, C)
        return log_probs, (feature_lengths + 1) // 2  # conv: floor((L + 2 - 3) / 2) + 1


class AcousticModelWithLoss(torch.nn.Module):
    """AcousticModel followed by ``F.ctc_loss``: forward(features, feature_lengths, targets, target_lengths)."""

    def __init__(self, model: AcousticModel, blank: int = 0, reduction: str = "mean"):
        super().__init__()
        self.model, self.blank, self.reduction = model, blank, reduction

    def forward(self, features, feature_lengths, targets, target_lengths):
        log_probs, output_lengths = self.model(features, feature_lengths)
        return torch.nn.functional.ctc_loss(log_probs, targets, output_lengths, target_lengths,
                                            blank=self.blank, reduction=self.reduction)


def make_batch(batch_size: int = 8, max_frames: int = 200, n_mels: int = N_MELS, n_classes: int = N_CLASSES,
               max_target: int = 20, seed: int = 0) -> dict:
    """Synthetic utterances: features (N, T, 80) float32, feature_lengths (N,), targets (N, S), target_lengths (N,).

    Lengths vary per utterance (the longest has ``max_frames``); every target fits its subsampled input
    even with repeated labels (``2 * target_length + 1 <= ceil(frames / 2)``); labels are in [1, n_classes),
    0 being blank.
    """
    rng = np.random.default_rng(seed)
    frames = rng.integers(max_frames // 2, max_frames + 1, batch_size)
    frames[0] = max_frames
    out_frames = (frames + 1) // 2  # after the conv's 2x subsampling
    target_lengths = np.minimum(rng.integers(1, max_target + 1, batch_size), (out_frames - 1) // 2)
    features = rng.standard_normal((batch_size, max_frames, n_mels)).astype(np.float32)
    targets = rng.integers(1, n_classes, (batch_size, int(target_lengths.max())))
    return {"features": features, "feature_lengths": frames.astype(np.int64), "targets": targets.astype(np.int64),
            "target_lengths": target_lengths.astype(np.int64)}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence what torch's exporters print that does not concern the user (deprecations, tracer warnings,
    "torchvision is not installed" log lines) for the duration of the block."""
    torch_logger = logging.getLogger("torch")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_logger.setLevel(level)


@contextlib.contextmanager
def _progress(what: str, stream=None) -> Iterator[None]:
    """Print ``what...``, then the elapsed seconds (updated every second on a terminal) and ``done``."""
    stream = sys.stdout if stream is None else stream
    live = stream.isatty()
    start = time.perf_counter()
    stream.write(f"{what}...")
    stream.flush()
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            stream.write(f"\r{what}... {time.perf_counter() - start:.0f} s")
            stream.flush()

    ticker = threading.Thread(target=tick, daemon=True) if live else None
    if ticker:
        ticker.start()
    try:
        yield
    finally:
        stop.set()
        if ticker:
            ticker.join()
        elapsed = time.perf_counter() - start
        stream.write(f"\r{what}: done in {elapsed:.1f} s\n" if live else f" done in {elapsed:.1f} s\n")
        stream.flush()


def export_with_loss(module: AcousticModelWithLoss, batch: dict, path, dynamo: bool = True):
    """Export ``module`` (inputs named as ``batch``'s keys, output "loss") with dynamic N, T and S."""
    from deploy_ctc.onnx import export

    names = list(batch)
    args = tuple(torch.from_numpy(batch[k]) for k in names)
    dims: dict[str, Any]
    if dynamo:
        n, t, s = torch.export.Dim("N"), torch.export.Dim("T", min=4), torch.export.Dim("S")
        dims = {"dynamic_shapes": ({0: n, 1: t}, {0: n}, {0: n, 1: s}, {0: n})}
    else:
        dims = {"dynamic_axes": {"features": {0: "N", 1: "T"}, "feature_lengths": {0: "N"},
                                 "targets": {0: "N", 1: "S"}, "target_lengths": {0: "N"}}}
    with _quiet_torch():
        return export(module, args, str(path), dynamo=dynamo, input_names=names, output_names=["loss"],
                      verbose=False, **dims)


def run(output=None, batch: int = 8, frames: int = 200, exporter: str = "dynamo", repeats: int = 10) -> int:
    """Run the demo; returns 0 when both onnxruntime paths match torch eager, else 1.

    Args:
        output: where to write the ONNX model; None: a temporary file, deleted at the end.
        batch: utterances per batch; frames: frames of the longest utterance.
        exporter: ``"dynamo"`` (torch.export-based) or ``"torchscript"``.
        repeats: timed runs per path (the median is reported).
    """
    with tempfile.TemporaryDirectory(prefix="deploy_ctc_demo_") as scratch:
        path = Path(output) if output is not None else Path(scratch) / "deploy_ctc_demo.onnx"
        return _run(path, output is not None, batch, frames, exporter, repeats)


def _run(path: Path, keep: bool, batch_size: int, frames: int, exporter: str, repeats: int) -> int:
    import onnxruntime as ort

    import deploy_ctc.onnx as dco

    torch.manual_seed(0)
    module = AcousticModelWithLoss(AcousticModel()).eval()
    batch = make_batch(batch_size, frames)
    print(f"model: conv + BiLSTM, {N_MELS}-dim features, {N_CLASSES} classes; batch N={batch_size}, "
          f"T<={frames} frames, S={batch['targets'].shape[1]}")
    with _progress(f"exporting with the {exporter} exporter (deploy_ctc::CTCLoss + its portable body)"):
        export_with_loss(module, make_batch(3, 64, seed=1), path, dynamo=exporter == "dynamo")
    print(f"model written to {path}" if keep else "model written to a temporary file (--output keeps it)")

    with torch.no_grad():
        tensors = [torch.from_numpy(v) for v in batch.values()]
        expected = float(module(*tensors))
        eager_ms = _median_ms(lambda: module(*tensors), repeats)
    sessions = {
        "onnxruntime (portable body)": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
        "onnxruntime + deploy_ctc library": ort.InferenceSession(
            str(path), dco.session_options(), providers=["CPUExecutionProvider"]),
    }
    ok = True
    print(f"{'path':38s} {'loss':>12s} {'rel. diff':>10s} {'median ms':>10s}")
    print(f"{'torch eager':38s} {expected:12.6f} {'':>10s} {eager_ms:10.2f}")
    for name, session in sessions.items():
        loss = float(session.run(None, batch)[0])
        diff = abs(loss - expected) / max(abs(expected), 1e-12)
        ok &= bool(diff <= RTOL)
        ms = _median_ms(lambda: session.run(None, batch), repeats)
        print(f"{name:38s} {loss:12.6f} {diff:10.2e} {ms:10.2f}")
    print("parity: OK" if ok else f"parity: FAILED (relative difference above {RTOL})")
    return 0 if ok else 1
