"""The native CPU engine ``kernels/ctc_cpu.cpp`` (and its forced alignment, ``kernels/ctc_align_cpu.cpp``): built
on first use by :mod:`deploy_ctc._backends.native_cache` and loaded with ctypes.

Like the CUDA kernels, the C++ source ships inside the wheel and is compiled at run time, for the machine it runs on
(``-march=native``, with fallbacks for compilers that refuse it), into the verified per-user cache (see
:mod:`~deploy_ctc._backends.native_cache`: ``$DEPLOY_CTC_CACHE_DIR``, default ``$XDG_CACHE_HOME/deploy_ctc`` or
``~/.cache/deploy_ctc``); later processes load it without compiling. A build takes a few seconds (about 3 s on a
2-core VM) and is logged at INFO level. No compiler, or a failed build, raises :class:`NativeUnavailable` with the
reason; deploy_ctc then runs the pure NumPy backend (:mod:`deploy_ctc._backends.cpu`).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from ..native_cache import NativeUnavailable, build_library

__all__ = ["ALIGN_ENTRY_POINTS", "ALIGN_SOURCE", "ENTRY_POINTS", "FLAGS", "NLL_ENTRY_POINTS", "NativeUnavailable",
           "SOURCE", "describe", "entry_points", "library"]

#: The translation unit of the CPU engine, in the kernels folder.
SOURCE = "ctc_cpu.cpp"
#: The forced alignment's translation unit, built into the same library.
ALIGN_SOURCE = "ctc_align_cpu.cpp"

#: Compile flags; -fopenmp-simd honours the source's ``omp simd`` reductions without linking OpenMP, and
#: -fno-trapping-math lets loops with conditional arithmetic vectorize (the engine never reads the floating-point
#: exception flags; every result is the same IEEE operation either way).
FLAGS = ("-std=c++17", "-O3", "-fopenmp-simd", "-fno-trapping-math")

#: Exported entry points, one per input type: losses and gradients (forward and backward passes) ...
ENTRY_POINTS = {"float32": "deploy_ctc_cpu_float", "float64": "deploy_ctc_cpu_double"}
_SIGNATURE = ([ctypes.c_void_p] + [ctypes.c_int64] * 5  # lp; N, C and lp's element strides st, sn, sc
              + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]  # targets .. blank
              + [ctypes.c_void_p, ctypes.c_int64]  # samples, count
              + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]  # grad, grad_scale, plain
              + [ctypes.c_void_p, ctypes.c_void_p])  # nll, ok
#: ... and losses alone (the forward pass).
NLL_ENTRY_POINTS = {"float32": "deploy_ctc_cpu_nll_float", "float64": "deploy_ctc_cpu_nll_double"}
_NLL_SIGNATURE = ([ctypes.c_void_p] + [ctypes.c_int64] * 4  # lp; C and lp's element strides st, sn, sc
                  + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]  # targets ..
                  + [ctypes.c_void_p, ctypes.c_int64]  # samples, count
                  + [ctypes.c_void_p, ctypes.c_void_p])  # nll, ok
#: Forced-alignment entry points, one per input type.
ALIGN_ENTRY_POINTS = {"float32": "deploy_ctc_align_float", "float64": "deploy_ctc_align_double"}
_ALIGN_SIGNATURE = ([ctypes.c_void_p] + [ctypes.c_int64] * 4  # lp; N and lp's element strides st, sn, sc
                    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]  # targets ..
                    + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p])  # samples, count, outputs

_lock = threading.Lock()
_library = None
_failure: NativeUnavailable | None = None
_entry_points: dict = {}  # dtype.char -> (losses only, losses and gradients)


def library():
    """The loaded engine (a :class:`ctypes.CDLL` with typed entry points), built on first use.

    Raises:
        NativeUnavailable: no C++ compiler, a failed build or load (the failure is remembered for the process).
    """
    global _library, _failure, _entry_points
    if _library is not None:  # loaded once per process, never unloaded: no lock needed to read it
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                lib = _load(build_library("ctc_cpu", [SOURCE, ALIGN_SOURCE],
                                          symbols=[*ENTRY_POINTS.values(), *NLL_ENTRY_POINTS.values(),
                                                   *ALIGN_ENTRY_POINTS.values()],
                                          compile_flags=FLAGS, description="the native CPU engine"))
            except NativeUnavailable as error:
                _failure = error
            else:
                # By the dtype's one-letter code (dtype.name costs microseconds per call); set before _library,
                # which callers read without the lock.
                _entry_points = {np.dtype(name).char: (getattr(lib, NLL_ENTRY_POINTS[name]),
                                                       getattr(lib, ENTRY_POINTS[name])) for name in ENTRY_POINTS}
                _library = lib
        if _failure is not None:
            raise _failure
        return _library


def entry_points(dtype) -> tuple:
    """``(losses only, losses and gradients)``: the engine's two typed entry points for ``log_probs`` of ``dtype``
    (float32 or float64).

    Raises:
        NativeUnavailable: the engine cannot be built here.
    """
    library()
    entries = _entry_points.get(dtype.char)
    return entries if entries is not None else _entry_points[np.dtype(dtype.name).char]  # float64 by another letter


def describe():
    """One line for ``deploy-ctc check``: the loaded library's path, or why there is none."""
    try:
        return f"native engine {library()._name}"
    except NativeUnavailable as error:
        return f"native engine unavailable ({error})"


def _load(path):
    try:
        lib = ctypes.CDLL(str(path))
        entries = [(getattr(lib, entry), _SIGNATURE) for entry in ENTRY_POINTS.values()]
        entries += [(getattr(lib, entry), _NLL_SIGNATURE) for entry in NLL_ENTRY_POINTS.values()]
        entries += [(getattr(lib, entry), _ALIGN_SIGNATURE) for entry in ALIGN_ENTRY_POINTS.values()]
    except (OSError, AttributeError) as error:
        raise NativeUnavailable(f"could not load {path}: {error}") from None
    for function, signature in entries:
        function.argtypes, function.restype = signature, ctypes.c_int
    return lib


def _after_fork_in_child():
    """A child forked while another thread held the lock (building, say) must not wait for a thread it lacks."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
