"""deploy_ctc's native ONNX Runtime custom-op library: ``kernels/ort_ops.cpp`` built on first use.

The library serves ``deploy_ctc::CTCLoss``, ``deploy_ctc::CTCLossGrad`` and ``deploy_ctc::CTCAlign`` (float32 /
float64 log-probs, int32 / int64 targets and lengths) on ONNX Runtime's CPU execution provider by calling the native
CPU engine (``kernels/ctc_cpu.cpp``, ``kernels/ctc_align_cpu.cpp``) on the session's own buffers: no copy, no Python
in the loop, results bit-identical to :func:`deploy_ctc.ctc_loss` / :func:`deploy_ctc.ctc_loss_and_grad` /
:func:`deploy_ctc.forced_align`. It exports one symbol, ``RegisterCustomOps``,
links no libonnxruntime and uses ONNX Runtime's C API version 17, so the same file loads in every onnxruntime from
1.17 on (onnxruntime-training 1.19.2 included) and in any host: Python, C/C++ (``RegisterCustomOpsLibrary_V2``),
Triton's onnxruntime backend.

**Build.** Like the CPU engine, on first use in a process, with the system's C++ compiler, into deploy_ctc's verified
per-user cache (:mod:`deploy_ctc._backends.native_cache`), for this machine's CPU (``-march=native``); later processes
load the cached file. The build compiles the engine too: about 10 s of CPU. It needs ONNX Runtime's C API header
``onnxruntime_c_api.h``, which no onnxruntime wheel ships: it is looked for in ``$DEPLOY_CTC_ORT_INCLUDE``, then
``/usr/include/onnxruntime`` (Debian / Ubuntu: ``apt-get install libonnxruntime-dev``; on Debian 12,
``.ci/ort_headers.sh`` unpacks Debian 13's package into a private folder). A copy for other machines (generic
code, no ``-march=native``)::

    deploy-ctc ort-library --portable --output libdeploy_ctc_ort.so

Where the library cannot be built (no headers, no compiler), :func:`library_path` raises
:class:`NativeUnavailable` saying what is missing; :func:`deploy_ctc.onnx.session_options` then leaves the
SessionOptions alone and sessions run the models' portable function bodies.

**CUDA.** ``library_path(cuda=True)`` (``deploy-ctc ort-library --cuda``) builds the CUDA variant with nvcc: the
same CPU ops plus ``CTCLoss`` / ``CTCLossGrad`` / ``CTCAlign`` for ``CUDAExecutionProvider``, for sessions on a GPU
(:mod:`deploy_ctc.onnx.native_library_cuda`: why a second file, where nvcc comes from). Not yet run on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from deploy_ctc._backends.kernel_sources import kernel_sources_dir
from deploy_ctc._backends.native_cache import NATIVE_TARGETS, SHARED_FLAGS, NativeUnavailable, build_library, \
    find_compiler
from deploy_ctc.onnx import native_library_cuda as cuda_build

__all__ = ["INCLUDE_ENV", "NativeUnavailable", "build_command", "describe", "include_dir", "library_path"]

#: Environment variable naming the folder that holds ``onnxruntime_c_api.h``.
INCLUDE_ENV = "DEPLOY_CTC_ORT_INCLUDE"
#: Where Debian's and Ubuntu's ``libonnxruntime-dev`` install the headers.
SYSTEM_INCLUDE = Path("/usr/include/onnxruntime")
HEADER = "onnxruntime_c_api.h"

SOURCE = "ort_ops.cpp"
#: The engine's translation units, compiled beside SOURCE into the library as into the engine's own.
ENGINE_SOURCES = ("ctc_cpu.cpp", "ctc_align_cpu.cpp")
#: Other files of the kernels folder the build reads: the export list.
DEPENDS = ("ort_ops.map",)
VERSION_SCRIPT = "ort_ops.map"
SYMBOL = "RegisterCustomOps"
#: Compile flags: the engine's, with every symbol hidden but RegisterCustomOps (also enforced by the version script,
#: so the bundled engine and C++ runtime symbols cannot clash with the host's or with the ctypes-loaded engine).
FLAGS = ("-std=c++17", "-O3", "-fopenmp-simd", "-fno-trapping-math", "-fvisibility=hidden", "-fvisibility-inlines-hidden")
#: Link flags: export RegisterCustomOps only, and leave no symbol undefined but the C/C++ runtime's (no
#: libonnxruntime: the host hands over its API table).
LINK_FLAGS = ("-Wl,--version-script={kernels}/" + VERSION_SCRIPT, "-Wl,-z,defs")
#: Portable code for shipping: generic x86-64 / aarch64, no -march=native.
PORTABLE_TARGET = ()

_lock = threading.Lock()
_paths: dict[bool, str] = {}  # cuda -> the built library
_failures: dict[bool, NativeUnavailable] = {}


def include_dir() -> Path:
    """The folder holding ONNX Runtime's ``onnxruntime_c_api.h``: ``$DEPLOY_CTC_ORT_INCLUDE``, else the system's.

    Raises:
        NativeUnavailable: neither holds the header (the message says how to get it).
    """
    configured = os.environ.get(INCLUDE_ENV, "").strip()
    candidates = ([Path(configured)] if configured else []) + [SYSTEM_INCLUDE]
    for candidate in candidates:
        if (candidate / HEADER).is_file():
            return candidate.resolve()
    tried = " or ".join(str(candidate) for candidate in candidates)
    hint = (f"{INCLUDE_ENV} names a folder without {HEADER}" if configured else
            f"set {INCLUDE_ENV} to the folder holding it, or install Debian/Ubuntu's libonnxruntime-dev")
    raise NativeUnavailable(f"ONNX Runtime's C API header {HEADER} was not found in {tried} ({hint}; no "
                            f"onnxruntime wheel ships it; on Debian 12, .ci/ort_headers.sh fetches Debian 13's "
                            f"package into a private folder)")


def build_command(output, target=None, cuda: bool = False) -> list[str]:
    """The compiler command building the library (``cuda``: its CUDA variant) at ``output`` for ``target`` (``()``:
    portable code; None: this machine's CPU), as the cache builds it.

    Raises:
        NativeUnavailable: no compiler (nvcc for ``cuda``), no headers, an incomplete installation.
    """
    kernels = _kernels()
    if cuda:
        nvcc = cuda_build.find_nvcc()
        target = cuda_build.NATIVE_TARGETS[0] if target is None else target
        return [nvcc, *cuda_build.compile_flags(FLAGS), *cuda_build.toolkit_flags(nvcc), *target, f"-I{kernels}",
                f"-I{include_dir()}", *cuda_build.SHARED_FLAGS, *(str(kernels / name) for name in cuda_build.SOURCES),
                "-o", str(output), *(flag.format(kernels=kernels) for flag in cuda_build.LINK_FLAGS)]
    target = NATIVE_TARGETS[0] if target is None else target
    return [find_compiler(), *FLAGS, *target, f"-I{kernels}", f"-I{include_dir()}", *SHARED_FLAGS,
            *(str(kernels / name) for name in (SOURCE, *ENGINE_SOURCES)), "-o", str(output),
            *(flag.format(kernels=kernels) for flag in LINK_FLAGS)]


def library_path(cuda: bool = False) -> str:
    """Path of the custom-op library (register it with ``SessionOptions.register_custom_ops_library``), built on
    first use; thread-safe (concurrent first calls build once).

    Args:
        cuda: the CUDA variant (the CPU ops, plus CTCLoss, CTCLossGrad and CTCAlign for
            ``CUDAExecutionProvider``), built with nvcc; for sessions on a GPU. Not yet run on a GPU.

    Raises:
        NativeUnavailable: no ONNX Runtime headers, no C++ compiler (nvcc or the CUDA runtime for ``cuda``), or a
            failed build; the message says which and how to provide it. The failure is remembered for the process.
    """
    with _lock:
        if cuda not in _paths and cuda not in _failures:
            try:
                _paths[cuda] = str(_build_cuda() if cuda else _build())
            except NativeUnavailable as error:
                _failures[cuda] = error
        if cuda in _failures:
            raise _failures[cuda]
        return _paths[cuda]


def describe() -> str:
    """One line for ``deploy-ctc check``: the library's path, or why there is none."""
    try:
        return f"native library {library_path()}"
    except NativeUnavailable as error:
        return f"native library unavailable ({error})"


def _kernels() -> Path:
    try:
        return kernel_sources_dir()
    except FileNotFoundError as error:
        raise NativeUnavailable(str(error)) from None


def _build() -> Path:
    kernels, include = _kernels(), include_dir()
    return build_library("deploy_ctc_ort", [SOURCE, *ENGINE_SOURCES], symbols=[SYMBOL], compile_flags=FLAGS,
                         link_flags=[flag.format(kernels=kernels) for flag in LINK_FLAGS], include_dirs=[include],
                         depends=[*(kernels / name for name in DEPENDS), include / HEADER],
                         description="the native ONNX Runtime library")


def _build_cuda() -> Path:
    kernels, include = _kernels(), include_dir()
    nvcc = cuda_build.find_nvcc()
    return build_library("deploy_ctc_ort_cuda", cuda_build.SOURCES, symbols=[SYMBOL],
                         compile_flags=[*cuda_build.compile_flags(FLAGS), *cuda_build.toolkit_flags(nvcc)],
                         link_flags=[flag.format(kernels=kernels) for flag in cuda_build.LINK_FLAGS],
                         include_dirs=[include], depends=[*(kernels / name for name in cuda_build.DEPENDS),
                                                          include / HEADER],
                         target_flags=cuda_build.NATIVE_TARGETS, compiler=nvcc,
                         shared_flags=cuda_build.SHARED_FLAGS,
                         description="the native ONNX Runtime library with CUDA kernels")


def run_command(portable: bool = False, output: Path | None = None, cuda: bool = False) -> int:
    """``deploy-ctc ort-library``: print the library's path (building it if needed), or build a copy at ``output``
    (default ``libdeploy_ctc_ort.so``, ``libdeploy_ctc_ort_cuda.so`` with ``cuda``) when ``output`` or ``portable``
    is given; returns the exit code."""
    try:
        if output is None and not portable:
            print(library_path(cuda=cuda))
            return 0
        output = Path(output or ("libdeploy_ctc_ort_cuda.so" if cuda else "libdeploy_ctc_ort.so")).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        command = build_command(output, PORTABLE_TARGET if portable else None, cuda=cuda)
    except NativeUnavailable as error:
        print(f"deploy_ctc: {error}", file=sys.stderr)
        return 1
    print(" ".join(command))
    return subprocess.run(command).returncode


def _after_fork_in_child():
    """A child forked while another thread held the lock (building, say) must not wait for a thread it lacks; the
    cache's record lock is not inherited, so the child finds the parent's build or builds on its own."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
