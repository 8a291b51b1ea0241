"""The one GPU check of the CUDA backend: GPU tests, then forward+backward timings against torch on CUDA.

Not yet run on a GPU.

Run from the repository root on a machine with a CUDA GPU, CuPy and torch (CUDA build):

    python benchmarks/gpu_check.py [--reps 20] [--skip-tests]

1. runs ``tests/backends/cuda/test_cupy_kernels.py``, ``tests/backends/cuda/test_cupy_align.py`` (forced alignment),
   ``tests/backends/cuda/test_kernels_compile.py`` and ``tests/onnx/test_native_library_cuda.py`` (the ONNX Runtime
   library's CUDA ops in a CUDAExecutionProvider session: needs onnxruntime-gpu, nvcc and ONNX Runtime's headers)
   (their GPU tests run there);
2. for (T, N, C, S) in SHAPES, on :func:`benchmarks.common.make_inputs` (float32, full input lengths, target
   lengths in [S/2, S]): interleaved medians over ``reps`` CUDA-event timings (after warm-up) of loss + gradient for
   deploy_ctc (``ctc_loss_and_grad`` on CuPy arrays, validation included), torch native CUDA (int64 padded targets) and
   cuDNN (int32 concatenated CPU targets, used by torch only when S <= 256, blank 0 and all input lengths equal T);
   prints the ratios;
3. for the large-C shape, the achieved bandwidth of reading log_probs once and writing the gradient once,
   against a device-to-device copy measured in the same run;
4. checks that two runs give bitwise-equal gradients and writes everything, with the GPU's name, to
   ``benchmarks/results/gpu_check_<gpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import interleaved_medians, make_inputs  # noqa: E402

SHAPES = [(50, 16, 20, 30), (500, 32, 30, 100), (400, 16, 1000, 80), (1500, 8, 5000, 300), (1000, 64, 32, 200)]
LARGE_C = (1500, 8, 5000, 300)
CUDNN_MAX_TARGET = 256


def cuda_event_ms(run):
    """Milliseconds ``run()`` takes on the GPU, by CUDA events around the call."""
    import cupy

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    run()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop)


def median_ms(runners, reps):
    """``{name: median ms}`` of each callable in ``runners``, interleaved, by CUDA events after 3 warm-ups."""
    return interleaved_medians(runners, reps, timer=cuda_event_ms, warmup=3)


def copy_bandwidth(reps):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    import cupy

    src = cupy.ones(1 << 28, dtype=np.float32)  # 1 GiB
    dst = cupy.empty_like(src)
    return 2 * src.nbytes / (median_ms({"copy": lambda: cupy.copyto(dst, src)}, reps)["copy"] * 1e-3)


def time_shape(shape, reps):
    import cupy
    import torch

    import deploy_ctc

    T, N, C, S = shape
    log_probs, targets, il, tl = make_inputs(T, N, C, S)
    lp_cp = cupy.asarray(log_probs)  # (T, N, C) log-softmax
    tg_cp = cupy.asarray(targets)

    def ours():
        return deploy_ctc.ctc_loss_and_grad(lp_cp, tg_cp, il, tl)

    lp_t = torch.as_tensor(cupy.asnumpy(lp_cp), device="cuda").requires_grad_()
    tg_native = torch.as_tensor(targets, device="cuda")
    il_t, tl_t = torch.as_tensor(il, device="cuda"), torch.as_tensor(tl, device="cuda")
    # cuDNN's form: concatenated int32 targets on the CPU, lengths as int tuples.
    tg_cudnn = torch.cat([torch.as_tensor(targets[n, :tl[n]], dtype=torch.int32) for n in range(N)])
    il_tuple, tl_tuple = tuple(int(v) for v in il), tuple(int(v) for v in tl)

    def torch_step(tg, ilens, tlens):
        lp_t.grad = None
        torch.nn.functional.ctc_loss(lp_t, tg, ilens, tlens).backward()

    runners = {"deploy_ctc_ms": ours, "torch_native_ms": lambda: torch_step(tg_native, il_t, tl_t)}
    if S <= CUDNN_MAX_TARGET:
        runners["torch_cudnn_ms"] = lambda: torch_step(tg_cudnn, il_tuple, tl_tuple)
    with torch.backends.cudnn.flags(enabled=True, deterministic=False):
        result = {"shape": shape, **median_ms(runners, reps)}
    first, second = ours()[1], ours()[1]
    result["bitwise_deterministic"] = bool(cupy.array_equal(first, second))
    # Loss agreement with torch native, as a sanity check of the timed computation.
    torch_loss = torch.nn.functional.ctc_loss(lp_t, tg_native, il_t, tl_t).item()
    result["loss_rel_diff_vs_torch"] = abs(float(ours()[0]) - torch_loss) / abs(torch_loss)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()

    import cupy
    import torch

    report = {"gpu": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy": cupy.__version__,
              "torch": torch.__version__, "python": platform.python_version(), "dtype": "float32"}
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/backends/cuda/test_cupy_kernels.py",
                                "tests/backends/cuda/test_cupy_align.py",
                                "tests/backends/cuda/test_kernels_compile.py",
                                "tests/onnx/test_native_library_cuda.py"],
                               cwd=ROOT, capture_output=True, text=True)
        print(tests.stdout[-3000:])
        report["tests"] = {"returncode": tests.returncode, "summary": tests.stdout.strip().splitlines()[-1:]}

    report["results"] = [time_shape(shape, args.reps) for shape in SHAPES]
    for r in report["results"]:
        r["speedup_vs_native"] = r["torch_native_ms"] / r["deploy_ctc_ms"]
        if "torch_cudnn_ms" in r:
            r["speedup_vs_cudnn"] = r["torch_cudnn_ms"] / r["deploy_ctc_ms"]
        print(f"(T,N,C,S)={r['shape']}: deploy_ctc {r['deploy_ctc_ms']:.3f} ms, torch native "
              f"{r['torch_native_ms']:.3f} ms ({r['speedup_vs_native']:.2f}x)"
              + (f", cuDNN {r['torch_cudnn_ms']:.3f} ms ({r['speedup_vs_cudnn']:.2f}x)"
                 if "torch_cudnn_ms" in r else "")
              + f", deterministic={r['bitwise_deterministic']}")
    report["geomean_speedup_vs_native"] = float(np.exp(np.mean([np.log(r["speedup_vs_native"])
                                                                for r in report["results"]])))
    large = next(r for r in report["results"] if tuple(r["shape"]) == LARGE_C)
    T, N, C, _ = LARGE_C
    moved = 2 * T * N * C * 4  # read log_probs once, write the gradient once
    report["large_c"] = {"bytes": moved, "achieved_GBps": moved / (large["deploy_ctc_ms"] * 1e-3) / 1e9,
                         "copy_GBps": copy_bandwidth(args.reps) / 1e9}
    report["large_c"]["times_floor"] = report["large_c"]["copy_GBps"] / report["large_c"]["achieved_GBps"]
    print(f"geomean speedup vs torch native: {report['geomean_speedup_vs_native']:.2f}x; large-C shape: "
          f"{report['large_c']['achieved_GBps']:.0f} GB/s, {report['large_c']['times_floor']:.2f}x the copy floor")

    out = ROOT / "benchmarks" / "results" / f"gpu_check_{report['gpu'].replace(' ', '_')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
