"""Reusable scratch memory for the NumPy backend, bounded process-wide.

Each call of the backend needs tables of ``T x 2N x (2S + 3)`` floats. Fresh NumPy arrays of that size come from
``mmap`` and are returned to the system when freed, so every call pays a page fault per 4 KiB touched -- measured
at a third of the run time for the smaller benchmark shapes on a 2-core VM. A :class:`Workspace` keeps those
buffers between calls, up to ``limit_bytes``; larger requests get fresh, uncached memory.

A call borrows a workspace from one process-wide pool for its duration (:func:`borrowed`; its pipeline's worker
threads use it under distinct names) and gives it back at the end. Idle workspaces in the pool hold at most
``POOL_LIMIT_BYTES`` in all, whatever the number of threads that ever called: a workspace that would exceed it is
freed when given back. Concurrent calls each hold their own workspace while they run. :func:`release` empties
the pool.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numpy as np

DEFAULT_LIMIT_BYTES = 256 << 20
#: Bytes the idle workspaces of the pool may hold in all.
POOL_LIMIT_BYTES = 256 << 20


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
        nbytes = math.prod(int(d) for d in shape) * dtype.itemsize  # Python ints: no wrap-around
        with self._lock:
            buffer = self._buffers.get(name)
            if buffer is None or buffer.nbytes < nbytes:
                cached = sum(b.nbytes for key, b in self._buffers.items() if key != name)
                if cached + nbytes > self.limit_bytes:
                    return np.empty(shape, dtype=dtype)
                buffer = self._buffers[name] = np.empty(max(nbytes, 1), dtype=np.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached buffers."""
        with self._lock:
            return sum(b.nbytes for b in self._buffers.values())

    def release(self):
        with self._lock:
            self._buffers.clear()


_idle: list[Workspace] = []  # the pool: workspaces no call holds, most recently returned last
_idle_lock = threading.Lock()


@contextmanager
def borrowed():
    """A workspace for one call, taken from the pool (or new) and given back when the call ends."""
    with _idle_lock:
        workspace = _idle.pop() if _idle else Workspace()
    try:
        yield workspace
    finally:
        with _idle_lock:
            if sum(w.nbytes for w in _idle) + workspace.nbytes <= POOL_LIMIT_BYTES:
                _idle.append(workspace)
            else:
                workspace.release()  # dropped: the pool is full


def cached_bytes() -> int:
    """Bytes the idle workspaces of the pool hold."""
    with _idle_lock:
        return sum(w.nbytes for w in _idle)


def release() -> None:
    """Free the cached scratch buffers of every idle workspace (they are re-created on the next call)."""
    with _idle_lock:
        for workspace in _idle:
            workspace.release()
