"""The README's NumPy usage example runs as written and gives torch's numbers."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_numpy_usage_example_matches_torch():
    torch = pytest.importorskip("torch")
    namespace = {}
    exec(_python_blocks()[0], namespace)  # noqa: S102 - our own documentation
    # The last example: unbatched (T, C) input with 0-d lengths, reduction="mean".
    lp, targets = namespace["log_probs"], namespace["targets"]
    T, length = namespace["T"], int(namespace["target_length"])
    expected = torch.nn.functional.ctc_loss(torch.from_numpy(lp), torch.from_numpy(targets), torch.tensor(T),
                                            torch.tensor(length))
    assert np.isclose(float(namespace["loss"]), float(expected), rtol=1e-10)
