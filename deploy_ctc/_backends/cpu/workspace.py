"""Reusable scratch memory for the NumPy backend.

Each call of the backend needs tables of ``T x 2N x (2S + 3)`` floats. Fresh NumPy arrays of that size come from
``mmap`` and are returned to the system when freed, so every call pays a page fault per 4 KiB touched -- measured at a
third of the run time for the smaller benchmark shapes on a 2-core VM. A :class:`Workspace` keeps those buffers between
calls, one workspace per calling thread (its pipeline's worker threads use the caller's workspace, under distinct
names), up to ``limit_bytes`` each; larger requests get fresh, uncached memory. :func:`release` drops the cached buffers
of the calling thread.
"""

from __future__ import annotations

import threading

import numpy as np

DEFAULT_LIMIT_BYTES = 256 << 20


class Workspace:
    """Named scratch buffers, reused while their capacity suffices.

    ``array(name, shape, dtype)`` returns an uninitialised C-contiguous array viewing the buffer ``name``; a
    second request for the same name invalidates the first view's contents (callers use one name per role).
    """

    def __init__(self, limit_bytes=DEFAULT_LIMIT_BYTES):
        self.limit_bytes = limit_bytes
        self._buffers: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # a call's pipeline stages take buffers from worker threads too

    def array(self, name, shape, dtype=np.float64):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with self._lock:
            buffer = self._buffers.get(name)
            if buffer is None or buffer.nbytes < nbytes:
                cached = sum(b.nbytes for key, b in self._buffers.items() if key != name)
                if cached + nbytes > self.limit_bytes:
                    return np.empty(shape, dtype=dtype)
                buffer = self._buffers[name] = np.empty(max(nbytes, 1), dtype=np.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape)

    def release(self):
        with self._lock:
            self._buffers.clear()


_local = threading.local()


def current():
    """The calling thread's workspace."""
    workspace = getattr(_local, "workspace", None)
    if workspace is None:
        workspace = _local.workspace = Workspace()
    return workspace


def release():
    """Free the calling thread's cached scratch buffers (they are re-created on the next call)."""
    current().release()
