"""Independent oracles for CTC loss and its gradient, shared by the core, CUDA and ONNX test suites.

None of these functions calls deploy_ctc: expected values come from

* :func:`torch_reference` -- ``torch.nn.functional.ctc_loss`` on a float64 CPU copy of the inputs, with the
  gradient from torch's autograd (any input layout torch accepts: padded, concatenated, unbatched);
* :func:`brute_force` -- enumeration of all ``C**T`` alignments of one sequence (tiny T only), using the
  definition of CTC directly (collapse repeats, then drop blanks), no dynamic programming;
* :func:`brute_force_alignment` -- the best alignment (forced alignment) by the same enumeration, with the
  documented tie rule applied to whole paths;
* :func:`single_path` -- the analytic case T = minimal alignment length, where exactly one alignment exists:
  loss = -sum of the log-probs on that path, posterior = one-hot of the path;
* :func:`finite_difference` -- central differences of any scalar function.

Gradient conventions (see deploy_ctc._backends.Backend), for sample n with weight w_n (= grad_output times the
reduction factor) and frames t < input_lengths[n]::

    torch:  grad[t, n, c] = w_n * (exp(lp[t, n, c]) - posterior[t, n, c])
    plain:  grad[t, n, c] = -w_n * posterior[t, n, c]

rows t >= input_lengths[n] are 0; rows of an infinite loss are NaN, or 0 with zero_infinity.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    reason: str


#: Per-dtype tolerance of a deploy_ctc result (loss or gradient, gradient entries lie in [-1, 1]) against a
#: float64 oracle evaluated on the *same* input values (the low-precision input upcast exactly to float64).
TOLERANCES = {
    np.dtype(np.float64): Tolerance(
        1e-9, 1e-9,
        "float64 throughout; torch sums in log space, deploy_ctc may rescale in probability space: the two "
        "roundings differ by a few ulp per frame, ~T*1e-16 relative, far below 1e-9 even for T = 2000."),
    np.dtype(np.float32): Tolerance(
        2e-6, 2e-6,
        "the input values are exact in float64; the NumPy backend computes in float64 and rounds the result "
        "once to float32 (half an ulp = 6e-8 relative); 2e-6 also covers float32 accumulation of the reduction."),
    np.dtype(np.float16): Tolerance(
        1e-3, 1e-3,
        "half input is computed in float32 and the result rounded to float16: half an ulp is 4.9e-4 relative "
        "(2**-11), and gradient entries in [-1, 1] round by at most 4.9e-4 absolute."),
}

#: Tolerance for a backend that computes in float32 (e.g. CuPy on float32 input) against torch float64.
FLOAT32_COMPUTE = Tolerance(
    1e-4, 1e-5,
    "float32 recursions over T frames accumulate ~T*6e-8 relative error in the log-likelihood (1e-4 at T=2000).")


def tolerance(dtype) -> Tolerance:
    return TOLERANCES[np.dtype(dtype)]


def assert_close(got, expected, dtype, what: str, tol: Tolerance | None = None) -> None:
    """Assert ``got`` matches the float64 ``expected`` within the tolerance of ``dtype``.

    NaN must sit exactly where the oracle has NaN, and +-inf exactly where it has the same inf.
    """
    tol = tol or tolerance(dtype)
    got64 = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got64.shape == expected.shape, f"{what}: shape {got64.shape}, expected {expected.shape}"
    np.testing.assert_array_equal(np.isnan(got64), np.isnan(expected), err_msg=f"{what}: NaN positions differ")
    np.testing.assert_allclose(got64, expected, rtol=tol.rtol, atol=tol.atol, equal_nan=True,
                               err_msg=f"{what} ({np.dtype(dtype).name}: {tol.reason})")


# ----------------------------------------------------------------------------------------------------------
# Input generators
# ----------------------------------------------------------------------------------------------------------
def log_softmax(x, axis=-1):
    """Numerically stable log-softmax in float64."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def random_log_probs(rng, T, N, C, dtype=np.float64, scale=1.0):
    """Normalized log-probs (T, N, C) = log_softmax(scale * randn), rounded to ``dtype``.

    Large ``scale`` gives peaky inputs (scale=300 puts log-probs down to about -1e3).
    """
    return log_softmax(scale * rng.standard_normal((T, N, C))).astype(dtype)


def random_targets(rng, target_lengths, C, blank=0, S=None, repeat_prob=0.0, pad_value=0):
    """Padded targets (N, S) with labels in [0, C) minus ``blank``; entries past each length are ``pad_value``.

    ``repeat_prob`` is the chance that a label repeats its predecessor (repeats need a blank between them).
    """
    target_lengths = np.asarray(target_lengths, dtype=np.int64).reshape(-1)
    S = int(target_lengths.max(initial=0)) if S is None else S
    labels = np.array([c for c in range(C) if c != blank], dtype=np.int64)
    targets = np.full((target_lengths.size, S), pad_value, dtype=np.int64)
    for n, length in enumerate(target_lengths):
        for s in range(length):
            if s > 0 and rng.random() < repeat_prob:
                targets[n, s] = targets[n, s - 1]
            else:
                targets[n, s] = rng.choice(labels)
    return targets


def aligned_log_probs(rng, targets, input_lengths, target_lengths, C, blank=0, boost=(5.0, 20.0)):
    """Log-probs (T, N, C) of a model confident *in* its targets, as a trained one: ``log_softmax`` of random
    logits raised by ``uniform(*boost)`` along one random alignment of each target (each label, and the blanks
    between equal neighbours, get at least one frame; the other frames go to random positions of ``l'``).
    Frames ``t >= input_lengths[n]`` keep their random logits."""
    input_lengths = np.asarray(input_lengths).reshape(-1)
    target_lengths = np.asarray(target_lengths).reshape(-1)
    T = int(input_lengths.max(initial=0))
    logits = rng.standard_normal((T, input_lengths.size, C))
    for n, (frames, length) in enumerate(zip(input_lengths, target_lengths)):
        target = [int(c) for c in targets[n, :length]]
        extended = [blank]
        for label in target:
            extended += [label, blank]
        required = np.zeros(len(extended), dtype=np.int64)  # (2S + 1,) frames each position must get
        required[1::2] = 1
        required[2:-1:2] = [int(a == b) for a, b in zip(target, target[1:])]
        spare = int(frames) - int(required.sum())
        if spare < 0:
            raise ValueError(f"sample {n}: {frames} frames cannot align a target needing {required.sum()}")
        durations = required + rng.multinomial(spare, np.full(len(extended), 1 / len(extended)))
        path = np.repeat(extended, durations)  # (frames,)
        logits[np.arange(int(frames)), n, path] += rng.uniform(*boost, int(frames))
    return log_softmax(logits)


def non_finite_batch(rng, with_nan, unused_class_nan):
    """A batch of every kind of non-finite loss beside finite ones (T = 8, C = 5, blank 0); without ``with_nan``
    sample 2, without ``unused_class_nan`` sample 4, gets ordinary log-probs.

    0: finite. 1: infeasible target (inf). 2: NaN at a target label (NaN loss). 3: all log-probs -inf (inf from
    zero probability, not from the lengths). 4: NaN in a class no alignment uses (finite loss, NaN gradient
    entries). 5: a label and no frames (inf, no rows).
    """
    lp = random_log_probs(rng, 8, 6, 5)
    targets = np.array([[1, 2, 3], [1, 1, 1], [2, 3, 0], [4, 4, 0], [1, 2, 0], [3, 0, 0]])
    il, tl = np.array([8, 4, 8, 8, 8, 0]), np.array([3, 3, 2, 2, 2, 1])
    lp[:, 3, :] = -np.inf
    if with_nan:
        lp[3, 2, 2] = np.nan
    if unused_class_nan:
        lp[5, 4, 3] = np.nan
    return lp, targets, il, tl


def minimal_input_length(target) -> int:
    """Shortest T that can emit ``target``: its length plus one blank between each pair of equal neighbours."""
    target = list(target)
    return len(target) + sum(a == b for a, b in zip(target, target[1:]))


def random_batch(rng, T, N, C, S, full=False, aligned=False, scale=1.0, dtype=np.float64):
    """``(lp, targets, il, tl)`` of a random batch: targets with repeats of lengths in ``[S/2, S]`` (sample 0, or with
    ``full`` every sample, of length S), input lengths from each target's shortest feasible one to T (sample 0, or
    all, of length T); log-probs random (``scale`` times standard normal logits, rounded to ``dtype``), or confident
    along a random alignment of each target with ``aligned``."""
    tl = np.full(N, S) if full else rng.integers(S // 2, S + 1, N)
    tl[0] = S
    targets = random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    shortest = np.array([minimal_input_length(targets[n, :tl[n]]) for n in range(N)])
    il = np.full(N, T) if full else rng.integers(np.minimum(shortest, T), T + 1)
    il[0] = T
    lp = aligned_log_probs(rng, targets, il, tl, C) if aligned else random_log_probs(rng, T, N, C, dtype, scale)
    return lp, targets, il, tl


def concatenate_targets(targets, target_lengths):
    """Padded (N, S) targets -> concatenated 1-D (sum(target_lengths),)."""
    return np.concatenate([np.asarray(row[:length]) for row, length in zip(targets, target_lengths)]
                          + [np.zeros(0, dtype=np.asarray(targets).dtype)])


# ----------------------------------------------------------------------------------------------------------
# Expected gradient from a posterior
# ----------------------------------------------------------------------------------------------------------
def reduction_weights(nll, target_lengths, reduction, grad_output=None):
    """w_n = d reduced_loss / d nll_n times grad_output, as torch defines the reductions.

    mean: grad_output / (N * max(target_length_n, 1)); sum: grad_output; none: grad_output[n] (default 1).
    """
    N = np.asarray(nll).size
    target_lengths = np.asarray(target_lengths, dtype=np.float64).reshape(N)
    if reduction == "none":
        go = np.ones(N) if grad_output is None else np.asarray(grad_output, dtype=np.float64).reshape(N)
        return go
    go = 1.0 if grad_output is None else float(np.asarray(grad_output, dtype=np.float64))
    if reduction == "sum":
        return np.full(N, go)
    return go / (N * np.maximum(target_lengths, 1.0))


def reduce_nll(nll, target_lengths, reduction, zero_infinity=False):
    """Torch's reductions of per-sample losses (float64)."""
    nll = np.asarray(nll, dtype=np.float64)
    if zero_infinity:
        nll = np.where(np.isinf(nll), 0.0, nll)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return (nll / np.maximum(np.asarray(target_lengths, dtype=np.float64), 1.0)).mean()


def grad_from_posterior(log_probs, posterior, nll, input_lengths, weights, convention="torch",
                        zero_infinity=False):
    """Gradient (T, N, C) float64 of the documented convention from a posterior (T, N, C) and weights (N,)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    T, N, _ = lp.shape
    posterior = np.nan_to_num(np.asarray(posterior, dtype=np.float64))
    local = -posterior if convention == "plain" else np.exp(lp) - posterior  # (T, N, C)
    inside = np.arange(T)[:, None] < np.asarray(input_lengths).reshape(1, N)  # (T, N)
    infinite = np.isinf(np.asarray(nll)).reshape(1, N)  # (1, N)
    grad = np.where(inside[..., None], local * np.asarray(weights).reshape(1, N, 1), 0.0)
    bad = (inside & infinite)[..., None]
    return np.where(bad, 0.0 if zero_infinity else np.nan, grad)


# ----------------------------------------------------------------------------------------------------------
# Oracle 1: torch float64
# ----------------------------------------------------------------------------------------------------------
def _torch():
    import pytest

    return pytest.importorskip("torch", reason="torch (the test extra) is the float64 oracle")


def _as_torch_lengths(torch, lengths):
    return torch.as_tensor(np.asarray(lengths, dtype=np.int64))


def torch_reference(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean",
                    zero_infinity=False, grad_output=None, convention="torch"):
    """(loss, grad) of torch.nn.functional.ctc_loss on a float64 CPU copy, gradient by torch autograd.

    Accepts every layout torch accepts (log_probs (T, N, C) or (T, C); targets (N, S), concatenated, or (S,);
    lengths int / sequence / array). Low-precision log_probs are upcast exactly to float64 (torch refuses half).
    ``grad_output`` weights the backward pass like ``loss.backward(grad_output)``. convention="plain"
    subtracts torch's exp(lp) term with torch's documented reduction weights.
    Returns float64 numpy arrays: loss of torch's shape, grad of log_probs' shape.
    """
    torch = _torch()
    lp_np = np.array(log_probs, dtype=np.float64)  # copy: torch must not share the caller's memory
    lp = torch.from_numpy(lp_np).requires_grad_()
    tg = torch.as_tensor(np.array(targets, dtype=np.int64))
    il = _as_torch_lengths(torch, input_lengths)
    tl = _as_torch_lengths(torch, target_lengths)
    loss = torch.nn.functional.ctc_loss(lp, tg, il, tl, blank=blank, reduction=reduction,
                                        zero_infinity=zero_infinity)
    go = torch.ones_like(loss) if grad_output is None else torch.as_tensor(
        np.asarray(grad_output, dtype=np.float64)).reshape(loss.shape)
    loss.backward(go)
    loss_np = loss.detach().numpy().copy()
    grad = lp.grad.numpy().copy()
    if convention == "plain":
        grad = _plain_from_torch(torch, lp_np, tg, il, tl, blank, reduction, zero_infinity, grad_output, grad)
    return loss_np, grad


def torch_losses(log_probs, targets, input_lengths, target_lengths, blank=0):
    """Per-sample losses ``(N,)`` of torch.nn.functional.ctc_loss (reduction "none") on a float64 CPU copy, without
    autograd: the oracle for long inputs, where a backward pass would cost torch minutes."""
    torch = _torch()
    with torch.no_grad():
        loss = torch.nn.functional.ctc_loss(torch.from_numpy(np.array(log_probs, dtype=np.float64)),
                                            torch.as_tensor(np.array(targets, dtype=np.int64)),
                                            _as_torch_lengths(torch, input_lengths),
                                            _as_torch_lengths(torch, target_lengths), blank=blank, reduction="none")
    return loss.numpy().copy()


def _plain_from_torch(torch, lp_np, tg, il, tl, blank, reduction, zero_infinity, grad_output, grad):
    batched = lp_np.ndim == 3
    lp3 = lp_np if batched else lp_np[:, None, :]
    nll = torch.nn.functional.ctc_loss(torch.from_numpy(lp_np), tg, il, tl, blank=blank, reduction="none")
    nll = np.atleast_1d(nll.numpy())
    il_np = np.atleast_1d(il.numpy())
    w = reduction_weights(nll, np.atleast_1d(tl.numpy()), reduction, grad_output)  # (N,)
    inside = np.arange(lp3.shape[0])[:, None] < il_np[None, :]  # (T, N)
    finite = np.isfinite(nll)[None, :]  # (1, N)
    shift = np.where((inside & finite)[..., None], np.exp(lp3) * w[None, :, None], 0.0)  # (T, N, C)
    return grad - (shift if batched else shift[:, 0, :])


# ----------------------------------------------------------------------------------------------------------
# Oracle 2: brute-force enumeration of alignments
# ----------------------------------------------------------------------------------------------------------
def collapse(path, blank):
    """CTC's many-to-one map B: merge runs of equal labels, then remove blanks."""
    return tuple(label for label, _ in itertools.groupby(path) if label != blank)


@functools.lru_cache(maxsize=64)
def _all_paths(T, C, blank):
    """All C**T alignments (K, T) and, for each labelling, the indices of the alignments that collapse to it."""
    paths = np.array(list(itertools.product(range(C), repeat=T)), dtype=np.int64).reshape(C**T, T)
    groups: dict[tuple, list[int]] = {}
    for k, path in enumerate(paths.tolist()):
        groups.setdefault(collapse(path, blank), []).append(k)
    return paths, {key: np.array(idx) for key, idx in groups.items()}


def brute_force(log_probs, target, blank=0):
    """-log p(target | x) and the posterior (T, C) of one sequence by summing over all C**T alignments.

    log_probs: (T, C) float64, T * log2(C) small (C**T <= ~1e5). Returns (nll, posterior): nll = inf and a
    zero posterior when no alignment emits ``target``.
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    T, C = lp.shape
    paths, groups = _all_paths(T, C, blank)
    posterior = np.zeros((T, C))
    idx = groups.get(tuple(int(c) for c in target))
    if idx is None:
        return np.inf, posterior
    path_lp = lp[np.arange(T)[None, :], paths[idx]].sum(axis=1)  # (K,)
    top = path_lp.max()
    weights = np.exp(path_lp - top)  # (K,)
    total = weights.sum()
    for t in range(T):
        np.add.at(posterior[t], paths[idx, t], weights / total)
    return -(top + np.log(total)), posterior


def brute_force_batch(log_probs, targets, input_lengths, target_lengths, blank=0):
    """Brute force on a padded batch: returns nll (N,) and posterior (T, N, C) (zero beyond input_lengths)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    T, N, C = lp.shape
    nll = np.zeros(N)
    posterior = np.zeros((T, N, C))
    for n in range(N):
        length = int(input_lengths[n])
        nll[n], posterior[:length, n] = brute_force(lp[:length, n], targets[n][: int(target_lengths[n])], blank)
    return nll, posterior


def _lattice_states(path, blank):
    """The extended-label position (0 .. 2S, blanks even) an alignment occupies at each frame."""
    states, count = [], 0
    for t, label in enumerate(path):
        if label != blank and (t == 0 or label != path[t - 1]):
            count += 1
        states.append(2 * count - 1 if label != blank else 2 * count)
    return states


def brute_force_alignment(log_probs, target, blank=0):
    """The best alignment of one sequence by enumerating all C**T label sequences (tiny T only).

    Each alignment that collapses to ``target`` is scored by summing its log-probs in float64 from the first frame
    to the last (NaN and +inf count as -inf). Among the maximal ones, the winner has the largest lattice positions
    read from the last frame backwards, where ending on the last label beats ending on the trailing blank: the
    documented tie rule of deploy_ctc.align, stated on whole paths instead of backpointers.

    Returns:
        ``(path (T,) int64, score)``, or ``(None, -inf)`` when no alignment has a finite score.
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    lp = np.where(lp < np.inf, lp, -np.inf)
    T, C = lp.shape
    paths, groups = _all_paths(T, C, blank)
    idx = groups.get(tuple(int(c) for c in target))
    if idx is None:
        return None, -np.inf
    best, best_key, best_score = None, None, -np.inf
    for path in paths[idx].tolist():
        score = 0.0
        for t, label in enumerate(path):
            score += float(lp[t, label])
        if score == -np.inf:
            continue
        states = _lattice_states(path, blank)
        key = (score, *[-s for s in states[-1:]], *states[-2::-1])
        if best_key is None or key > best_key:
            best, best_key, best_score = path, key, score
    return (None, -np.inf) if best is None else (np.array(best, dtype=np.int64), best_score)


# ----------------------------------------------------------------------------------------------------------
# Oracle 3: the single-path analytic case
# ----------------------------------------------------------------------------------------------------------
def single_path(target, blank=0):
    """The only alignment of ``target`` when T = minimal_input_length(target): blanks only between repeats."""
    path = []
    for s, label in enumerate(target):
        if s > 0 and target[s - 1] == label:
            path.append(blank)
        path.append(int(label))
    return np.array(path, dtype=np.int64)


def single_path_expected(log_probs, target, blank=0):
    """Closed form for T = minimal length: nll = -sum_t lp[t, path_t], posterior = one_hot(path) (T, C)."""
    lp = np.asarray(log_probs, dtype=np.float64)
    path = single_path(target, blank)
    assert lp.shape[0] == path.size, "single_path_expected needs T == minimal_input_length(target)"
    posterior = np.zeros_like(lp)
    posterior[np.arange(path.size), path] = 1.0
    return -lp[np.arange(path.size), path].sum(), posterior


# ----------------------------------------------------------------------------------------------------------
# Oracle 4: finite differences
# ----------------------------------------------------------------------------------------------------------
def finite_difference(fn, x, eps=1e-6):
    """Central differences of the scalar ``fn`` at every entry of the float64 array ``x`` (not modified)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        saved = x[i]
        x[i] = saved + eps
        up = float(fn(x.copy()))
        x[i] = saved - eps
        down = float(fn(x.copy()))
        x[i] = saved
        grad[i] = (up - down) / (2 * eps)
    return grad


def extended_precision_reference(log_probs, target, blank=0):
    """``(nll, grad)`` of one sample in extended precision (``np.longdouble``: 64-bit mantissa on x86-64), log space,
    straight from the definitions: alpha and beta over ``l' = (blank, l_1, blank, ..., l_S, blank)``, the posterior
    ``exp(log alpha + log beta - log y - log p)`` and torch's gradient ``exp(lp) - sum_{s: l'_s = c} posterior``.

    An oracle about 2^11 times more precise than torch float64 (whose gradients at T in the thousands are off by
    ~1e-11), for checking that a float64 result is exact to a few ulps. log_probs ``(T, C)``, target ``(S,)``.
    """
    lp = np.asarray(log_probs, dtype=np.longdouble)
    T = lp.shape[0]
    labels = np.full(2 * len(target) + 1, blank)
    labels[1::2] = target
    L = len(labels)
    skip = np.zeros(L, dtype=bool)  # s may be entered from s - 2
    skip[3::2] = labels[3::2] != labels[1:-2:2]
    neg = np.longdouble(-np.inf)
    emit = lp[:, labels]  # (T, L)
    log_alpha = np.full((T, L), neg, dtype=np.longdouble)
    log_beta = np.full((T, L), neg, dtype=np.longdouble)
    log_alpha[0, :2] = emit[0, :2]
    log_beta[T - 1, -2:] = emit[T - 1, -2:]
    for t in range(1, T):
        prev = log_alpha[t - 1]
        acc = prev.copy()
        acc[1:] = np.logaddexp(acc[1:], prev[:-1])
        acc[2:] = np.where(skip[2:], np.logaddexp(acc[2:], prev[:-2]), acc[2:])
        log_alpha[t] = acc + emit[t]
    for t in range(T - 2, -1, -1):
        nxt = log_beta[t + 1]
        acc = nxt.copy()
        acc[:-1] = np.logaddexp(acc[:-1], nxt[1:])
        acc[:-2] = np.where(skip[2:], np.logaddexp(acc[:-2], nxt[2:]), acc[:-2])
        log_beta[t] = acc + emit[t]
    log_p = np.logaddexp(log_alpha[T - 1, -1], log_alpha[T - 1, -2] if L > 1 else neg)
    posterior = np.exp(log_alpha + log_beta - emit - log_p)  # (T, L)
    grad = np.exp(lp)
    for s in range(L):
        grad[:, labels[s]] -= posterior[:, s]
    return float(-log_p), grad
