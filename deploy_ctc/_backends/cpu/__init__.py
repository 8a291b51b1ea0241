"""Which backend runs NumPy arrays: the native engine when it builds here, else pure NumPy.

``DEPLOY_CTC_CPU_BACKEND`` chooses: ``auto`` (the default: native, falling back to NumPy with one warning),
``native`` (native, or a RuntimeError saying why not) or ``numpy``. :func:`using` overrides it for a block of code on
the calling thread (the benchmark and ``deploy-ctc check`` run both backends that way).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType

from . import common, native, native_build

ENV = "DEPLOY_CTC_CPU_BACKEND"
CHOICES = ("auto", "native", "numpy")


class _Override(threading.local):
    choice: str | None = None  # per thread: the choice of the innermost using() block, None outside any


_override = _Override()
_warned = False


def current() -> ModuleType:
    """The backend module for NumPy arrays: :mod:`.native` or :mod:`.pure_numpy`, each a
    :class:`deploy_ctc._backends.Backend`.

    Raises:
        ValueError: ``DEPLOY_CTC_CPU_BACKEND`` holds something else than auto, native or numpy, or
            ``DEPLOY_CTC_NUM_THREADS`` something else than a positive integer.
        RuntimeError: ``native`` was asked for and the engine cannot be built (the message says why).
    """
    return _select(warn=True)


def name() -> str:
    """``"native"`` or ``"numpy"``: what :func:`current` would pick now (without warning)."""
    return "numpy" if _select(warn=False).__name__.endswith(".pure_numpy") else "native"


def _select(warn):
    global _warned
    common.pool_size()  # a bad DEPLOY_CTC_NUM_THREADS fails every call, not only one large enough for threads
    choice = _override.choice or _choice_from_environment()
    if choice != "numpy":
        try:
            native_build.library()
            return native
        except native_build.NativeUnavailable as error:
            if choice == "native":
                raise RuntimeError(f"the native CPU backend was asked for, but {error}") from None
            if warn and not _warned:
                _warned = True
                warnings.warn(f"deploy_ctc: {error}; using the slower pure-NumPy CPU backend "
                              f"(set {ENV}=numpy to choose it and silence this warning)", RuntimeWarning,
                              stacklevel=5)
    from . import pure_numpy

    return pure_numpy


@contextlib.contextmanager
def using(choice: str) -> Iterator[None]:
    """Run the block with CPU backend ``choice`` (one of :data:`CHOICES`) on this thread."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    previous = _override.choice
    _override.choice = choice
    try:
        yield
    finally:
        _override.choice = previous


def _choice_from_environment():
    setting = os.environ.get(ENV)
    if setting is None:  # the usual case, read on every call: the variable may be set at any time
        return "auto"
    choice = setting.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {os.environ[ENV]!r}")
    return choice
