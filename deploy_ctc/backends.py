"""Choosing and tuning deploy_ctc's backends (the knobs users set; the backends live in ``deploy_ctc._backends``).

- :func:`using` runs a block of code on one CPU backend (``"auto"``, ``"native"`` or ``"numpy"``) on the calling
  thread; ``DEPLOY_CTC_CPU_BACKEND`` sets the process default.
- :func:`cpu_backend` names the CPU backend NumPy arrays run on now.
- :func:`release_workspace` frees the pure-NumPy backend's cached scratch memory (process-wide).
- :func:`path_stats` records, for a block of code, which samples took the fast path and which were redone exactly
  (a :class:`PathStats` of one :class:`PathRecord` per CPU backend call).
"""

from __future__ import annotations

from ._backends.cpu import CHOICES, ENV, using
from ._backends.cpu import name as cpu_backend
from ._backends.cpu.workspace import release as release_workspace
from ._backends.paths import PathRecord, PathStats
from ._backends.paths import recording as path_stats

__all__ = ["CHOICES", "ENV", "PathRecord", "PathStats", "cpu_backend", "path_stats", "release_workspace", "using"]
