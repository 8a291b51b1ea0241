"""The ``deploy-ctc`` command (also ``python -m deploy_ctc``).

- ``deploy-ctc check``: versions, backends (and why one is unusable), worker threads, the build cache, and a
  self-test: an analytic single-path case and a check that each CPU backend keeps ordinary inputs on its fast
  path always, parity against torch float64 when torch is installed.
  Prints PASS or FAIL and exits 0 or 1.
- ``deploy-ctc demo``: export an acoustic model with its CTC loss to ONNX and evaluate it in ONNX Runtime
  (:mod:`deploy_ctc.demo`).
- ``deploy-ctc bench``: the CPU benchmark against torch (``benchmarks/bench_cpu.py``, from a source checkout).
- ``deploy-ctc ort-library``: the native ONNX Runtime custom-op library's path (built if needed), or with
  ``--portable --output PATH`` a copy for other machines (:mod:`deploy_ctc.onnx.native_library`); ``--cuda``: its
  variant with CUDA kernels, built with nvcc.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import deploy_ctc
from deploy_ctc._backends import cpu as cpu_backends
from deploy_ctc._backends import native_cache
from deploy_ctc._backends.cpu import common, native_build
from deploy_ctc.backends import path_stats
from deploy_ctc.onnx import native_library

#: Optional modules and the extra that installs each.
OPTIONAL = [("torch", "test"), ("cupy", "cuda"), ("onnx", "onnx"), ("onnxruntime", "onnx"),
            ("onnxscript", "onnx")]
#: What ``deploy-ctc demo`` imports.
DEMO_NEEDS = ("torch", "onnx", "onnxruntime", "onnxscript")


def _import_failure(module_name: str) -> str | None:
    """None when ``module_name`` imports, else why not (one line)."""
    try:
        importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure means "not usable"
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def _version(module_name: str) -> str | None:
    if _import_failure(module_name) is not None:
        return None
    return getattr(sys.modules[module_name], "__version__", "installed")


def _gpu_status() -> str:
    """The CUDA backend's state: the device count, or why CuPy or the GPU is unusable."""
    failure = _import_failure("cupy")
    if failure is not None:
        return f"unusable: cupy does not import ({failure}; pip install 'deploy_ctc[cuda]')"
    import cupy

    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - CUDARuntimeError and driver errors: no usable GPU
        return f"unusable: no CUDA device or driver ({type(error).__name__}: {error})".splitlines()[0]
    if count == 0:
        return "unusable: no CUDA device"
    return f"{count} device(s), cupy {cupy.__version__}"


def _threads() -> str:
    try:
        threads = common.pool_size()
    except ValueError as error:
        return f"unusable setting: {error}"
    from_env = bool(os.environ.get(common.THREADS_ENV, "").strip())
    source = common.THREADS_ENV if from_env else "the CPUs this process may use"
    return f"{threads} ({source}; set {common.THREADS_ENV} to change)"


def _cache() -> str:
    folder = native_cache.cache_dir()
    if folder is None:
        return f"none: no absolute path can be formed (set {native_cache.CACHE_ENV})"
    return f"{folder} (set {native_cache.CACHE_ENV} to change)"


def _single_path_case() -> tuple[bool, str]:
    """T = 3 frames, target (1, 1): the only alignment is 1, blank, 1, so the loss is -sum of those log-probs."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 1, 4))
    lp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    expected = -(lp[0, 0, 1] + lp[1, 0, 0] + lp[2, 0, 1])
    got = deploy_ctc.ctc_loss(lp, np.array([[1, 1]]), [3], [2], reduction="sum")
    return abs(float(got) - expected) <= 1e-12 * abs(expected), f"single path: |{float(got):.12f} - {expected:.12f}|"


def _torch_parity_cases(backend: str) -> list[tuple[bool, str]]:
    """deploy_ctc (float64) on CPU ``backend`` vs torch CPU float64 on random batches: losses and gradients."""
    import torch

    rng = np.random.default_rng(1)
    results = []
    for T, N, C, S, blank, reduction in [(30, 4, 6, 8, 0, "mean"), (50, 3, 20, 12, 19, "sum"), (9, 5, 4, 6, 2, "none")]:
        lp = torch.randn(T, N, C, dtype=torch.float64, generator=torch.Generator().manual_seed(T)).log_softmax(2)
        targets = rng.integers(0, C - 1, (N, S))
        targets[targets >= blank] += 1
        il, tl = rng.integers(1, T + 1, N), rng.integers(0, S + 1, N)
        x = lp.clone().requires_grad_()
        ref = torch.nn.functional.ctc_loss(x, torch.from_numpy(targets), torch.from_numpy(il), torch.from_numpy(tl),
                                           blank=blank, reduction=reduction, zero_infinity=True)
        (ref_grad,) = torch.autograd.grad(ref.sum(), x)
        with cpu_backends.using(backend):
            loss, grad = deploy_ctc.ctc_loss_and_grad(lp.numpy(), targets, il, tl, blank, reduction, True)
        err = max(float(np.max(np.abs(loss - ref.detach().numpy()))), float(np.max(np.abs(grad - ref_grad.numpy()))))
        results.append((err <= 1e-9, f"torch parity, {backend} backend, (T,N,C,S)=({T},{N},{C},{S}) {reduction}: "
                                     f"max |diff| {err:.1e}"))
    return results


def _fast_path_case(backend):
    """A random batch (T = 200, 8 samples) on CPU ``backend`` must finish on the fast scaled recursions: an exact
    redo of ordinary inputs means the fast path is broken (correct numbers, many times slower)."""
    rng = np.random.default_rng(2)
    T, N, C, S = 200, 8, 12, 40
    logits = rng.standard_normal((T, N, C))
    lp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    targets = rng.integers(1, C, (N, S))
    with cpu_backends.using(backend), path_stats() as stats:
        deploy_ctc.ctc_loss_and_grad(lp, targets, np.full(N, T), np.full(N, S))
    return stats.exact == 0 and stats.fast == N, f"fast path, {backend} backend: {stats.fast} of {N} samples"


def check(args: argparse.Namespace) -> int:
    """``deploy-ctc check``: environment report and self-test; returns the exit code."""
    print(f"deploy_ctc {deploy_ctc.__version__}  python {sys.version.split()[0]}  numpy {np.__version__}")
    for module_name, extra in OPTIONAL:
        version = _version(module_name)
        print(f"  {module_name:<24} {version or f'not installed (pip install deploy_ctc[{extra}])'}")
    training = _version("onnxruntime.training") or "not installed (separate venv: [train])"
    print(f"  {'onnxruntime.training':<24} {training}")
    print("backends:")
    print(f"  native  {native_build.describe()}")
    print("  numpy   available")
    print(f"  NumPy arrays run on: {cpu_backends.name()} (set {cpu_backends.ENV}=auto|native|numpy)")
    print(f"  cuda    {_gpu_status()}")
    print(f"  onnx    {'available' if _version('onnxruntime') and _version('onnx') else 'not installed'}")
    print(f"  onnxruntime ops: {native_library.describe()}; without it, the models' portable function bodies")
    print(f"worker threads: {_threads()}")
    print(f"build cache: {_cache()}")
    backends = ("native", "numpy") if cpu_backends.name() == "native" else ("numpy",)
    cases = [_single_path_case()] + [_fast_path_case(backend) for backend in backends]
    if _version("torch"):
        for backend in backends:
            cases += _torch_parity_cases(backend)
    else:
        print("torch not installed: parity against torch skipped (pip install deploy_ctc[test])")
    for ok, text in cases:
        print(f"  {'ok  ' if ok else 'FAIL'} {text}")
    passed = all(ok for ok, _ in cases)
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def demo(args: argparse.Namespace) -> int:
    """``deploy-ctc demo``: checks what it needs, then runs :func:`deploy_ctc.demo.run`; returns the exit code."""
    exporter_needs = DEMO_NEEDS if args.exporter == "dynamo" else tuple(n for n in DEMO_NEEDS if n != "onnxscript")
    missing = [name for name in exporter_needs if _import_failure(name) is not None]
    if missing:
        print(f"deploy-ctc demo needs torch and the onnx extra; missing {', '.join(missing)}: "
              "pip install torch 'deploy_ctc[onnx]'", file=sys.stderr)
        return 2
    from deploy_ctc import demo as demo_module

    return demo_module.run(output=args.output, batch=args.batch, frames=args.frames, exporter=args.exporter,
                           repeats=args.repeats)


def _checkout_benchmark():
    """``benchmarks.bench_cpu`` of the source checkout deploy_ctc runs from (or the working directory is), else None.

    The benchmarks ship with the source, not the wheel.
    """
    for root in (Path(deploy_ctc.__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks" / "bench_cpu.py").is_file() and (root / "kernels" / "ctc_cpu.cpp").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module("benchmarks.bench_cpu")
    return None


def bench(args: argparse.Namespace) -> int:
    """``deploy-ctc bench``: the CPU benchmark of a source checkout; returns the exit code."""
    module = _checkout_benchmark()
    if module is None:
        print("deploy-ctc bench runs benchmarks/bench_cpu.py, which ships with the source, not the wheel: in a "
              "clone of deploy_ctc, run `python benchmarks/bench_cpu.py` (needs torch: pip install '.[test]')",
              file=sys.stderr)
        return 2
    return module.main(args.bench_options, prog="deploy-ctc bench")


def ort_library(args: argparse.Namespace) -> int:
    """``deploy-ctc ort-library``: the library's path, or a copy built at ``--output``; returns the exit code."""
    return native_library.run_command(portable=args.portable, output=args.output, cuda=args.cuda)


class _Parser(argparse.ArgumentParser):
    """argparse, with the "unknown command" message naming the command and the known ones."""

    def error(self, message):
        if "invalid choice" in message and "argument COMMAND" in message:
            command = message.split("invalid choice: ", 1)[1].split(" ", 1)[0]
            message = (f"unknown command {command}; the commands are check, demo, bench, ort-library "
                       "(see deploy-ctc --help)")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``deploy-ctc`` argument parser: one subcommand per task, plain-text help."""
    parser = _Parser(prog="deploy-ctc", description="CTC loss with the behaviour of torch.nn.CTCLoss for NumPy, "
                     "CuPy (CUDA), torch and ONNX Runtime: check the installation, run the ONNX demo, run the "
                     "CPU benchmark, or locate / build the native ONNX Runtime library.")
    parser.add_argument("--version", action="version", version=f"deploy_ctc {deploy_ctc.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)

    check_parser = commands.add_parser(
        "check", help="report versions, backends, threads and the build cache; run a self-test",
        description="Report the versions of deploy_ctc and its optional dependencies, the CPU and CUDA backends "
                    "(and why one is unusable), the worker threads and the native engine's build cache, then run a "
                    "self-test: an analytic single-path case, and parity with torch float64 when torch is "
                    "installed. Prints PASS or FAIL; the exit code is 0 or 1.")
    check_parser.set_defaults(run=check)

    demo_parser = commands.add_parser(
        "demo", help="export an acoustic model with its CTC loss to ONNX and run it in ONNX Runtime",
        description="Build a small acoustic model (conv front-end and BiLSTM over 80-dim features, 30 classes) whose "
                    "forward ends in the CTC loss, export it with the loss to ONNX, evaluate the loss in plain "
                    "onnxruntime and with deploy_ctc's native library, and print parity with torch and timings. "
                    "Synthetic data, no downloads. Needs torch and deploy_ctc[onnx].")
    demo_parser.add_argument("--output", type=Path, default=None,
                             help="where to write the ONNX model (default: a temporary file, deleted at the end)")
    demo_parser.add_argument("--batch", type=_positive, default=8, help="utterances per batch (default 8)")
    demo_parser.add_argument("--frames", type=_positive, default=200,
                             help="frames of the longest utterance (default 200)")
    demo_parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                             help="torch's ONNX exporter (default dynamo)")
    demo_parser.add_argument("--repeats", type=_positive, default=10,
                             help="timed runs per path; the median is reported (default 10)")
    demo_parser.set_defaults(run=demo)

    bench_parser = commands.add_parser(
        "bench", add_help=False, help="the CPU benchmark against torch (from a source checkout)",
        description="Run benchmarks/bench_cpu.py of a source checkout; its options follow (deploy-ctc bench --help).")
    bench_parser.set_defaults(run=bench)  # its options are the benchmark's, passed on unparsed

    library_parser = commands.add_parser(
        "ort-library", help="the native ONNX Runtime custom-op library: its path, or a portable copy to ship",
        description="Print the path of deploy_ctc's native ONNX Runtime custom-op library (building it on first "
                    "use; it needs ONNX Runtime's C headers: $DEPLOY_CTC_ORT_INCLUDE or /usr/include/onnxruntime), "
                    "or build a copy at --output, with --portable for other machines (no -march=native).")
    library_parser.add_argument("--portable", action="store_true",
                                help="generic code for shipping (Triton, devices), no -march=native")
    library_parser.add_argument("--output", type=Path, default=None,
                                help="build a fresh copy at this path instead of using the cache")
    library_parser.add_argument("--cuda", action="store_true",
                                help="the CUDA variant (built with nvcc): the CPU ops, also for "
                                     "CUDAExecutionProvider (not yet run on a GPU)")
    library_parser.set_defaults(run=ort_library)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deploy-ctc`` console script; returns the exit code (argparse exits 2 on bad usage)."""
    parser = build_parser()
    args, unparsed = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if unparsed and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
    args.bench_options = unparsed
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)



if __name__ == "__main__":
    sys.exit(main())
