"""Skips that must not happen: ``DEPLOY_CTC_REQUIRE`` names what an environment is meant to have (CI sets it in
``.ci/run``), and a test skipped for want of one of those becomes a failure (hooks in ``tests/conftest.py``).

A skip is attributed to a capability by its reason, so every skip in the suite says what is missing in words
these patterns know (``pytest.importorskip``'s "could not import 'torch'" included); where the variable is set, a
skip whose reason names no capability fails too, so a new kind of skip cannot go unnoticed in CI. Run from a
checkout without the variable, skips stay skips.
"""

from __future__ import annotations

import os
import re

ENV = "DEPLOY_CTC_REQUIRE"

#: Capability -> pattern of the skip reasons that mean it is missing (case-sensitive).
CAPABILITIES = {
    # The test extra: torch, and what the torch tests use with it (transformers)
    "torch": re.compile(r"could not import 'torch'|the test extra|needs torch\b|deploy_ctc\[test\]"),
    "onnx": re.compile(r"could not import 'onnx\w*'|the onnx extra|deploy_ctc\[onnx\]|"
                       r"needs onnx(runtime|script)?\b(?![.-]training)"),
    "native": re.compile(r"native engine|C\+\+ compiler|needs g\+\+"),
    # deploy_ctc's native ONNX Runtime custom-op library (built against the headers DEPLOY_CTC_ORT_INCLUDE names)
    "ortlib": re.compile(r"native ONNX Runtime library"),
    # Its CUDA variant, built with nvcc (the ort-cuda extra's nvidia-cuda-nvcc, or a CUDA toolkit)
    "ortcuda": re.compile(r"CUDA ONNX Runtime library"),
    # CuPy and NVRTC (the cuda-build extra): the CUDA kernels compile, and run on the CPU harness
    "nvrtc": re.compile(r"NVRTC|cuda-build|could not import 'cupy|needs cupy\b|deploy_ctc\[cuda\]"),
    "gpu": re.compile(r"\bGPU\b|needs gpu\b"),
    "train": re.compile(r"onnxruntime[.-]training|deploy_ctc\[train\]"),
    "linux": re.compile(r"/proc\b|os\.fork"),
    "root": re.compile(r"needs root\b"),
    # The package installed from a wheel (not editable), the tests run outside the checkout (tests/test_packaging.py)
    "installed": re.compile(r"not installed as a distribution|installed in editable mode|lists installed"),
}


def required(environ=os.environ) -> set:
    """The capabilities ``DEPLOY_CTC_REQUIRE`` lists (comma-separated).

    Raises:
        ValueError: a name that is not in :data:`CAPABILITIES`.
    """
    names = {name.strip() for name in environ.get(ENV, "").split(",") if name.strip()}
    unknown = names - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"{ENV} names unknown capabilities {sorted(unknown)}; known: {', '.join(CAPABILITIES)}")
    return names


def capabilities_missing(reason: str) -> list:
    """The capabilities whose absence the skip ``reason`` reports."""
    return [name for name, pattern in CAPABILITIES.items() if pattern.search(reason)]


def skip_reason(report) -> str:
    """The reason text of a skipped test or collection report."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)
