"""ONNX Runtime overheads of deploy_ctc::CTCLoss on the CPU benchmark's shapes (forward, float32, CPU).

Two ratios, each measured in the same run on the same inputs:

* extension: an onnxruntime session whose only node is CTCLoss (served by the deploy_ctc extension)
  over the direct ``deploy_ctc.ctc_loss`` call -- target <= 1.2;
* portable body: the same model with its model-local function, in plain onnxruntime, over torch CPU's
  ``F.ctc_loss`` forward -- target <= 3.

Inputs: :func:`benchmarks.common.make_inputs` with varied input and target lengths. Medians over ``--repeats``
rounds after one warm-up, the four paths alternating within each round so they share the (shared, noisy)
machine's load; shapes whose warm-up exceeds 1 s per path are timed once.
Results go to benchmarks/results/bench_onnx.json.

    python benchmarks/bench_onnx.py [--shapes small|all] [--repeats 5] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout's root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import interleaved_medians, make_inputs  # noqa: E402

SHAPES = {  # (T, N, C, S), as the CPU benchmark
    "small": [(50, 16, 20, 30), (500, 32, 30, 100)],
    "all": [(50, 16, 20, 30), (500, 32, 30, 100), (400, 16, 1000, 80), (1500, 8, 5000, 300)],
}
SLOW_S = 1.0


def bench_shape(shape, repeats: int) -> dict:
    import onnxruntime as ort
    import torch

    import deploy_ctc
    import deploy_ctc.onnx as dco

    names = ("log_probs", "targets", "input_lengths", "target_lengths")
    feeds = dict(zip(names, make_inputs(*shape, lengths="varied")))
    opts = ort.SessionOptions()
    extension = ort.InferenceSession(dco.ctc_loss_model(embed_functions=False).SerializeToString(),
                                     dco.session_options(), providers=["CPUExecutionProvider"])
    portable = ort.InferenceSession(dco.ctc_loss_model().SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]

    def torch_forward():
        with torch.no_grad():
            return torch.nn.functional.ctc_loss(*tensors)

    direct = deploy_ctc.ctc_loss(*feeds.values())
    losses = {"extension": extension.run(None, feeds)[0], "portable": portable.run(None, feeds)[0]}
    medians = interleaved_medians({
        "direct_ms": lambda: deploy_ctc.ctc_loss(*feeds.values()),
        "extension_ms": lambda: extension.run(None, feeds),
        "portable_ms": lambda: portable.run(None, feeds),
        "torch_forward_ms": torch_forward,
    }, repeats, slow_s=SLOW_S)
    result = {"shape_TNCS": list(shape), **{k: 1e3 * v for k, v in medians.items()},
              "rel_diff_vs_direct": {k: float(abs(v - direct) / abs(direct)) for k, v in losses.items()}}
    result["extension_over_direct"] = result["extension_ms"] / result["direct_ms"]
    result["portable_over_torch"] = result["portable_ms"] / result["torch_forward_ms"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "bench_onnx.json"))
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
               "torch": torch.__version__, "dtype": "float32", "reduction": "mean"}
    print(f"machine: {machine}")
    print(f"{'(T, N, C, S)':>24s} {'direct':>9s} {'ext':>9s} {'ext/dir':>8s} {'portable':>9s} {'torch':>9s} "
          f"{'port/torch':>10s}   (median ms)")
    results = []
    for shape in SHAPES[args.shapes]:
        r = bench_shape(shape, args.repeats)
        results.append(r)
        print(f"{str(tuple(shape)):>24s} {r['direct_ms']:9.2f} {r['extension_ms']:9.2f} "
              f"{r['extension_over_direct']:8.2f} {r['portable_ms']:9.2f} {r['torch_forward_ms']:9.2f} "
              f"{r['portable_over_torch']:10.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
