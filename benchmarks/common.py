"""What every benchmark shares: the one input generator and the one timer.

:func:`make_inputs` draws the CTC problems all benchmarks time; :func:`interleaved_medians` times a set of
implementations in alternating rounds (wall clock by default, CUDA events in ``gpu_check.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import numpy as np

def make_inputs(T, N, C, S, seed=0, logit_scale=1.0, lengths="full"):
    """A CTC problem: float32 log-probabilities ``(T, N, C)``, padded int64 targets ``(N, S)`` in ``[1, C)``, input
    and target lengths ``(N,)`` int64.

    The log-probabilities are the log_softmax of standard normal logits times ``logit_scale`` (larger scales give
    confident, peaky outputs that disagree with the random targets). ``lengths="full"``: every input length is
    ``T``, target lengths are uniform in ``[S/2, S]``. ``lengths="varied"``: target lengths uniform in
    ``[S/3, S]`` and input lengths in ``[min(T, max(3T/4, 5S/4)), T]`` (room for repeated labels), the first
    sample at ``S`` and ``T``, so the padded shape is exactly ``(T, N, C)`` and ``(N, S)``.
    """
    if lengths not in ("full", "varied"):
        raise ValueError(f"lengths must be 'full' or 'varied', got {lengths!r}")
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((T, N, C), dtype=np.float32) * np.float32(logit_scale)
    logits -= logits.max(axis=2, keepdims=True)  # a stable log_softmax at any scale
    log_probs = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
    targets = rng.integers(1, C, size=(N, S), dtype=np.int64)
    if lengths == "full":
        input_lengths = np.full(N, T, dtype=np.int64)
        target_lengths = rng.integers(S // 2, S + 1, size=N, dtype=np.int64)
    else:
        target_lengths = rng.integers(S // 3, S + 1, size=N, dtype=np.int64)
        input_lengths = rng.integers(min(T, max(T * 3 // 4, S + S // 4)), T + 1, size=N, dtype=np.int64)
        target_lengths[0], input_lengths[0] = S, T
    return log_probs.astype(np.float32), targets, input_lengths, target_lengths


def wall_seconds(run: Callable[[], object]) -> float:
    """Seconds ``run()`` takes by the wall clock (``time.perf_counter``)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def interleaved_medians(runners: Mapping[str, Callable[[], object]], repeats: int, progress=None, slow_s=None,
                        timer: Callable[[Callable[[], object]], float] = wall_seconds, warmup: int = 1) -> dict:
    """Median seconds of each callable in ``runners`` (a dict), timed in alternating rounds after ``warmup`` runs
    each, so every one sees the same machine load.

    With ``slow_s``, a first warm-up longer than ``slow_s`` per callable cuts the rounds to one;
    ``progress(done, total)`` is called after each round; ``timer(run)`` returns the seconds one call takes.
    """
    start = time.perf_counter()
    for run in runners.values():
        run()
    if slow_s is not None and time.perf_counter() - start > slow_s * len(runners):
        repeats = 1
    for _ in range(warmup - 1):
        for run in runners.values():
            run()
    times: dict = {name: [] for name in runners}
    for i in range(repeats):
        for name, run in runners.items():
            times[name].append(timer(run))
        if progress:
            progress(i + 1, repeats)
    return {name: statistics.median(values) for name, values in times.items()}
