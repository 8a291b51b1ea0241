"""Type aliases of the public API.

CuPy is optional and ships no type information, so a CuPy array is ``Any`` to a static checker: the aliases name
what is accepted for the reader, and keep NumPy's types where they apply.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import numpy.typing as npt

#: ``log_probs``, losses and gradients: a NumPy array, or a CuPy array on a GPU.
Array = Union[np.ndarray, Any]
#: Targets and lengths: an integer array (NumPy or CuPy), a sequence of ints, or (lengths) an int.
IntArrayLike = Union[npt.ArrayLike, Any]
