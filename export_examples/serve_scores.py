"""A minimal loss-evaluation service: load the ONNX model once, score request batches of any T / N.

    python export_examples/serve_scores.py [--model scores.onnx] [--requests 5] [--portable]

Without ``--model`` it first exports the acoustic model with ``reduction="none"`` (one loss per
utterance).  Each request is a batch of utterances of its own length and size; the scorer returns
-log p(transcript | audio) per utterance, e.g. to rank hypotheses or flag badly aligned data.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


class BatchScorer:
    """Scores (features, feature_lengths, targets, target_lengths) batches with one onnxruntime session.

    Args:
        path: ONNX model exported with reduction="none" (inputs as ``make_batch``'s keys, output "loss").
        native: run deploy_ctc::CTCLoss with deploy_ctc's native custom-op library (faster) instead of
            the portable body (plain onnxruntime).
    """

    def __init__(self, path: str, native: bool = True):
        import onnxruntime as ort

        import deploy_ctc.onnx as dco

        options = dco.session_options() if native else ort.SessionOptions()
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def score(self, batch: dict) -> np.ndarray:
        """(N,) losses, one per utterance (inf for a transcript its audio is too short for)."""
        return self.session.run(None, {name: batch[name] for name in self.input_names})[0]


def _export_scoring_model(path: str) -> None:
    import torch

    from deploy_ctc.demo import AcousticModel, AcousticModelWithLoss, export_with_loss, make_batch

    torch.manual_seed(0)
    module = AcousticModelWithLoss(AcousticModel(), reduction="none").eval()
    export_with_loss(module, make_batch(3, 64, seed=1), path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="ONNX model exported with reduction='none' (default: export one)")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--portable", action="store_true", help="use the portable body only")
    args = parser.parse_args(argv)

    from deploy_ctc.demo import make_batch

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or os.path.join(tmp, "scores.onnx")
        if args.model is None:
            _export_scoring_model(path)
        scorer = BatchScorer(path, native=not args.portable)
        rng = np.random.default_rng(0)
        for request in range(args.requests):
            batch = make_batch(int(rng.integers(1, 9)), int(rng.integers(40, 300)), seed=request)
            start = time.perf_counter()
            losses = scorer.score(batch)
            ms = 1e3 * (time.perf_counter() - start)
            shape = batch["features"].shape
            print(f"request {request}: N={shape[0]} T={shape[1]} -> {ms:.1f} ms; loss per utterance: "
                  + " ".join(f"{v:.2f}" for v in losses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
