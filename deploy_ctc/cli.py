"""The ``deploy-ctc`` command.

- ``deploy-ctc check``: versions, available backends and extras, and a parity self-test against torch float64 (when
  torch is installed) plus an analytic single-path case and a check that each CPU backend keeps ordinary inputs on
  its fast path (always); prints PASS/FAIL, exits 0/1.
- ``deploy-ctc bench``: the CPU benchmark against torch (``benchmarks/bench_cpu.py``, from a source checkout).
- ``deploy-ctc demo``: export an acoustic model with its CTC loss to ONNX and evaluate it in ONNX Runtime
  (:mod:`deploy_ctc.demo`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np

import deploy_ctc
from deploy_ctc._backends import cpu as cpu_backends
from deploy_ctc._backends.cpu import native_build
from deploy_ctc.backends import path_stats

OPTIONAL = [("torch", "test"), ("cupy", "cuda"), ("onnx", "onnx"), ("onnxruntime", "onnx"),
            ("onnxruntime_extensions", "onnx"), ("onnxscript", "onnx")]


def _version(module_name):
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return getattr(module, "__version__", "installed")


def _gpu_status():
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - ImportError or CUDARuntimeError: no usable GPU
        return "unavailable"
    return f"{count} device(s)"


def _single_path_case():
    """T = 3 frames, target (1, 1): the only alignment is 1, blank, 1, so the loss is -sum of those log-probs."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 1, 4))
    lp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    expected = -(lp[0, 0, 1] + lp[1, 0, 0] + lp[2, 0, 1])
    got = deploy_ctc.ctc_loss(lp, np.array([[1, 1]]), [3], [2], reduction="sum")
    return abs(float(got) - expected) <= 1e-12 * abs(expected), f"single path: |{float(got):.12f} - {expected:.12f}|"


def _torch_parity_cases(backend):
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
        ref.sum().backward()
        with cpu_backends.using(backend):
            loss, grad = deploy_ctc.ctc_loss_and_grad(lp.numpy(), targets, il, tl, blank, reduction, True)
        err = max(float(np.max(np.abs(loss - ref.detach().numpy()))), float(np.max(np.abs(grad - x.grad.numpy()))))
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


def check(argv=None):
    """``deploy-ctc check``: environment report and self-test; returns the exit code."""
    argparse.ArgumentParser(prog="deploy-ctc check", description="versions, backends and a self-test").parse_args(argv)
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
    print(f"  cupy    {'GPU ' + _gpu_status() if _version('cupy') else 'not installed'}")
    print(f"  onnx    {'available' if _version('onnxruntime') and _version('onnx') else 'not installed'}")
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


def bench(argv=None):
    """``deploy-ctc bench``: the CPU benchmark of a source checkout; returns the exit code."""
    module = _checkout_benchmark()
    if module is None:
        print("deploy-ctc bench runs benchmarks/bench_cpu.py, which ships with the source, not the wheel: in a "
              "clone of deploy_ctc, run `python benchmarks/bench_cpu.py` (needs torch: pip install '.[test]')",
              file=sys.stderr)
        return 2
    return module.main(argv, prog="deploy-ctc bench")


def main(argv=None):
    """Entry point of the ``deploy-ctc`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"check": check, "bench": bench, "demo": "deploy_ctc.demo"}
    if not argv or argv[0] not in commands:
        asked = argv[:1] in (["-h"], ["--help"])
        print("usage: deploy-ctc {check,bench,demo} [options]\n\n" + __doc__.split("\n\n", 1)[1].strip(),
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    command, rest = commands[argv[0]], argv[1:]
    if callable(command):
        return command(rest)
    return importlib.import_module(command).main(rest)


if __name__ == "__main__":
    sys.exit(main())
