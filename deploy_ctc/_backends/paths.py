"""Which path each sample took through a CPU backend: the fast scaled recursions, or the exact log-space redo.

Both CPU backends run every sample through scaled probability-space recursions first and redo exactly, in log
space, the samples whose accuracy check fails (peaky outputs that disagree with the target, NaN). A defect in the
fast recursions therefore still gives correct numbers, only many times slower; recording the paths is what makes
it visible (to the tests and to ``deploy-ctc check``).

Nothing is recorded unless a :func:`recording` block is active (the backends then pay one truthiness test per
call). While one is, every CPU backend call in the process, on any thread, appends a :class:`PathRecord`: front
ends such as ONNX Runtime or torch's autograd may call the backend from a thread of their own. The CUDA backend
has a single (log-space) path and records nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PathRecord:
    """One backend call.

    Attributes:
        backend: ``"native"`` or ``"numpy"``.
        samples: how many samples ran the recursions (feasible ones with at least one frame).
        exact: batch indices of the samples among them redone exactly in log space, increasing.
        parts: pieces of work the call handed to the worker threads at once (1: all on the calling thread).
    """

    backend: str
    samples: int
    exact: tuple[int, ...]
    parts: int

    @property
    def fast(self) -> int:
        """Samples whose fast result passed its check."""
        return self.samples - len(self.exact)


@dataclass
class PathStats:
    """The :class:`PathRecord` of every CPU backend call made while a :func:`recording` block was active."""

    records: list[PathRecord] = field(default_factory=list)

    @property
    def fast(self) -> int:
        """Samples that took the fast path, over all calls."""
        return sum(record.fast for record in self.records)

    @property
    def exact(self) -> int:
        """Samples redone exactly, over all calls."""
        return sum(len(record.exact) for record in self.records)


_active: list[PathStats] = []
_lock = threading.Lock()


@contextlib.contextmanager
def recording() -> Iterator[PathStats]:
    """Record the paths of every CPU backend call in the process during the block (blocks may nest)."""
    stats = PathStats()
    with _lock:
        _active.append(stats)
    try:
        yield stats
    finally:
        with _lock:
            _active.remove(stats)


def recording_now() -> bool:
    """Whether a :func:`recording` block is active (a backend may then skip gathering what :func:`record` takes)."""
    return bool(_active)


def record(backend: str, samples: np.ndarray, exact: np.ndarray, parts: int) -> None:
    """Report one call: ``samples`` ``(R,)`` the batch indices that ran the recursions, ``exact`` those of them
    redone exactly, ``parts`` the pieces of work dispatched to threads. A no-op unless a block is recording."""
    if not _active:
        return
    entry = PathRecord(backend, int(samples.size), tuple(int(n) for n in np.sort(exact)), int(parts))
    with _lock:
        for stats in _active:
            stats.records.append(entry)
