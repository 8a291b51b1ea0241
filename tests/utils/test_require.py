"""tests/utils/require.py and the conftest hooks: under DEPLOY_CTC_REQUIRE, a skip for a listed capability (or for
no known one) fails the run; other skips stay skips."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import require

ROOT = Path(__file__).resolve().parents[2]

#: Skip reasons the suite gives (pytest's own wording for importorskip included) and what each says is missing.
REASONS = {
    "could not import 'torch': No module named 'torch'": ["torch"],
    "torch (the test extra) is the float64 oracle": ["torch"],
    "README.md:57 needs torch: pip install 'deploy_ctc[test]'": ["torch"],
    "transformers is in the test extra": ["torch"],
    "could not import 'onnxscript': No module named 'onnxscript'": ["onnx"],
    "README.md:90 needs onnxruntime: pip install 'deploy_ctc[onnx]' (onnxruntime >= 1.20, not the training build)":
        ["onnx"],
    "the native engine cannot be built here (no C++ compiler)": ["native"],
    "no C++ compiler (g++ or $CXX) to build the CUDA kernel harness": ["native"],
    "needs g++ and the onnxruntime wheel's capi/libonnxruntime.so.*": ["native"],
    "the native ONNX Runtime library is unavailable here: no onnxruntime_c_api.h": ["ortlib"],
    "the CUDA ONNX Runtime library cannot be built here: nvcc was not found": ["ortcuda"],
    "needs a GPU and onnxruntime's CUDAExecutionProvider": ["gpu"],
    "NVRTC is not loadable (libnvrtc.so: cannot open); pip install deploy_ctc[cuda-build]": ["nvrtc"],
    "could not import 'cupy_backends.cuda.libs.nvrtc': No module named 'cupy_backends'": ["nvrtc"],
    "README.md:200 needs cupy: pip install 'deploy_ctc[cuda]'": ["nvrtc"],
    "needs CuPy and a CUDA GPU": ["gpu"],
    "giving a directory to another user needs root": ["root"],
    "README.md:300 needs gpu: a CUDA GPU": ["gpu"],
    "needs onnxruntime-training (pip install deploy_ctc[train], own environment: bash .ci/training.sh)": ["train"],
    "README.md:420 needs onnxruntime.training: the [train] extra's own venv (bash .ci/training.sh)": ["train"],
    "needs Linux /proc to measure a process's peak memory": ["linux"],
    "deploy_ctc is installed in editable mode: no wheel contents to inspect": ["installed"],
}


@pytest.mark.parametrize("reason", REASONS)
def test_each_skip_reason_names_its_capability(reason):
    assert require.capabilities_missing(reason) == REASONS[reason]


def test_unknown_capabilities_are_refused():
    assert require.required({require.ENV: " torch, native ,"}) == {"torch", "native"}
    with pytest.raises(ValueError, match="torchh"):
        require.required({require.ENV: "torchh"})


if os.environ.get("DEPLOY_CTC_SKIP_PROBE"):
    def test_probe():
        pytest.skip(os.environ["DEPLOY_CTC_SKIP_PROBE"])


def run_probe(reason, required):
    env = {**os.environ, "DEPLOY_CTC_SKIP_PROBE": reason, require.ENV: required,
           "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"{Path(__file__).relative_to(ROOT)}::test_probe"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("reason,required,fails", [
    ("the native engine cannot be built here (no C++ compiler)", "native,torch", True),
    ("needs CuPy and a CUDA GPU", "native,torch", False),
    ("for no reason anyone wrote down", "native", True),
    ("for no reason anyone wrote down", "", False),
])
def test_required_skips_fail_the_run(reason, required, fails):
    result = run_probe(reason, required)
    assert (result.returncode == 1 if fails else result.returncode == 0), result.stdout + result.stderr
    assert ("1 failed" if fails else "1 skipped") in result.stdout, result.stdout
