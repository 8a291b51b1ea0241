"""CPU execution harness for the CUDA kernels of ``kernels/*.cu``.

:func:`build` compiles the *unmodified* kernel translation unit as C++17 with ``cuda_shim.h`` (the CUDA built-ins, and a
scheduler that runs each block's threads as cooperative fibers switching at ``__syncthreads`` and warp shuffles) into a
shared library, one C entry point per name expression of :data:`deploy_ctc._backends.cuda.loader.NAME_EXPRESSIONS`.
:class:`Harness` loads it with ctypes and offers the same ``launch(name, grid, block, args, shared_mem)`` as the GPU
launcher, so ``deploy_ctc._backends.cuda.cupy_kernels.run_kernels`` drives it unchanged with NumPy arrays. Each launch
runs under a thread order: ``"forward"``, ``"reverse"`` or ``"random"`` (reshuffled at every scheduling round, seeded).

Arguments are checked against the kernel's parameter types (array dtype and scalar width), a mismatch that
would silently corrupt a launch on the GPU. Set ``DCTC_HARNESS_ASAN=1`` to build with AddressSanitizer
(see kernels/README.md for the run command).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from deploy_ctc._backends.cuda import loader
from deploy_ctc._backends.kernel_sources import kernel_sources_dir

HERE = Path(__file__).resolve().parent
ORDERS = {"forward": 0, "reverse": 1, "random": 2}

# Type code of a kernel parameter (cuda_shim.h's dctc_harness::Code) for each argument NumPy type.
_SCALARS = {np.int32: ("i", ctypes.c_int32), np.int64: ("q", ctypes.c_int64),
            np.float32: ("f", ctypes.c_float), np.float64: ("d", ctypes.c_double)}
_ELEMENTS = {np.dtype(np.int32): "i", np.dtype(np.int64): "q", np.dtype(np.float32): "f",
             np.dtype(np.float64): "d", np.dtype(np.uint8): "B"}


def compiler() -> str | None:
    """The C++ compiler to use ($CXX or g++), or None if there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def sanitize_requested() -> bool:
    return os.environ.get("DCTC_HARNESS_ASAN") == "1"


def _translation_unit(source: str, names: tuple[str, ...]) -> str:
    lines = ['#include "cuda_shim.h"',
             f'#include "{source}"',
             "thread_local __attribute__((aligned(16))) unsigned char dctc_smem[dctc_harness::kMaxDynamicShared];",
             f'extern "C" int dctc_kernel_count() {{ return {len(names)}; }}']
    for i, name in enumerate(names):
        lines += [
            f'extern "C" const char* dctc_name_{i}() {{ return "{name}"; }}',
            f'extern "C" const char* dctc_signature_{i}() {{',
            f"    static const std::string text = dctc_harness::signature(&{name});",
            "    return text.c_str();",
            "}",
            f'extern "C" int dctc_launch_{i}(const unsigned* grid, const unsigned* block, unsigned long long shared,',
            "                                int order, unsigned long long seed, void** args, char* error, int size) {",
            f"    return dctc_harness::run(&{name}, grid, block, shared, order, seed, args, dctc_smem, error, size);",
            "}",
        ]
    return "\n".join(lines) + "\n"


def build(cache_dir: Path, sanitize: bool = False, source_dir: Path | None = None, source: str | None = None,
          names: tuple[str, ...] | None = None) -> Path:
    """Compiles a harness library into ``cache_dir`` (reused while the sources are unchanged).

    By default the package's kernels (``loader.SOURCE`` and ``NAME_EXPRESSIONS``); ``source_dir``,
    ``source`` and ``names`` select another ``.cu`` file, e.g. the harness's own self-test kernels.
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the CUDA harness")
    source_dir = Path(source_dir or kernel_sources_dir())
    source = source or loader.SOURCE
    names = tuple(names or loader.NAME_EXPRESSIONS)
    flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas"]
    if sanitize:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    unit = _translation_unit(source, names)
    digest = hashlib.sha256(unit.encode() + " ".join(flags).encode() + (HERE / "cuda_shim.h").read_bytes())
    for path in sorted(source_dir.glob("*.cu*")):
        digest.update(path.read_bytes())
    library = Path(cache_dir) / f"dctc_harness_{digest.hexdigest()[:16]}.so"
    if not library.exists():
        unit_path = library.with_suffix(".cpp")
        unit_path.write_text(unit)
        partial = library.with_suffix(".tmp")
        result = subprocess.run([cxx, *flags, f"-I{HERE}", f"-I{source_dir}", str(unit_path), "-o", str(partial)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the CUDA harness failed:\n{result.stderr}")
        partial.replace(library)
    return library


class Harness:
    """Runs kernels of a built harness library; ``launch`` mirrors ``RawModuleLauncher.launch``."""

    def __init__(self, library: Path, order: str = "forward", seed: int = 0):
        """``library`` from :func:`build`; ``order`` of the threads at each scheduling round, ``seed`` of "random"."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {tuple(ORDERS)}, got {order!r}")
        self._lib = ctypes.CDLL(str(library))
        self.order = order
        self.seed = seed
        self.launches: list[str] = []  # names of the kernels launched, in order
        self._entries = {}
        for i in range(self._lib.dctc_kernel_count()):
            label = getattr(self._lib, f"dctc_name_{i}")
            label.restype = ctypes.c_char_p
            name = label().decode()
            signature = getattr(self._lib, f"dctc_signature_{i}")
            signature.restype = ctypes.c_char_p
            entry = getattr(self._lib, f"dctc_launch_{i}")
            entry.restype = ctypes.c_int
            self._entries[name] = (entry, signature().decode().rstrip(",").split(","))

    def launch(self, name, grid, block, args, shared_mem=0):
        entry, params = self._entries[name]
        if len(args) != len(params):
            raise TypeError(f"{name}: {len(args)} arguments for {len(params)} parameters")
        keep = [_argument(name, i, arg, code) for i, (arg, code) in enumerate(zip(args, params))]
        pointers = (ctypes.c_void_p * len(keep))(*[ctypes.cast(ctypes.pointer(k), ctypes.c_void_p) for k in keep])
        grid3 = (ctypes.c_uint * 3)(*grid)
        block3 = (ctypes.c_uint * 3)(*block)
        error = ctypes.create_string_buffer(512)
        self.launches.append(name)
        status = entry(grid3, block3, ctypes.c_ulonglong(shared_mem), ctypes.c_int(ORDERS[self.order]),
                       ctypes.c_ulonglong(self.seed), pointers, error, ctypes.c_int(len(error)))
        if status:
            raise RuntimeError(f"{name}: {error.value.decode()}")


def _argument(kernel, index, arg, code):
    """A ctypes object holding ``arg`` as the kernel's parameter ``index`` of type ``code``."""
    if isinstance(arg, np.ndarray):
        got = _ELEMENTS.get(arg.dtype, str(arg.dtype)) + "*"
        if got != code:
            raise TypeError(f"{kernel} parameter {index}: array of {arg.dtype} for a {code} parameter")
        return ctypes.c_void_p(arg.ctypes.data)
    if type(arg) not in _SCALARS:
        raise TypeError(f"{kernel} parameter {index}: {type(arg).__name__} is not a NumPy array or sized scalar")
    got, ctype = _SCALARS[type(arg)]
    if got != code:
        raise TypeError(f"{kernel} parameter {index}: {type(arg).__name__} for a {code} parameter")
    return ctype(arg)
