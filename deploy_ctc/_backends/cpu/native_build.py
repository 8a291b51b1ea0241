"""Building, caching and loading the native CPU engine ``kernels/ctc_cpu.cpp``.

Like the CUDA kernels, the C++ source ships inside the wheel and is compiled at run time: on first use in a process,
with the system's C++ compiler (``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on ``PATH``), into a shared
library that ctypes loads. The library is cached on disk, in ``$DEPLOY_CTC_CACHE_DIR`` (default
``$XDG_CACHE_HOME/deploy_ctc``, else ``~/.cache/deploy_ctc``), under a name that digests the source, the compiler's
version, the flags and the CPU (the build targets the machine it runs on, ``-march=native``); a later process loads it
without compiling. Builds are written to a temporary name and renamed, so concurrent processes never load a
half-written file. Where the cache directory is not writable, the build goes to a per-process temporary directory.

A build takes a few seconds (about 3 s on a 2-core VM) and is logged at INFO level on the ``deploy_ctc._backends.cpu.native_build``
logger. No compiler, or a failed build, raises :class:`NativeUnavailable` with the reason; deploy_ctc then runs the
pure NumPy backend (:mod:`deploy_ctc._backends.cpu`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ..kernel_sources import kernel_sources_dir

#: The translation unit of the CPU engine, in the kernels folder.
SOURCE = "ctc_cpu.cpp"

#: Flags of every build; -fopenmp-simd honours the source's ``omp simd`` reductions without linking OpenMP.
FLAGS = ("-std=c++17", "-O3", "-fopenmp-simd", "-fPIC", "-shared")
#: Extra flags, tried in this order until the compiler accepts them: code for this machine's CPU, with 256-bit
#: vectors preferred on x86 (the recursions' short, frame-to-frame dependent loops ran about twice as fast as with
#: 512-bit vectors on an AMD EPYC), then for this CPU, then generic code.
TARGET_FLAGS = (("-march=native", "-mprefer-vector-width=256"), ("-march=native",), ())

#: Exported entry points, one per input type: losses and gradients (forward and backward passes) ...
ENTRY_POINTS = {"float32": "deploy_ctc_cpu_float", "float64": "deploy_ctc_cpu_double"}
#: ... and losses alone (the forward pass).
NLL_ENTRY_POINTS = {"float32": "deploy_ctc_cpu_nll_float", "float64": "deploy_ctc_cpu_nll_double"}
_SIGNATURE = ([ctypes.c_void_p] + [ctypes.c_int64] * 5  # lp; N, C and lp's element strides st, sn, sc
              + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]  # targets .. blank
              + [ctypes.c_void_p, ctypes.c_int64]  # samples, count
              + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]  # grad, grad_scale, plain
              + [ctypes.c_void_p, ctypes.c_void_p])  # nll, ok
_NLL_SIGNATURE = ([ctypes.c_void_p] + [ctypes.c_int64] * 4  # lp; C and lp's element strides st, sn, sc
                  + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]  # targets ..
                  + [ctypes.c_void_p, ctypes.c_int64]  # samples, count
                  + [ctypes.c_void_p, ctypes.c_void_p])  # nll, ok
_COMPILE_TIMEOUT_S = 300


class NativeUnavailable(RuntimeError):
    """The native engine could not be built or loaded; the message says why."""


_logger = logging.getLogger("deploy_ctc._backends.cpu.native_build")
_lock = threading.Lock()
_library = None
_failure: NativeUnavailable | None = None


def library():
    """The loaded engine (a :class:`ctypes.CDLL` with typed entry points), built on first use.

    Raises:
        NativeUnavailable: no C++ compiler, a failed build or load (the failure is remembered for the process).
    """
    global _library, _failure
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _load(_build())
            except NativeUnavailable as error:
                _failure = error
        if _failure is not None:
            raise _failure
        return _library


def describe():
    """One line for ``deploy-ctc check``: the loaded library's path, or why there is none."""
    try:
        return f"native engine {library()._name}"
    except NativeUnavailable as error:
        return f"native engine unavailable ({error})"


def cache_dir() -> Path:
    """Where built libraries are kept (see the module docstring)."""
    if os.environ.get("DEPLOY_CTC_CACHE_DIR"):
        return Path(os.environ["DEPLOY_CTC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deploy_ctc"


def find_compiler() -> str:
    """Path of the C++ compiler: ``$CXX`` or the first of c++, g++, clang++ on PATH."""
    wanted = os.environ.get("CXX")
    candidates = [wanted] if wanted else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise NativeUnavailable(f"no C++ compiler found (tried {', '.join(candidates)}; set CXX)")


def _build() -> Path:
    compiler = find_compiler()
    try:
        source = kernel_sources_dir() / SOURCE
    except FileNotFoundError as error:
        raise NativeUnavailable(str(error)) from None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeUnavailable(f"{compiler} --version failed: {error}") from None
    common = hashlib.sha256()  # what every build depends on but its flags
    for part in (source.read_bytes(), compiler.encode(), version.encode(), platform.machine().encode(),
                 _cpu_identity().encode()):
        common.update(part)
        common.update(b"\0")
    builds = []  # (flags, file name) in order of preference
    for extra in TARGET_FLAGS:
        flags = FLAGS + extra
        digest = common.copy()
        digest.update(" ".join(flags).encode())
        builds.append((flags, f"ctc_cpu-{digest.hexdigest()[:20]}.so"))
    for _, name in builds:  # an earlier process's build, even with fallback flags, saves a failing compile
        if (cache_dir() / name).is_file():
            return cache_dir() / name
    errors = []
    for flags, name in builds:
        try:
            return _compile(compiler, flags, source, name)
        except NativeUnavailable as error:
            errors.append(str(error))
    raise NativeUnavailable("the build failed:\n" + "\n".join(errors))


def _compile(compiler, flags, source, name) -> Path:
    """Compile ``source`` into ``name`` in the cache (else a temporary directory), via a temporary name."""
    for folder in (cache_dir(), None):
        target = (folder or Path(tempfile.mkdtemp(prefix="deploy_ctc-"))) / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so.partial", delete=False)
            partial.close()
        except OSError:
            continue  # the cache is not writable: build into a temporary directory instead
        _logger.info("building the native CPU engine (once per machine and version): %s %s", compiler,
                     " ".join(flags))
        start = time.perf_counter()
        try:
            result = subprocess.run([compiler, *flags, str(source), "-o", partial.name], capture_output=True,
                                    text=True, timeout=_COMPILE_TIMEOUT_S)
            failure = None if result.returncode == 0 else result.stderr.strip()[-2000:]
        except (OSError, subprocess.SubprocessError) as error:
            failure = str(error)
        if failure is None:
            os.replace(partial.name, target)
            _logger.info("built %s in %.1f s", target, time.perf_counter() - start)
            return target
        os.unlink(partial.name)
        raise NativeUnavailable(f"{compiler} {' '.join(flags)}: {failure}")
    raise NativeUnavailable(f"no writable directory for the build ({cache_dir()} and the temporary directory)")


def _load(path: Path):
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeUnavailable(f"could not load {path}: {error}") from None
    for entries, signature in ((ENTRY_POINTS, _SIGNATURE), (NLL_ENTRY_POINTS, _NLL_SIGNATURE)):
        for entry in entries.values():
            function = getattr(lib, entry)
            function.argtypes, function.restype = signature, ctypes.c_int
    return lib


def _cpu_identity() -> str:
    """The CPU's model and feature flags (what ``-march=native`` depends on), where the OS tells them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))
