"""The CUDA build of deploy_ctc's ONNX Runtime custom-op library: the CPU ops of ``kernels/ort_ops.cpp`` plus
``CTCLoss`` / ``CTCLossGrad`` / ``CTCAlign`` for ``CUDAExecutionProvider`` (``kernels/ort_cuda_ops.cpp``, launching
the kernels of ``kernels/ctc.cu`` through ``kernels/ctc_launch.cu``), compiled by nvcc.

**Why a second library.** The CPU library must build with nothing but a C++ compiler and load on any machine; this
one needs nvcc. ONNX Runtime accepts one library per domain on a SessionOptions, so the CUDA library registers the
CPU ops too: a CUDA session places each node on either provider from one file. The CUDA runtime is linked statically
(``-cudart static``) and ``libcuda`` is opened only at the first CUDA call (a CUDA op's run), so the file loads, and
serves CPU sessions, on machines without a GPU or a driver. Device code for sm_80 and sm_90 (A100, H100/H200), in
one file.

**nvcc** is looked for in ``$DEPLOY_CTC_NVCC`` (a path), ``$CUDA_HOME/bin``, the pip package ``nvidia-cuda-nvcc``
in this Python environment (``pip install deploy_ctc[ort-cuda]``, which brings the CUDA runtime's headers and
``libcudart_static.a`` with it), then ``PATH``. The build also needs ONNX Runtime's C header, found as for the CPU
library (:func:`deploy_ctc.onnx.native_library.include_dir`).

Compiled and checked without a GPU (no spills, exported symbols, no dynamic CUDA dependency, CPU sessions, and the
CUDA ops' host code on the CPU test harness); the CUDA ops of this library have not run on a GPU yet.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from deploy_ctc._backends.native_cache import NativeUnavailable

__all__ = ["NVCC_ENV", "ARCHITECTURES", "compile_flags", "find_nvcc", "toolkit_flags"]

#: Environment variable naming the nvcc to use.
NVCC_ENV = "DEPLOY_CTC_NVCC"
#: GPU architectures the library carries device code for.
ARCHITECTURES = ("80", "90")
#: Sources compiled into the library, in the kernels folder: the ORT glue and the CPU engine (host compiler through
#: nvcc), and the launch code that includes ctc.cu (device and host code).
SOURCES = ("ort_ops.cpp", "ort_cuda_ops.cpp", "ctc_cpu.cpp", "ctc_align_cpu.cpp", "ctc_launch.cu")
#: Files read through #include or by the linker that the cache key must cover (headers beside the sources are
#: covered already).
DEPENDS = ("ctc.cu", "ort_ops.map")
#: nvcc's device-code flags: SASS for each of ARCHITECTURES.
GENCODE = tuple(flag for arch in ARCHITECTURES for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}"))
#: nvcc's own flags (it passes -std and -O to the host compiler too).
NVCC_FLAGS = ("-std=c++17", "-O3", *GENCODE, "-cudart", "static", "-DDEPLOY_CTC_ORT_CUDA")
#: Link flags: export RegisterCustomOps only; nothing undefined but the C/C++ runtime's (no libonnxruntime, no
#: libcudart, no libcuda).
LINK_FLAGS = ("-Xlinker", "--version-script={kernels}/ort_ops.map", "-Xlinker", "-z,defs")
SHARED_FLAGS = ("-shared",)
#: Host-code target flags tried in order (the CPU library's NATIVE_TARGETS through -Xcompiler).
NATIVE_TARGETS: tuple[tuple[str, ...], ...] = (("-Xcompiler", "-march=native,-mprefer-vector-width=256"),
                                               ("-Xcompiler", "-march=native"), ())
#: The pip package's layout: <site-packages>/nvidia/<cu13 | cuda_nvcc>/bin/nvcc.
_PIP_LAYOUTS = ("cu13", "cu12", "cuda_nvcc")


def compile_flags(host_flags: Sequence[str]) -> tuple[str, ...]:
    """nvcc's flags for the library: :data:`NVCC_FLAGS`, then ``-fPIC`` and the CPU library's ``host_flags`` (but its
    ``-std`` and ``-O``, which nvcc passes on itself) through ``-Xcompiler``, so the CPU engine inside is compiled as in
    the CPU library."""
    host = [flag for flag in host_flags if not flag.startswith(("-std=", "-O"))]
    return (*NVCC_FLAGS, "-Xcompiler", ",".join(("-fPIC", *host)))


def find_nvcc() -> str:
    """Path of nvcc: ``$DEPLOY_CTC_NVCC``, ``$CUDA_HOME/bin/nvcc``, the ``nvidia-cuda-nvcc`` pip package, ``PATH``.

    Raises:
        NativeUnavailable: none found (the message says how to get one).
    """
    configured = os.environ.get(NVCC_ENV, "").strip()
    if configured:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return os.path.abspath(configured)
        raise NativeUnavailable(f"{NVCC_ENV}={configured!r} is not an executable file")
    tried = []
    candidates = []
    cuda_home = os.environ.get("CUDA_HOME", "").strip()
    if cuda_home:
        candidates.append(Path(cuda_home) / "bin" / "nvcc")
    spec = importlib.util.find_spec("nvidia")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidates.extend(Path(folder) / layout / "bin" / "nvcc" for layout in _PIP_LAYOUTS)
    for candidate in candidates:
        tried.append(str(candidate))
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    tried.append("nvcc on PATH")
    raise NativeUnavailable(f"nvcc was not found (tried {', '.join(tried)}): pip install deploy_ctc[ort-cuda] "
                            f"(the nvidia-cuda-nvcc wheel), install the CUDA toolkit, or set {NVCC_ENV} or CUDA_HOME")


def toolkit_flags(nvcc: str) -> list[str]:
    """``-I`` / ``-L`` flags for the CUDA runtime's headers and static library beside ``nvcc``.

    nvcc reports its own search folders (``--dryrun``); a pip installation keeps the library in ``lib`` where nvcc
    looks in ``lib64``, so the folders next to nvcc's ``bin`` are tried too.

    Raises:
        NativeUnavailable: ``cuda_runtime.h`` or ``libcudart_static.a`` is missing (named, with the folders tried).
    """
    try:
        report = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeUnavailable(f"{nvcc} could not be run: {error}") from None
    text = report.stdout + report.stderr
    top = re.search(r"^#\$ TOP=(.*)$", text, re.M)
    root = Path(top.group(1)).resolve() if top else Path(nvcc).resolve().parent.parent
    reported = re.findall(r'"-[IL]([^"]+)"', text)
    wanted = {"cuda_runtime.h": [*reported, root / "include", *sorted(root.glob("targets/*/include"))],
              "libcudart_static.a": [*reported, root / "lib", root / "lib64", *sorted(root.glob("targets/*/lib"))]}
    found = {name: next((Path(d).resolve() for d in folders if (Path(d) / name).is_file()), None)
             for name, folders in wanted.items()}
    include, lib = found["cuda_runtime.h"], found["libcudart_static.a"]
    if include is None or lib is None:
        missing = [f"{name} (looked in {', '.join(dict.fromkeys(map(str, wanted[name])))})"
                   for name, folder in found.items() if folder is None]
        raise NativeUnavailable(f"the CUDA runtime beside {nvcc} lacks {' and '.join(missing)}: install the "
                                f"nvidia-cuda-runtime wheel (pip install deploy_ctc[ort-cuda]) or a full CUDA toolkit")
    return [f"-I{include}", f"-L{lib}"]
