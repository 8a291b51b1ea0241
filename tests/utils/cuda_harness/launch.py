"""``kernels/ctc_launch.cu`` on the CPU harness: the host code of the ONNX Runtime library's CUDA ops (launch plan,
workspace layout, upload block, small kernels of its own) with the kernels of ``ctc.cu``, compiled as C++ with
``cuda_runtime_shim.h`` and run from NumPy arrays.

:func:`build_launch` compiles ``launch_entry.cpp``; :class:`LaunchHarness` calls its entry points the way
``kernels/ort_cuda_ops.cpp`` calls ``dctc_cuda::run`` / ``dctc_cuda::align``, after building the host block as that
file does (targets padded to ``S = max(target_lengths)``, lengths, ``d_loss`` divisors).
"""

from __future__ import annotations

import ctypes
import hashlib
import subprocess
from pathlib import Path

import numpy as np

from deploy_ctc._backends.kernel_sources import kernel_sources_dir
from tests.utils.cuda_harness import HERE, ORDERS, compiler

KINDS = {"loss": 0, "grad": 1, "align": 2}
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
#: Byte of the workspace and the outputs before a call: NaN in every float type, so a read of memory nothing wrote
#: and an output element nothing wrote both show.
POISON = 0xFF


def build_launch(cache_dir: Path, sanitize: bool = False) -> Path:
    """Compiles ``launch_entry.cpp`` (which includes ``kernels/ctc_launch.cu``) into ``cache_dir``."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the CUDA harness")
    kernels = kernel_sources_dir()
    flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas"]
    if sanitize:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in [*sorted(HERE.glob("*.h")), HERE / "launch_entry.cpp", *sorted(kernels.glob("*.cu*")),
                 kernels / "ctc_launch.h"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    library = Path(cache_dir) / f"dctc_launch_{digest.hexdigest()[:16]}.so"
    if not library.exists():
        partial = library.with_suffix(".tmp")
        result = subprocess.run([cxx, *flags, f"-I{HERE}", f"-I{kernels}", str(HERE / "launch_entry.cpp"), "-o",
                                 str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the CUDA launch harness failed:\n{result.stderr}")
        partial.replace(library)
    return library


def build_ort_library(cache_dir: Path, include_dir: Path) -> Path:
    """The ONNX Runtime library's CUDA ops (``kernels/ort_cuda_ops.cpp`` with ``ort_ops.cpp``'s validation) built for
    the CPU provider (``-DDEPLOY_CTC_ORT_CUDA_ON_CPU``), their launches running on the harness: a CPU session then runs
    every line of the CUDA ops' host code. ``include_dir`` holds ONNX Runtime's ``onnxruntime_c_api.h``."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the CUDA harness")
    kernels = kernel_sources_dir()
    sources = [kernels / name for name in ("ort_ops.cpp", "ort_cuda_ops.cpp", "ctc_cpu.cpp", "ctc_align_cpu.cpp")]
    sources.append(HERE / "launch_entry.cpp")
    flags = ["-std=c++17", "-O0", "-fPIC", "-shared", "-fvisibility=hidden", "-DDEPLOY_CTC_ORT_CUDA",
             "-DDEPLOY_CTC_ORT_CUDA_ON_CPU", f"-I{HERE}", f"-I{kernels}", f"-I{include_dir}"]
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in [*sources, *sorted(HERE.glob("*.h")), *sorted(kernels.glob("*.cu*")), *sorted(kernels.glob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    library = Path(cache_dir) / f"dctc_ort_on_cpu_{digest.hexdigest()[:16]}.so"
    if not library.exists():
        partial = library.with_suffix(".tmp")
        result = subprocess.run([cxx, *flags, *map(str, sources), "-o", str(partial),
                                 f"-Wl,--version-script={kernels / 'ort_ops.map'}"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the harness's ONNX Runtime library failed:\n{result.stderr}")
        partial.replace(library)
    return library


def _sizes(T, N, C, S, blank):
    return (ctypes.c_longlong * 5)(T, N, C, S, blank)


def _pointer(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


class LaunchHarness:
    """Runs ``dctc_cuda::run`` / ``dctc_cuda::align`` of a :func:`build_launch` library under a thread order."""

    def __init__(self, library: Path, order: str = "forward", seed: int = 0):
        self._lib = ctypes.CDLL(str(library))
        for name in ("dctc_run_float", "dctc_run_double", "dctc_align_float", "dctc_align_double",
                     "dctc_capture_problem", "dctc_launches"):
            getattr(self._lib, name).restype = ctypes.c_char_p
        for name in ("dctc_upload_words", "dctc_workspace_bytes"):
            getattr(self._lib, name).restype = ctypes.c_ulonglong
        self.order, self.seed = ORDERS[order], seed
        self.launches: list[str] = []  # "<grid x>x<grid y> <block> <shared bytes>" of the last call, in order

    def workspace_bytes(self, kind: str, T, N, C, S, itemsize) -> int:
        return self._lib.dctc_workspace_bytes(KINDS[kind], _sizes(T, N, C, S, 0), ctypes.c_ulonglong(itemsize))

    def capture_problem(self, capturing: bool) -> str:
        return self._lib.dctc_capture_problem(int(capturing)).decode()

    def _upload(self, kind, targets, il, tl, reduction):
        """The host block of ctc_launch.h: padded targets (N, S), input_lengths, target_lengths, divisors."""
        N = len(il)
        S = int(tl.max(initial=0))
        padded = np.zeros((N, S), np.int64)  # (N, S)
        for n in range(N):
            padded[n, :tl[n]] = targets[n, :tl[n]]
        divisor = N * np.maximum(tl, 1).astype(np.float64) if reduction == "mean" else np.ones(N)  # (N,)
        block = np.concatenate([padded.reshape(-1) if N * S else np.zeros(1, np.int64), il, tl,
                                divisor.view(np.int64)])
        assert len(block) == self._lib.dctc_upload_words(KINDS[kind], _sizes(0, N, 0, S, 0))
        return block, S

    def _call(self, kind, lp, targets, il, tl, blank, reduction):
        T, N, C = lp.shape
        il, tl = np.asarray(il, np.int64), np.asarray(tl, np.int64)
        upload, S = self._upload(kind, np.asarray(targets, np.int64), il, tl, reduction)
        sizes = _sizes(T, N, C, S, blank)
        workspace = np.full(self.workspace_bytes(kind, T, N, C, S, lp.itemsize), POISON, np.uint8)
        return sizes, upload, workspace

    def _finish(self, error: bytes):
        self.launches = self._lib.dctc_launches().decode().splitlines()
        if error:
            raise RuntimeError(error.decode())

    def run(self, lp, targets, il, tl, blank=0, reduction="mean", zero_infinity=False, d_loss=None):
        """CTCLoss (``d_loss`` None): the loss, ``(N,)`` for "none"; else CTCLossGrad's ``(T, N, C)`` gradient.

        ``lp`` (T, N, C) C-contiguous float32/64, ``targets`` (N, >= max(tl)) padded.
        """
        lp = np.ascontiguousarray(lp)
        kind = "loss" if d_loss is None else "grad"
        sizes, upload, workspace = self._call(kind, lp, targets, il, tl, blank, reduction)
        T, N, C = lp.shape
        shape = (T, N, C) if d_loss is not None else ((N,) if reduction == "none" else ())
        out = np.full(shape, np.nan, lp.dtype)
        d = np.ascontiguousarray(d_loss if d_loss is not None else np.zeros(1), dtype=lp.dtype)
        entry = self._lib.dctc_run_float if lp.dtype == np.float32 else self._lib.dctc_run_double
        self._finish(entry(KINDS[kind], sizes, REDUCTIONS[reduction], int(zero_infinity), _pointer(upload),
                           _pointer(workspace), _pointer(lp), _pointer(d), ctypes.c_longlong(d.size), _pointer(out),
                           self.order, ctypes.c_ulonglong(self.seed)))
        return out

    def align(self, lp, targets, il, tl, blank=0):
        """CTCAlign: ``(alignment (T, N) int64, scores (T, N))``."""
        lp = np.ascontiguousarray(lp)
        sizes, upload, workspace = self._call("align", lp, targets, il, tl, blank, "mean")
        T, N, _ = lp.shape
        alignment = np.full((T, N), -7, np.int64)
        scores = np.full((T, N), np.nan, lp.dtype)
        entry = self._lib.dctc_align_float if lp.dtype == np.float32 else self._lib.dctc_align_double
        self._finish(entry(sizes, _pointer(upload), _pointer(workspace), _pointer(lp), _pointer(alignment),
                           _pointer(scores), self.order, ctypes.c_ulonglong(self.seed)))
        return alignment, scores
