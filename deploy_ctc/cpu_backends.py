"""Which backend runs NumPy arrays: the native engine when it builds here, else pure NumPy.

``DEPLOY_CTC_CPU_BACKEND`` chooses: ``auto`` (the default: native, falling back to NumPy with one warning),
``native`` (native or an error saying why not) or ``numpy``.
"""

from __future__ import annotations

import os
import warnings

from . import native_build

ENV = "DEPLOY_CTC_CPU_BACKEND"
CHOICES = ("auto", "native", "numpy")

_warned = False


def current():
    """The backend module for NumPy arrays (``forward_backward(problem, grad_scale, convention)``).

    Raises:
        ValueError: ``DEPLOY_CTC_CPU_BACKEND`` holds something else than auto, native or numpy.
        RuntimeError: ``native`` was asked for and the engine cannot be built (the message says why).
    """
    global _warned
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {os.environ[ENV]!r}")
    if choice != "numpy":
        try:
            native_build.library()
            from . import native_backend

            return native_backend
        except native_build.NativeUnavailable as error:
            if choice == "native":
                raise RuntimeError(f"{ENV}=native, but {error}") from None
            if not _warned:
                _warned = True
                warnings.warn(f"deploy_ctc: {error}; using the slower pure-NumPy CPU backend "
                              f"(set {ENV}=numpy to choose it and silence this warning)", RuntimeWarning,
                              stacklevel=4)
    from . import numpy_backend

    return numpy_backend


def name():
    """``"native"`` or ``"numpy"``: what :func:`current` picks now (without warning)."""
    global _warned
    warned, _warned = _warned, True
    try:
        return current().__name__.rsplit(".", 1)[1].split("_")[0]
    finally:
        _warned = warned
