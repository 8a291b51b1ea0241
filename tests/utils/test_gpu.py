"""tests/utils/gpu.py: only a missing CuPy or a CUDA runtime error mean "no GPU"; any other error propagates."""

import sys

import pytest

from tests.utils.gpu import gpu_count

cupy = pytest.importorskip("cupy", reason="needs cupy: pip install 'deploy_ctc[cuda]'")


def test_a_missing_cupy_means_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    assert gpu_count() == 0


def test_a_cuda_runtime_error_means_no_gpu(monkeypatch):
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    def no_driver():
        raise CUDARuntimeError(35)  # cudaErrorInsufficientDriver

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", no_driver)
    assert gpu_count() == 0


def test_other_errors_propagate(monkeypatch):
    def broken():
        raise OSError("libcudart.so: invalid ELF header")

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", broken)
    with pytest.raises(OSError, match="invalid ELF header"):
        gpu_count()
