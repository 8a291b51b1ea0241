"""benchmarks/common.py: the input generator every benchmark uses and the interleaved timer."""

import numpy as np
import pytest

from benchmarks.common import interleaved_medians, make_inputs


def test_full_lengths_follow_the_cpu_benchmark_definition():
    log_probs, targets, input_lengths, target_lengths = make_inputs(40, 6, 9, 10)
    assert log_probs.dtype == np.float32 and log_probs.shape == (40, 6, 9)
    np.testing.assert_allclose(np.exp(log_probs.astype(np.float64)).sum(axis=2), 1.0, rtol=1e-5)
    assert targets.shape == (6, 10) and targets.min() >= 1 and targets.max() < 9  # never the blank (0)
    assert (input_lengths == 40).all()
    assert ((target_lengths >= 5) & (target_lengths <= 10)).all()


def test_varied_lengths_fill_the_padded_shape_and_leave_room_for_repeats():
    T, N, C, S = 60, 200, 7, 20
    log_probs, targets, input_lengths, target_lengths = make_inputs(T, N, C, S, lengths="varied")
    assert log_probs.shape == (T, N, C) and targets.shape == (N, S)
    assert input_lengths[0] == T and target_lengths[0] == S
    assert input_lengths.min() >= 45 and input_lengths.max() <= T  # max(3T/4, 5S/4) = 45
    assert target_lengths.min() >= S // 3 and len(np.unique(input_lengths)) > 1


def test_logit_scale_makes_outputs_peaky_and_seed_reproduces():
    flat, peaky = make_inputs(30, 4, 50, 5)[0], make_inputs(30, 4, 50, 5, logit_scale=10)[0]
    assert np.exp(peaky).max(axis=2).mean() > 2 * np.exp(flat).max(axis=2).mean()
    for a, b in zip(make_inputs(30, 4, 50, 5, seed=3), make_inputs(30, 4, 50, 5, seed=3)):
        np.testing.assert_array_equal(a, b)


def test_make_inputs_rejects_an_unknown_length_mode():
    with pytest.raises(ValueError, match="lengths must be 'full' or 'varied', got 'some'"):
        make_inputs(10, 2, 3, 4, lengths="some")


def test_interleaved_medians_alternate_and_take_medians():
    calls = []
    runners = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    durations = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 2.0, 8.0])}

    def timer(run):
        run()
        return next(durations[calls[-1]])

    rounds = []
    medians = interleaved_medians(runners, 3, progress=lambda done, total: rounds.append((done, total)),
                                  timer=timer, warmup=2)
    assert medians == {"a": 3.0, "b": 2.0}
    assert calls == ["a", "b"] * 5  # two warm-up rounds, then three timed rounds, alternating
    assert rounds == [(1, 3), (2, 3), (3, 3)]


def test_a_slow_warm_up_cuts_the_rounds_to_one():
    import time

    calls = []
    medians = interleaved_medians({"slow": lambda: (calls.append(1), time.sleep(0.02))}, 5, slow_s=0.01)
    assert len(calls) == 2 and medians["slow"] >= 0.02
