"""Finding, compiling and caching the CUDA kernels of ``kernels/*.cu`` for CuPy.

The kernel sources are found by :func:`deploy_ctc._backends.kernel_sources.kernel_sources_dir`. They are
compiled with NVRTC through ``cupy.RawModule`` lazily, once per device, on first use, with the kernels folder
on the include path; CuPy caches the binaries on disk.

The instantiations are listed once, here: :data:`NAME_EXPRESSIONS` is generated from the dtype -> C type table
and is what NVRTC instantiates, what the compile tests check and what the CPU test harness builds.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from ..kernel_sources import kernel_sources_dir

#: The translation unit holding every kernel; it includes the shared header ``ctc.cuh``.
SOURCE = "ctc.cu"

#: C type of each compute dtype.
C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

#: Kernels templated over the float type, and kernels without a template parameter.
TEMPLATED_KERNELS = ("ctc_lattice", "ctc_grad", "ctc_align")
PLAIN_KERNELS = ("ctc_label_links",)


def kernel_name(kernel: str, dtype=None) -> str:
    """The NVRTC name expression of ``kernel`` for compute ``dtype`` (None for a plain kernel)."""
    return kernel if dtype is None else f"{kernel}<{C_TYPES[np.dtype(dtype)]}>"


#: Every kernel instantiation, e.g. ``"ctc_grad<float>"``.
NAME_EXPRESSIONS = PLAIN_KERNELS + tuple(kernel_name(k, d) for k in TEMPLATED_KERNELS for d in C_TYPES)


def source() -> str:
    """Text of the kernel translation unit."""
    return (kernel_sources_dir() / SOURCE).read_text()


def compile_options() -> tuple[str, ...]:
    """NVRTC options: C++17, the kernels folder on the include path, and a digest of every kernel file.

    CuPy's on-disk cache is keyed by the source text and the options but not by included headers; the digest
    define makes an edit of ``ctc.cuh`` invalidate the cached binaries too.
    """
    folder = kernel_sources_dir()
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.cu*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return ("-std=c++17", f"-I{folder}", f"-DDCTC_SOURCES_DIGEST=0x{digest.hexdigest()[:16]}")


class RawModuleLauncher:
    """Launches the kernels of one compiled ``cupy.RawModule`` on the current CuPy stream.

    Same interface as the CPU test harness: ``launch(name, grid, block, args, shared_mem)``.
    """

    def __init__(self, module):
        self._module = module

    def launch(self, name: str, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        self._module.get_function(name)(grid, block, args, shared_mem=shared_mem)


_launchers: dict[int, RawModuleLauncher] = {}
_lock = threading.Lock()


def launcher(device_id: int) -> RawModuleLauncher:
    """The launcher for CUDA device ``device_id``, compiling the kernels for it on first use."""
    with _lock:
        if device_id not in _launchers:
            try:
                import cupy
            except ImportError as error:  # pragma: no cover - callers hold cupy arrays already
                raise ImportError("the CUDA backend needs CuPy: pip install deploy_ctc[cuda]") from error
            with cupy.cuda.Device(device_id):
                module = cupy.RawModule(code=source(), options=compile_options(),
                                        name_expressions=NAME_EXPRESSIONS)
                module.compile()
            _launchers[device_id] = RawModuleLauncher(module)
        return _launchers[device_id]
