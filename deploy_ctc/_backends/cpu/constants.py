"""Numerical constants the pure-NumPy backend shares with the C++ engine, read from ``kernels/ctc_constants.h``.

The header is their one home: the engine compiles it, and this module parses its
``constexpr double kName = <literal>;`` lines when first imported (see the header for what each one means).
"""

from __future__ import annotations

import math
import re

from ..kernel_sources import kernel_sources_dir

HEADER = "ctc_constants.h"
_DEFINITION = re.compile(r"^constexpr double (k\w+) = ([^;]+);", re.M)


def read_header(path=None) -> dict:
    """``{name: value}`` of every ``constexpr double`` in the header (decimal or hexadecimal literals).

    Raises:
        ValueError: a value that is not a floating literal Python reads exactly.
    """
    text = (kernel_sources_dir() / HEADER if path is None else path).read_text()
    values = {}
    for name, literal in _DEFINITION.findall(text):
        literal = literal.strip()
        try:
            values[name] = float.fromhex(literal) if "0x" in literal.lower() else float(literal)
        except ValueError:
            raise ValueError(f"{HEADER}: {name} = {literal!r} is not a floating literal") from None
    return values


_VALUES = read_header()

#: Relative tolerance of the consistency check of ``log p(l|x)`` across frames.
CONSISTENCY_TOL: float = _VALUES["kConsistencyTol"]
#: Posterior normalisers (frame masses) below this take the exact log-space path.
TINY_MASS: float = _VALUES["kTinyMass"]
#: ``log(TINY_MASS)``, the same bound on ``log Z_t``.
LOG_TINY_MASS: float = math.log(TINY_MASS)
#: Finite emissions more than this many nats below their frame's largest take the exact log-space path.
FLUSH_LOG: float = _VALUES["kFlushLog"]
