"""deploy_ctc.forced_align and token_spans on NumPy arrays, on both CPU backends, against brute-force enumeration.

The oracle (tests/utils/oracles.py: brute_force_alignment) enumerates every label sequence of tiny cases and applies
the documented tie rule to whole paths, so it shares no code with the Viterbi recursions under test.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy_ctc import backends, forced_align, token_spans
from tests.utils.oracles import brute_force_alignment, collapse, concatenate_targets, log_softmax

BACKENDS = ("numpy", "native")


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "native":
        from deploy_ctc._backends.cpu import native_build

        try:
            native_build.library()
        except native_build.NativeUnavailable as error:
            pytest.skip(f"native engine unavailable: {error}")
    with backends.using(request.param):
        yield request.param


def _expected(lp, targets, il, tl, blank):
    """Oracle results (T, N) for a padded batch."""
    T, N, _ = lp.shape
    alignment = np.full((T, N), blank, dtype=np.int64)
    scores = np.zeros((T, N))
    best = np.zeros(N)
    for n in range(N):
        path, best[n] = brute_force_alignment(lp[: il[n], n], targets[n, : tl[n]], blank)
        if path is None:
            scores[: il[n], n] = -np.inf
        else:
            alignment[: il[n], n] = path
            scores[: il[n], n] = np.asarray(lp, dtype=np.float64)[np.arange(il[n]), n, path]
    return alignment, scores, best


def _random_case(rng, T, N, C, blank, dtype=np.float64, repeat=0.4):
    lp = log_softmax(rng.normal(size=(T, N, C)) * 2).astype(dtype)
    tl = rng.integers(0, 4, size=N)
    il = rng.integers(0, T + 1, size=N)
    targets = np.zeros((N, max(1, int(tl.max()))), dtype=np.int64)
    labels = [c for c in range(C) if c != blank]
    for n in range(N):
        for j in range(tl[n]):
            same = j > 0 and rng.random() < repeat
            targets[n, j] = targets[n, j - 1] if same else rng.choice(labels)
    return lp, targets, il, tl


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("blank", [0, 2])
def test_matches_brute_force_on_random_batches(backend, rng, dtype, blank):
    lp, targets, il, tl = _random_case(rng, T=6, N=7, C=3, blank=blank, dtype=dtype)
    alignment, scores = forced_align(lp, targets, il, tl, blank=blank)
    exp_alignment, exp_scores, best = _expected(lp, targets, il, tl, blank)
    assert alignment.dtype == np.int64 and scores.dtype == dtype
    np.testing.assert_array_equal(alignment, exp_alignment)
    np.testing.assert_array_equal(scores, exp_scores)
    for n in np.flatnonzero(np.isfinite(best)):  # the path's scores add up to the best score (recursion's order)
        total = 0.0
        for t in range(il[n]):
            total += float(scores[t, n])
        assert total == best[n], n


@pytest.mark.parametrize("blank", [0, 3])
def test_ties_follow_the_documented_rule(backend, rng, blank):
    # Log-probs from a few powers of two: sums are exact, so many alignments tie exactly.
    T, N, C = 6, 12, 4
    lp = -rng.choice([0.5, 1.0, 2.0], size=(T, N, C))
    labels = [c for c in range(C) if c != blank]
    targets = rng.choice(labels, size=(N, 3))
    targets[::3, 1] = targets[::3, 0]  # repeats
    il = np.full(N, T)
    il[1::4] = 5
    tl = np.array([3, 2, 1, 0] * 3)
    alignment, scores = forced_align(lp, targets, il, tl, blank=blank)
    exp_alignment, exp_scores, _ = _expected(lp, targets, il, tl, blank)
    np.testing.assert_array_equal(alignment, exp_alignment)
    np.testing.assert_array_equal(scores, exp_scores)


def test_uniform_emissions_start_each_label_as_early_as_possible(backend):
    # All alignments tie: the rule stays in the last label to the end and starts every label early.
    alignment, scores = forced_align(np.full((6, 4), -1.0), [1, 2], 6, 2)
    np.testing.assert_array_equal(alignment, [1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(scores, np.full(6, -1.0))


def test_advancing_moves_tying_above_staying_keep_the_best_score(backend):
    # Target (a, b) = (1, 2). At frame 2, "b" can come from the blank after "a" (one step) or from "a" (a skip),
    # both -1.5, or stay in "b" (-2.5): torchaudio 2.11 keeps the worse stay here; deploy_ctc takes the step.
    lp = np.array([[-1.0, -0.5, -1.0],
                   [-1.0, -1.0, -2.0],
                   [-4.0, -4.0, -0.5]])
    alignment, scores = forced_align(lp, [1, 2], 3, 2)
    np.testing.assert_array_equal(alignment, [1, 0, 2])
    assert brute_force_alignment(lp, [1, 2])[1] == -2.0
    np.testing.assert_array_equal(scores, [-0.5, -1.0, -0.5])


def test_infeasible_samples_are_all_blank_with_minus_inf_scores(backend):
    T, C = 4, 3
    lp = log_softmax(np.random.default_rng(1).normal(size=(T, 4, C)))
    lp[:, 2, 2] = -np.inf  # label 2 can never be emitted in sample 2
    targets = np.array([[1, 1, 2], [1, 2, 1], [2, 0, 0], [1, 0, 0]])
    il = np.array([4, 2, 4, 0])
    tl = np.array([3, 3, 1, 1])
    # sample 0: needs 4 frames (a blank between the repeats): feasible; 1: too short; 2: impossible; 3: no frames
    alignment, scores = forced_align(lp, targets, il, tl)
    assert np.all(np.isfinite(scores[:, 0]))
    assert collapse(alignment[:, 0].tolist(), 0) == (1, 1, 2)
    np.testing.assert_array_equal(alignment[:, 1:], 0)
    np.testing.assert_array_equal(scores[:2, 1], -np.inf)
    np.testing.assert_array_equal(scores[2:, 1], 0.0)
    np.testing.assert_array_equal(scores[:, 2], -np.inf)
    np.testing.assert_array_equal(scores[:, 3], 0.0)


def test_nan_and_positive_infinity_count_as_impossible(backend, rng):
    lp, targets, il, tl = _random_case(rng, T=5, N=6, C=3, blank=0)
    lp[1, ::2, 1] = np.nan
    lp[3, 1::2, 2] = np.inf
    alignment, scores = forced_align(lp, targets, il, tl)
    exp_alignment, exp_scores, _ = _expected(lp, targets, il, tl, 0)
    np.testing.assert_array_equal(alignment, exp_alignment)
    np.testing.assert_array_equal(scores, exp_scores)


def test_layouts_give_the_same_alignment(backend, rng):
    lp, targets, il, tl = _random_case(rng, T=9, N=4, C=5, blank=0)
    padded = forced_align(lp, targets, il, tl)
    concatenated = forced_align(lp, concatenate_targets(targets, tl), il, tl)
    strided = forced_align(np.asfortranarray(lp), targets.astype(np.int32), il, tl)
    for got in (concatenated, strided):
        np.testing.assert_array_equal(got[0], padded[0])
        np.testing.assert_array_equal(got[1], padded[1])
    for n in range(lp.shape[1]):
        alignment, scores = forced_align(lp[:, n], targets[n, : tl[n]], il[n], tl[n])
        assert alignment.shape == (9,)
        np.testing.assert_array_equal(alignment, padded[0][:, n])
        np.testing.assert_array_equal(scores, padded[1][:, n])


def test_inputs_are_not_modified(backend, rng):
    lp, targets, il, tl = _random_case(rng, T=5, N=3, C=4, blank=0)
    lp[0, 0, 1] = np.nan
    copies = [a.copy() for a in (lp, targets, il, tl)]
    forced_align(lp, targets, il, tl)
    for before, after in zip(copies, (lp, targets, il, tl)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("bad, message", [
    (dict(blank=5), r"blank=5 must be in \[0, C=5\)"),
    (dict(targets=np.array([[1, 0]])), r"targets\[0, 1\] = 0 equals blank=0"),
    (dict(input_lengths=[7]), r"input_lengths\[0\] = 7 exceeds T=6"),
    (dict(log_probs=np.zeros((6, 1, 5), dtype=np.int32)), "floating dtype"),
])
def test_bad_arguments_are_refused_like_ctc_loss(bad, message):
    args = dict(log_probs=np.full((6, 1, 5), -1.0), targets=np.array([[1, 2]]), input_lengths=[6],
                target_lengths=[2], blank=0)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        forced_align(**args)


@given(T=st.integers(1, 40), S=st.integers(0, 12), C=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_alignment_collapses_to_the_target_and_its_scores_are_the_log_probs(T, S, C, seed):
    rng = np.random.default_rng(seed)
    lp = log_softmax(rng.normal(size=(T, 1, C)) * 3)
    target = rng.integers(1, C, size=S)
    alignment, scores = forced_align(lp, target[None], [T], [S])
    repeats = int(np.count_nonzero(target[1:] == target[:-1]))
    if T < S + repeats:
        np.testing.assert_array_equal(alignment, 0)
        np.testing.assert_array_equal(scores, -np.inf)
    else:
        assert collapse(alignment[:, 0].tolist(), 0) == tuple(target.tolist())
        np.testing.assert_array_equal(scores[:, 0], lp[np.arange(T), 0, alignment[:, 0]])


@given(T=st.integers(1, 6), S=st.integers(0, 3), C=st.integers(2, 4), blank=st.integers(0, 3),
       dyadic=st.booleans(), seed=st.integers(0, 2**16))
def test_best_path_and_score_equal_brute_force(T, S, C, blank, dyadic, seed):
    rng = np.random.default_rng(seed)
    blank = blank % C
    lp = -rng.choice([0.5, 1.0, 2.0], size=(T, C)) if dyadic else log_softmax(rng.normal(size=(T, C)) * 2)
    target = rng.choice([c for c in range(C) if c != blank], size=S)
    for choice in ("numpy", "auto"):  # auto: the native engine where it builds
        with backends.using(choice):
            alignment, scores = forced_align(lp, target, T, S, blank=blank)
        path, best = brute_force_alignment(lp, target, blank)
        if path is None:
            np.testing.assert_array_equal(scores, -np.inf)
        else:
            np.testing.assert_array_equal(alignment, path)
            total = 0.0
            for value in scores:
                total += float(value)
            assert total == best


def test_cpu_backends_agree_on_a_larger_batch(rng):
    lp = log_softmax(rng.normal(size=(120, 9, 17)) * 4).astype(np.float32)
    tl = rng.integers(0, 40, size=9)
    targets = rng.integers(1, 4, size=(9, 40))  # few classes: many repeats
    il = rng.integers(60, 121, size=9)
    with backends.using("numpy"):
        reference = forced_align(lp, targets, il, tl)
    with backends.using("auto"):
        got = forced_align(lp, targets, il, tl)
    np.testing.assert_array_equal(got[0], reference[0])
    np.testing.assert_array_equal(got[1], reference[1])


def test_token_spans_merge_runs_and_average_scores():
    alignment = np.array([0, 3, 3, 0, 0, 3, 5, 5, 5, 0])
    scores = np.arange(10, dtype=np.float32)
    spans = token_spans(alignment, scores)
    assert [(s.token, s.start, s.end) for s in spans] == [(3, 1, 3), (3, 5, 6), (5, 6, 9)]
    assert [s.score for s in spans] == [1.5, 5.0, 7.0]
    assert [len(s) for s in spans] == [2, 1, 3]
    batched = token_spans(np.stack([alignment, np.full(10, 7)], axis=1), np.stack([scores, scores], axis=1), blank=7)
    assert [(s.token, s.start, s.end) for s in batched[1]] == []
    assert [(s.token, s.start, s.end) for s in batched[0]] == [(0, 0, 1), (3, 1, 3), (0, 3, 5), (3, 5, 6),
                                                                (5, 6, 9), (0, 9, 10)]
    with pytest.raises(ValueError, match="same shape"):
        token_spans(alignment, scores[:5])


@pytest.mark.parametrize("alignment, blank, message", [
    (np.array([0.0, 1.5, 1.5, 0.0]), 0, "alignment must hold integer labels, got dtype float64"),
    (np.array([0, 1, 1, 0]), None, "blank must be an integer, got None"),
    (np.array([0, 1, 1, 0]), "0", "blank must be an integer, got '0'"),
    (np.array([0, 1, 1, 0]), True, "blank must be an integer, got True"),
])
def test_token_spans_refuses_non_integer_labels_and_blank(alignment, blank, message):
    # Truncated float labels or a blank matching no label would silently give other spans than the alignment's.
    with pytest.raises(TypeError, match=message):
        token_spans(alignment, np.zeros(4), blank=blank)
    assert token_spans(np.zeros(0, dtype=np.int64), np.zeros(0)) == [] == token_spans([], [])
