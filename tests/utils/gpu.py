"""Whether a CUDA GPU is usable here, for tests that need one."""

from __future__ import annotations


def gpu_count() -> int:
    """CUDA devices CuPy can use: 0 when CuPy is not installed or the CUDA runtime finds no driver or device.

    Only those two errors mean "no GPU"; anything else (a broken CuPy install, a bug) propagates and fails the
    tests that asked.
    """
    try:
        import cupy
    except ImportError:
        return 0
    from cupy_backends.cuda.api.runtime import CUDARuntimeError

    try:
        return cupy.cuda.runtime.getDeviceCount()
    except CUDARuntimeError:
        return 0
