"""Peak memory of one call, measured on a whole child process (Linux): how far the resident set's high-water mark
(VmHWM) rose above the resident set just before the call, whoever allocated the memory (NumPy, the native
engine's ``malloc``, worker threads), which tracemalloc cannot all see.

The child builds the inputs, makes one small warm-up call (imports, the native engine's load, the worker threads),
resets the high-water mark (``5`` to ``/proc/self/clear_refs``) and runs the call once. glibc is told to map every
block above 64 KiB on its own (``MALLOC_MMAP_THRESHOLD_``), so memory freed before the call goes back to the system
and memory the call allocates shows up as growth, not as reuse of a cached heap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from tests.utils.peak_memory import _measure
print(json.dumps(_measure(sys.argv[2], json.loads(sys.argv[3]))))
"""


def supported() -> bool:
    """Whether this system can reset and report the high-water mark (Linux /proc)."""
    return os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")


def peak_growth(scenario: str, **params) -> int:
    """Peak resident-set growth in bytes of ``scenario`` run in a child process.

    ``scenario`` names ``module:function``; ``function(**params)`` builds the inputs and returns
    ``(warm_up, call)``, two callables without arguments: a small call through the same path, and the one measured.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)}
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(sys.path), scenario, json.dumps(params)],
                            capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"the peak-memory child failed:\n{result.stdout}\n{result.stderr}")
    return int(json.loads(result.stdout.strip().splitlines()[-1]))


def backend_call(backend, T, N, C, S, dtype="float32", broadcast=False, with_grad=True):
    """Scenario: backend module ``backend`` on a random full-length batch of ``dtype`` (with ``broadcast``, one
    sample's log-probs broadcast over the batch), loss and gradient or (without ``with_grad``) the loss alone."""
    import importlib

    import numpy as np

    from deploy_ctc import validation
    from tests.utils import oracles

    module = importlib.import_module(backend)
    rng = np.random.default_rng(0)

    def problem(T, N, C, S):
        lp = oracles.random_log_probs(rng, T, 1 if broadcast else N, C, np.float32).astype(dtype)
        tl = np.full(N, S)
        targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
        return validation.validate(np.broadcast_to(lp, (T, N, C)), targets, np.full(N, T), tl, 0, "none", False)

    big, small = problem(T, N, C, S), problem(4, 2, 5, 2)
    return ((lambda: module.forward_backward(small, np.ones(2) if with_grad else None)),
            (lambda: module.forward_backward(big, np.ones(N) if with_grad else None)))


def _measure(scenario, params):
    import gc
    import importlib

    module, function = scenario.split(":")
    warm_up, call = getattr(importlib.import_module(module), function)(**params)
    warm_up()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the high-water mark restarts from the current resident set
    resident = _status_kib("VmRSS")
    call()
    return max(0, _status_kib("VmHWM") - resident) * 1024


def _status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
