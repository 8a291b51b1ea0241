"""What the two CPU backends (:mod:`deploy_ctc._backends.cpu.native`, :mod:`deploy_ctc._backends.cpu.pure_numpy`) share:
which samples need the recursions, the exact log-space redo of samples whose fast result failed its check, the rows of
samples with an infinite loss, float16 input computed in float32 a group of samples at a time, and the worker threads
(one pool per process, used by every CPU path).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from . import logspace
from ...validation import CTCProblem


def start(problem, grad_scale):
    """``(nll, grad, grad_scale, run)`` before the recursions.

    ``nll`` ``(N,)`` float64: ``+inf`` for infeasible targets (fewer frames than labels plus the blanks between
    equal neighbours), 0 for an empty target on zero frames, NaN where the recursions will fill it in. ``grad``
    ``(T, N, C)`` zeros in ``log_probs``' dtype, or None without ``grad_scale``. ``run`` ``(N,)`` bool: the samples
    the recursions handle (feasible, at least one frame; and infeasible ones whose used frames hold NaN or ``+inf``
    in a lattice class, whose loss is NaN in torch's recursion rather than ``+inf``).
    """
    lp, targets = problem.log_probs, problem.targets  # (T, N, C), (N, S)
    il, tl = problem.input_lengths, problem.target_lengths  # (N,)
    N, S = targets.shape
    grad = None if grad_scale is None else np.zeros(lp.shape, dtype=lp.dtype)
    if grad is not None:
        grad_scale = np.asarray(grad_scale, dtype=np.float64)
    fewest = _fewest_frames(il)
    if fewest >= max(1, 2 * S - 1):
        # The common case, without a pass over the targets: every sample has at least one frame and room for its
        # labels with a blank between each two (2 S_n - 1 frames), so each is feasible and runs.
        nll, run = np.empty(N), np.empty(N, dtype=bool)
        nll.fill(np.nan)
        run.fill(True)
        return nll, grad, grad_scale, run
    inside = np.arange(1, S) < tl[:, None]  # (N, S - 1) pairs within the target
    repeats = np.add.reduce((targets[:, 1:] == targets[:, :-1]) & inside, axis=1)  # (N,) counts
    feasible = il >= tl + repeats  # (N,)
    if not np.logical_and.reduce(feasible):
        framed = il > 0 if fewest == 0 else True  # (N,) samples with a frame (all of them when fewest > 0)
        for n in np.flatnonzero(~feasible & framed):
            classes = np.append(targets[n, : tl[n]], problem.blank)  # (tl + 1,)
            if not (lp[: il[n], n][:, classes] < np.inf).all():  # NaN or +inf on the lattice
                feasible[n] = True
    nll = np.where(feasible, np.nan, np.inf)  # (N,)
    if fewest > 0:
        return nll, grad, grad_scale, feasible
    nll[(il == 0) & (tl == 0)] = 0.0
    return nll, grad, grad_scale, feasible & (il > 0)


def _fewest_frames(il) -> int:
    """``min(input_lengths)`` (a short batch through a list: a NumPy reduction costs more than the whole list)."""
    return min(il.tolist()) if il.size <= 64 else int(il.min())


def finish(problem, nll, grad):
    """Rows of samples with a non-finite loss: NaN, or 0 for +inf under zero_infinity (torch's behaviour)."""
    if grad is not None and not math.isfinite(np.add.reduce(nll)):  # one reduction when every loss is finite
        for n in np.flatnonzero(~np.isfinite(nll) & (problem.input_lengths > 0)):
            zero = problem.zero_infinity and nll[n] == np.inf
            grad[: problem.input_lengths[n], n, :] = 0.0 if zero else np.nan
    return nll, grad


# float16 input: batches whose float32 copy stays below _HALF_WHOLE_BYTES are upcast whole; larger ones in groups of
# samples of at most _HALF_GROUP_BYTES (and at most an eighth of the batch), so the float32 copy and its gradient
# stay a fraction of the float16 input and gradient instead of twice their size each.
_HALF_WHOLE_BYTES = 16 << 20
_HALF_GROUP_BYTES = 32 << 20


def in_float32_groups(problem, grad_scale, convention, forward_backward):
    """``forward_backward`` (a backend's) on float16 ``problem.log_probs`` ``(T, N, C)``: each group of samples is
    upcast to float32 (exactly), computed, and its gradient rounded once into the float16 ``(T, N, C)`` result.

    Returns:
        ``(nll (N,) float64, grad (T, N, C) float16 or None)``, the Backend protocol's results.
    """
    lp = problem.log_probs  # (T, N, C) float16
    T, N, C = lp.shape
    per_sample = T * C * 4  # bytes of one sample's float32 copy
    group = N if per_sample * N <= _HALF_WHOLE_BYTES else max(1, min(_HALF_GROUP_BYTES // per_sample, -(-N // 8)))
    nll = np.empty(N)
    grad = None if grad_scale is None else np.empty(lp.shape, dtype=np.float16)
    for n0 in range(0, N, group):
        part = slice(n0, min(N, n0 + group))
        sub = dataclasses.replace(problem, log_probs=lp[:, part].astype(np.float32), targets=problem.targets[part],
                                  input_lengths=problem.input_lengths[part],
                                  target_lengths=problem.target_lengths[part])
        nll[part], sub_grad = forward_backward(sub, None if grad_scale is None else grad_scale[part], convention)
        if grad is not None:
            grad[:, part] = sub_grad
    return nll, grad


def redo_exact(problem, samples, nll, grad, grad_scale, convention):
    """Recompute ``samples`` with the exact log-space recursions and write them into ``nll`` / ``grad``."""
    sub = CTCProblem(xp=np, log_probs=problem.log_probs[:, samples], targets=problem.targets[samples],
                     input_lengths=problem.input_lengths[samples], target_lengths=problem.target_lengths[samples],
                     blank=problem.blank, reduction=problem.reduction, zero_infinity=problem.zero_infinity,
                     batched=True, out_dtype=problem.out_dtype)
    sub_nll, sub_grad = logspace.forward_backward(sub, None if grad is None else grad_scale[samples],
                                                         convention)
    nll[samples] = sub_nll
    if grad is not None:
        grad[:, samples] = sub_grad


def deal(samples, cost, workers):
    """Split ``samples`` into up to ``workers`` int64 arrays of similar total cost: in decreasing cost, dealt back
    and forth across the parts (0, 1, ..., w-1, w-1, ..., 1, 0, 0, 1, ...), so each part stays in decreasing cost
    (the engine's lanes get similar lengths) and, per round of 2w samples, every part gets a large and a small
    one. Vectorized: hundreds of thousands of samples are dealt in milliseconds."""
    order = np.ascontiguousarray(samples[_decreasing(cost)], dtype=np.int64)  # (R,)
    if workers <= 1 or samples.size <= 1:
        return [order]
    rank = np.arange(order.size) % (2 * workers)
    part = np.where(rank < workers, rank, 2 * workers - 1 - rank)  # (R,) the back-and-forth deal
    return [order[part == p] for p in range(workers) if (part == p).any()]



def _decreasing(cost):
    """The stable argsort of ``-cost`` (R,): through 16-bit keys when the costs span fewer than 2^16 values, which
    NumPy sorts by radix, several times faster than 64-bit keys for the hundred thousand samples of a batch of short
    ones."""
    if cost.size:
        low, high = int(cost.min()), int(cost.max())
        if high - low < 1 << 16:
            return np.argsort((high - cost).astype(np.uint16), kind="stable")
    return np.argsort(-cost, kind="stable")


def run_parts(call, parts):
    """``call(part)`` for each of ``parts`` (from :func:`deal`): inline for one part, else on :func:`pool`'s
    threads, all submitted before any is waited on; a part's error is raised here (the first in order)."""
    if len(parts) == 1:
        call(parts[0])
        return
    for done in [pool().submit(call, part) for part in parts]:
        done.result()


THREADS_ENV = "DEPLOY_CTC_NUM_THREADS"


@lru_cache(maxsize=1)
def pool_size():
    """Worker threads of :func:`pool`: ``$DEPLOY_CTC_NUM_THREADS``, else the CPUs this process may run on.

    Raises:
        ValueError: ``DEPLOY_CTC_NUM_THREADS`` is not a positive integer.
    """
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))  # a container's or taskset's CPU limit, where the OS tells it
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=1)
def pool():
    """The backends' shared worker threads (NumPy loops and the native engine release the GIL)."""
    return ThreadPoolExecutor(pool_size(), thread_name_prefix="deploy_ctc", initializer=_mark_worker)


def workers():
    """How many of :func:`pool`'s threads a call may spread its work over: :func:`pool_size`, or 1 on one of those
    threads. A call made from inside a task (a callback that runs deploy_ctc, say) then runs inline: were every
    worker to wait on subtasks queued behind it, none would be left to run them.

    Raises:
        ValueError: ``DEPLOY_CTC_NUM_THREADS`` is not a positive integer.
    """
    return 1 if getattr(_worker, "marked", False) else pool_size()


_worker = threading.local()


def _mark_worker():
    _worker.marked = True


# A forked child (a DataLoader worker, say) inherits the pool object but not its threads: give it a new one.
os.register_at_fork(after_in_child=pool.cache_clear)
os.register_at_fork(after_in_child=pool_size.cache_clear)
