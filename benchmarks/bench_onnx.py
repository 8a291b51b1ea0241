"""ONNX Runtime overheads of deploy_ctc::CTCLoss / CTCLossGrad on the CPU benchmark's shapes (float32, CPU).

Timed in the same run on the same inputs, interleaved:

* native: an onnxruntime session whose only node is CTCLoss (or CTCLossGrad), served by deploy_ctc's native
  custom-op library, over the direct ``deploy_ctc.ctc_loss`` (``ctc_loss_and_grad``) call -- target <= 1.1;
* portable body: the CTCLoss model with its model-local function, in plain onnxruntime, over torch CPU's
  ``F.ctc_loss`` forward -- target <= 3.

Sessions run with ``session.intra_op.allow_spinning=0`` (ORT's spinning intra-op threads would otherwise slow
whatever runs next in the interleaved rounds). Inputs: :func:`benchmarks.common.make_inputs` with varied input and
target lengths. Medians over ``--repeats`` rounds after one warm-up; shapes whose warm-up exceeds 1 s per path are
timed once. Results go to benchmarks/results/bench_onnx.json.

With ``--cpp-host PROGRAM`` (``export_examples/cpp/ctc_host.cpp`` built as its README says), each shape's CTCLoss
model also runs in that C++ host, in three rounds alternating with as many runs of the Python session, and the two
medians are compared (target: the C++ host within 1.1x of the Python session).

    python benchmarks/bench_onnx.py [--shapes small|all] [--repeats 5] [--output PATH] [--cpp-host PROGRAM]
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
from benchmarks.common import interleaved_medians, make_inputs, wall_seconds  # noqa: E402

SHAPES = {  # (T, N, C, S), as the CPU benchmark
    "small": [(50, 16, 20, 30), (500, 32, 30, 100)],
    "all": [(50, 16, 20, 30), (500, 32, 30, 100), (400, 16, 1000, 80), (1500, 8, 5000, 300)],
}
SLOW_S = 1.0


def _grad_model():
    """One CTCLossGrad node (reduction mean): d_loss (), log_probs (T, N, C) float32, int64 targets and lengths."""
    from onnx import TensorProto, helper

    names = ["d_loss", "log_probs", "targets", "input_lengths", "target_lengths"]
    shapes = [[], ["T", "N", "C"], ["N", "S"], ["N"], ["N"]]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT if i < 2 else TensorProto.INT64, shape)
              for i, (name, shape) in enumerate(zip(names, shapes))]
    node = helper.make_node("CTCLossGrad", names, ["d_log_probs"], domain="deploy_ctc")
    graph = helper.make_graph([node], "ctc_grad", inputs,
                              [helper.make_tensor_value_info("d_log_probs", TensorProto.FLOAT, ["T", "N", "C"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("deploy_ctc", 1)])


def cpp_host_ms(program, model, feeds: dict, repeats: int) -> float:
    """Median ms per run of ``model`` in the C++ host ``program`` (its ``--repeat`` timing)."""
    import subprocess
    import tempfile

    import deploy_ctc.onnx as dco

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        (path / "model.onnx").write_bytes(model.SerializeToString())
        arguments = []
        for name, value in feeds.items():
            np.save(path / f"{name}.npy", value)
            arguments.append(f"{name}={path / name}.npy")
        result = subprocess.run([str(program), str(path / "model.onnx"), dco.library_path(), *arguments,
                                 "--repeat", str(max(repeats, 7)), "--no-spinning"], capture_output=True, text=True,
                                check=True)
    return float(result.stdout.split("median_ms")[1])


def bench_shape(shape, repeats: int, cpp_host=None) -> dict:
    import onnxruntime as ort
    import torch

    import deploy_ctc
    import deploy_ctc.onnx as dco

    names = ("log_probs", "targets", "input_lengths", "target_lengths")
    feeds = dict(zip(names, make_inputs(*shape, lengths="varied")))
    grad_feeds = {"d_loss": np.array(1.0, np.float32), **feeds}

    def options(native: bool):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return dco.session_options(so) if native else so

    cpu = ["CPUExecutionProvider"]
    native = ort.InferenceSession(dco.ctc_loss_model(embed_functions=False).SerializeToString(), options(True),
                                  providers=cpu)
    native_grad = ort.InferenceSession(_grad_model().SerializeToString(), options(True), providers=cpu)
    portable = ort.InferenceSession(dco.ctc_loss_model().SerializeToString(), options(False), providers=cpu)
    tensors = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]

    def torch_forward():
        with torch.no_grad():
            return torch.nn.functional.ctc_loss(*tensors)

    direct = deploy_ctc.ctc_loss(*feeds.values())
    _, direct_grad = deploy_ctc.ctc_loss_and_grad(*feeds.values())
    losses = {"native": native.run(None, feeds)[0], "portable": portable.run(None, feeds)[0]}
    medians = interleaved_medians({
        "direct_ms": lambda: deploy_ctc.ctc_loss(*feeds.values()),
        "native_ms": lambda: native.run(None, feeds),
        "direct_grad_ms": lambda: deploy_ctc.ctc_loss_and_grad(*feeds.values()),
        "native_grad_ms": lambda: native_grad.run(None, grad_feeds),
        "portable_ms": lambda: portable.run(None, feeds),
        "torch_forward_ms": torch_forward,
    }, repeats, slow_s=SLOW_S)
    result = {"shape_TNCS": list(shape), **{k: 1e3 * v for k, v in medians.items()},
              "rel_diff_vs_direct": {k: float(abs(v - direct) / abs(direct)) for k, v in losses.items()},
              "native_grad_equal": bool(np.array_equal(native_grad.run(None, grad_feeds)[0], direct_grad))}
    result["native_over_direct"] = result["native_ms"] / result["direct_ms"]
    result["native_grad_over_direct"] = result["native_grad_ms"] / result["direct_grad_ms"]
    result["portable_over_torch"] = result["portable_ms"] / result["torch_forward_ms"]
    if cpp_host is not None:
        # Alternate the C++ host's timed runs with as many runs of the Python session, so both see the same load.
        model = dco.ctc_loss_model(embed_functions=False)
        host, python = [], []
        for _ in range(3):
            host.append(cpp_host_ms(cpp_host, model, feeds, repeats))
            python.append(1e3 * float(np.median([wall_seconds(lambda: native.run(None, feeds))
                                                 for _ in range(max(repeats, 7))])))
        result["cpp_host_ms"], result["cpp_python_session_ms"] = float(np.median(host)), float(np.median(python))
        result["cpp_host_over_python"] = result["cpp_host_ms"] / result["cpp_python_session_ms"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpp-host", type=Path, default=None, help="the built export_examples/cpp/ctc_host")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "bench_onnx.json"))
    args = parser.parse_args(argv)

    import onnxruntime
    import torch

    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
               "torch": torch.__version__, "dtype": "float32", "reduction": "mean",
               "ort_intra_op_allow_spinning": 0}
    print(f"machine: {machine}")
    print(f"{'(T, N, C, S)':>24s} {'direct':>9s} {'native':>9s} {'nat/dir':>8s} {'dir grad':>9s} {'nat grad':>9s} "
          f"{'nat/dir':>8s} {'portable':>9s} {'torch':>9s} {'port/torch':>10s}   (median ms)")
    results = []
    for shape in SHAPES[args.shapes]:
        r = bench_shape(shape, args.repeats, args.cpp_host)
        results.append(r)
        print(f"{str(tuple(shape)):>24s} {r['direct_ms']:9.2f} {r['native_ms']:9.2f} {r['native_over_direct']:8.2f} "
              f"{r['direct_grad_ms']:9.2f} {r['native_grad_ms']:9.2f} {r['native_grad_over_direct']:8.2f} "
              f"{r['portable_ms']:9.2f} {r['torch_forward_ms']:9.2f} {r['portable_over_torch']:10.2f}"
              + (f"   C++ host {r['cpp_host_ms']:.2f} ms, {r['cpp_host_over_python']:.2f}x the Python session"
                 if "cpp_host_ms" in r else ""))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
