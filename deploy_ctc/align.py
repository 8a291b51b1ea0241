r"""CTC forced alignment: the most probable alignment of each target to its frames (batched Viterbi).

The max-product twin of the CTC loss, on the same lattice: over the extended labels
``l' = (blank, l_0, blank, ..., l_{S-1}, blank)`` (positions ``s = 0 .. 2S``, blanks at even ``s``),

.. math::

    \delta_0(0) = y_0(\text{blank}), \quad \delta_0(1) = y_0(l_0), \qquad
    \delta_t(s) = y_t(l'_s) + \max\big(\delta_{t-1}(s),\ \delta_{t-1}(s-1),\
                  [l'_s \ne \text{blank},\ l'_s \ne l'_{s-2}]\ \delta_{t-1}(s-2)\big)

with ``y_t(c) = log_probs[t, n, c]``, and the best path ends at ``2S - 1`` or ``2S``. The alignment is that path's
label at each frame; its scores sum to the maximum, over all alignments that collapse to the target, of the summed
log-probabilities.

Conventions, the same on every backend (NumPy, native engine, CUDA, ONNX, torch):

- **Arithmetic**: ``delta`` is accumulated in float64 frame by frame, whatever the input dtype, so ties are decided
  on identical values everywhere.
- **Ties** (deterministic): at each step back, the path stays in its state (``s``) rather than advancing from
  ``s - 1``, and advances from ``s - 1`` rather than skipping from ``s - 2``; at the last frame it ends on the last
  label rather than on the trailing blank. Among equally good alignments this picks, comparing from the last frame
  backwards, the one ending on the last label, then the one in the later lattice position at each earlier frame:
  each label starts as early as possible (tests/utils/oracles.py states it on whole paths). This is
  ``torchaudio.functional.forced_align``'s rule (torchaudio 2.11), except where the two advancing moves tie above
  staying, where torchaudio keeps the strictly worse stay.
- **Impossible log-probs**: NaN and ``+inf`` entries count as ``-inf`` (that label cannot be emitted there).
- **Infeasible samples** (too few frames for the target and its repeats, or every alignment has probability 0):
  the alignment is all ``blank`` and the scores ``-inf`` for ``t < input_lengths[n]``. No error is raised, so one
  bad sample does not fail a batch in a server; ``scores[0, n] == -inf`` finds them (a feasible best path
  has finite scores).
- **Frames beyond the input**: ``t >= input_lengths[n]`` has alignment ``blank`` and score 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .validation import CTCProblem, check_blank, validate

__all__ = ["TokenSpan", "forced_align", "token_spans"]


def forced_align(log_probs: Any, targets: Any, input_lengths: Any, target_lengths: Any,
                 blank: int = 0) -> tuple[Any, Any]:
    """The best CTC alignment of each target, with the log-probability of each frame's label.

    Args:
        log_probs: ``(T, N, C)`` or unbatched ``(T, C)`` NumPy or CuPy array of log-probabilities, float16, float32
            or float64; may be strided.
        targets: ``(N, S)`` padded, 1-D concatenated (length ``sum(target_lengths)``), or ``(S,)`` unbatched;
            integers in ``[0, C)``, never ``blank``.
        input_lengths: ``(N,)`` frames per sample (a single length when unbatched), each in ``[0, T]``.
        target_lengths: ``(N,)`` target lengths.
        blank: index of the blank class, in ``[0, C)``.

    Returns:
        ``(alignment, scores)`` in the array library of ``log_probs``: ``alignment`` int64 ``(T, N)`` (``(T,)``
        unbatched), the label of the best path at each frame; ``scores`` of the same shape in ``log_probs``' dtype,
        ``log_probs[t, n, alignment[t, n]]``. Frames ``t >= input_lengths[n]``: ``blank`` and 0. Infeasible
        samples: all ``blank`` with ``-inf`` scores (see the module docstring for ties and special values).

    Raises:
        TypeError, ValueError: invalid arguments, with the messages of :func:`deploy_ctc.ctc_loss`.
    """
    problem = validate(log_probs, targets, input_lengths, target_lengths, blank)
    alignment, scores = _aligner_for(problem).forced_align(problem)  # (T, N), (T, N)
    scores = scores.astype(problem.out_dtype, copy=False)
    if not problem.batched:
        return alignment[:, 0], scores[:, 0]
    return alignment, scores


@dataclass(frozen=True)
class TokenSpan:
    """One label of an alignment: frames ``start <= t < end`` and the mean of their scores."""

    token: int
    start: int
    end: int
    score: float

    def __len__(self) -> int:
        return self.end - self.start


def token_spans(alignment: Any, scores: Any, blank: int = 0) -> list:
    """The labels of an alignment as spans of frames: torchaudio's ``merge_tokens``.

    A span is a run of equal non-blank labels; two spans of the same label are separated by at least one blank.

    Args:
        alignment: ``(T,)`` labels of one sample (or ``(T, N)``: one list per sample), e.g. from
            :func:`forced_align`; NumPy or CuPy.
        scores: the matching scores (log-probabilities; pass ``exp(scores)`` for mean probabilities).
        blank: the blank label, which starts no span.

    Returns:
        A list of :class:`TokenSpan` in time order (for ``(T, N)``, a list of N such lists). ``score`` is the mean
        of ``scores`` over the span, in float64.

    Raises:
        TypeError: ``alignment`` does not hold integers, or ``blank`` is not an integer.
        ValueError: ``alignment`` and ``scores`` differ in shape, or are not 1-D or 2-D.
    """
    alignment, scores, blank = _host(alignment), _host(scores), check_blank(blank)
    if alignment.dtype.kind not in "iu" and alignment.size:  # float labels would be truncated into other labels
        raise TypeError(f"alignment must hold integer labels, got dtype {alignment.dtype}")
    if alignment.shape != scores.shape or alignment.ndim not in (1, 2):
        raise ValueError(f"alignment and scores must have the same shape, (T,) or (T, N); got "
                         f"{alignment.shape} and {scores.shape}")
    if alignment.ndim == 2:
        return [token_spans(alignment[:, n], scores[:, n], blank) for n in range(alignment.shape[1])]
    labels = alignment.astype(np.int64)  # (T,)
    starts = np.flatnonzero(np.diff(labels, prepend=labels[:1] - 1) != 0)  # (K,) first frame of each run
    ends = np.append(starts[1:], labels.size)  # (K,)
    sums = np.add.reduceat(scores.astype(np.float64), starts) if starts.size else np.zeros(0)  # (K,)
    return [TokenSpan(int(labels[a]), int(a), int(b), float(total / (b - a)))
            for a, b, total in zip(starts, ends, sums) if labels[a] != blank]


def _host(array) -> np.ndarray:
    return np.asarray(array) if isinstance(array, np.ndarray) or not hasattr(array, "get") else array.get()


def _aligner_for(problem: CTCProblem):
    """The alignment backend for ``problem``: the module of the CPU backend in use, or the CUDA kernels."""
    if problem.xp is not np:
        from ._backends.cuda import cupy_align

        return cupy_align
    from ._backends import cpu

    if cpu.current().__name__.endswith(".native"):
        from ._backends.cpu import align_native

        return align_native
    from ._backends.cpu import align_numpy

    return align_numpy
