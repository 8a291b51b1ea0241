"""Where the kernel sources are: ``kernels/`` (the C++ engine, the CUDA kernels and their shared headers).

The sources live at the top level of the repository and ship inside the wheel at ``deploy_ctc/kernels/``
(pyproject force-includes the folder there); both the CPU engine's build and the CUDA loader compile them at run
time from the folder this module finds.
"""

from __future__ import annotations

from pathlib import Path

#: Files whose presence marks a complete kernels folder.
_MARKERS = ("ctc.cu", "ctc_cpu.cpp")


def kernel_sources_dir() -> Path:
    """The folder holding the kernel sources: the installed package's copy, else the source tree's.

    Raises:
        FileNotFoundError: neither folder holds every source (an incomplete installation).
    """
    package = Path(__file__).resolve().parents[1]  # deploy_ctc/
    candidates = (package / "kernels", package.parent / "kernels")
    for candidate in candidates:
        if all((candidate / name).is_file() for name in _MARKERS):
            return candidate
    raise FileNotFoundError(f"kernel sources {', '.join(_MARKERS)} not found in {candidates[0]} or "
                            f"{candidates[1]}; the deploy_ctc installation is incomplete")
