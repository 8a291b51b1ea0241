"""deploy_ctc._backends.cpu.loss_numpy: the pure-NumPy backend's loss without a gradient (the forward recursion with
a power-of-two exponent per lattice position), through deploy_ctc.ctc_loss on the NumPy backend.

Oracles: torch float64 (tests/utils/oracles.py) for every loss; the construction of the input for the path a sample
must take (emissions below the pass's floor, NaN, -inf, a cell more than G + R bits below its feeder); brute force
for the running maxima of the stored exponents; exact power-of-two arithmetic for a renormalisation.
"""

import math

import numpy as np
import pytest

import deploy_ctc
from deploy_ctc import validation
from deploy_ctc._backends.cpu import loss_numpy, pure_numpy
from deploy_ctc.backends import path_stats, using
from tests.utils import oracles

pytest.importorskip("torch", reason="torch (the test extra) is the float64 oracle")


def batch(rng, T, N, C, S, scale=1.0, dtype=np.float64, full=False):
    """:func:`tests.utils.oracles.random_batch` with random (``scale``-times) log-probs."""
    return oracles.random_batch(rng, T, N, C, S, full=full, scale=scale, dtype=dtype)


def loss_only(lp, targets, il, tl, reduction="none", zero_infinity=False):
    """``(loss, stats)``: deploy_ctc.ctc_loss on the NumPy backend and the paths its samples took."""
    with using("numpy"), path_stats() as stats:
        loss = deploy_ctc.ctc_loss(lp, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity)
    assert [record.backend for record in stats.records] == ["numpy"]
    return loss, stats


def assert_torch_losses(loss, lp, targets, il, tl, dtype=np.float64):
    oracles.assert_close(loss, oracles.torch_losses(lp.astype(np.float64), targets, il, tl), dtype, "loss")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_precision_matches_torch_on_the_fast_path(rng, dtype):
    """float16/32/64 input, computed in float64 and rounded once; NaN in the padding past each input length is never
    read."""
    lp, targets, il, tl = batch(rng, 300, 5, 9, 40, scale=3.0, dtype=dtype)
    for n in range(5):
        lp[il[n]:, n] = np.nan
    loss, stats = loss_only(lp, targets, il, tl)
    assert loss.dtype == dtype and stats.exact == 0 and stats.fast == 5
    assert_torch_losses(loss, lp, targets, il, tl, dtype)


@pytest.mark.parametrize("T, S, scale", [(3000, 300, 1.0), (600, 60, 10.0)])
def test_long_and_peaky_inputs_stay_on_the_fast_path_and_match_torch(rng, T, S, scale):
    """Long lattices put the cells the final alignments pass through thousands of bits below the frame's largest
    (a per-frame scale would flush them); confident outputs (logits x 10) spread a frame over as many. The
    per-position exponents keep them all."""
    lp, targets, il, tl = batch(rng, T, 2, 12, S, scale=scale)
    loss, stats = loss_only(lp, targets, il, tl)
    assert stats.exact == 0 and stats.fast == 2
    assert_torch_losses(loss, lp, targets, il, tl)


@pytest.mark.parametrize("T, C, S, scale", [(2000, 5, 100, 1.0), (600, 8, 60, 10.0), (600, 8, 60, 30.0)])
def test_within_the_documented_error_of_an_extended_precision_oracle(rng, T, C, S, scale):
    """The module docstring bounds the error of log p by about (5 T + sum_t d_t) u + T u |sum_t m_t|: well inside
    8 T u |loss| here. torch float64 cannot check that (its own error is of that order); the extended-precision
    recursion of tests/utils/oracles.py (64-bit mantissa) can."""
    lp = oracles.random_log_probs(rng, T, 1, C, scale=scale)
    targets = oracles.random_targets(rng, np.array([S]), C, 0, S=S, repeat_prob=0.3)
    loss, stats = loss_only(lp, targets, [T], [S])
    expected, _ = oracles.extended_precision_reference(lp[:, 0], targets[0])
    assert stats.fast == 1
    assert abs(loss[0] - expected) <= 8 * T * 2.0**-53 * abs(expected)


@pytest.mark.parametrize("T, C, S, scale", [(1200, 12, 200, 30.0), (300, 5, 40, 50.0)])
def test_very_confident_outputs_match_torch(rng, T, C, S, scale):
    """logits x 30 and x 50: log-probs down to about -270, neighbouring cells up to ~1,300 bits apart (near the
    representation's limit, or past the emission floor); whatever path each sample takes, the loss is torch's."""
    lp, targets, il, tl = batch(rng, T, 4, C, S, scale=scale)
    loss, stats = loss_only(lp, targets, il, tl)
    assert stats.fast + stats.exact == 4
    assert_torch_losses(loss, lp, targets, il, tl)


def test_emissions_below_the_floor_take_the_log_space_path(rng):
    """A finite log-prob more than 311.2 nats below its frame's largest, on the lattice, sends its sample to the
    log-space path (sample 1: 330 nats; sample 3: a -1e30 mask on its first label); 300 nats below (sample 0), and a
    -1e30 mask on a class outside the lattice (sample 2), stay on the fast path."""
    T, N, C, S = 120, 4, 8, 5
    lp, targets, il, tl = batch(rng, T, N, C, S, full=True)
    lattice = [set(targets[n, :S]) | {0} for n in range(N)]
    lp[7, 0, targets[0, 0]] = lp[7, 0].max() - 300.0
    lp[9, 1, targets[1, 0]] = lp[9, 1].max() - 330.0
    outside = next(c for c in range(C) if c not in lattice[2])
    lp[:, 2, outside] = -1e30
    lp[:, 3, targets[3, 0]] = -1e30
    loss, stats = loss_only(lp, targets, il, tl)
    assert stats.records[0].exact == (1, 3) and stats.fast == 2
    assert_torch_losses(loss, lp, targets, il, tl)
    assert np.isfinite(loss).all()  # a finite mask is a probability, not a zero


def test_masked_classes_off_the_lattice_keep_the_fast_path(rng):
    """With blank = 3, shorter targets (padded with 0 by validation) and class 0 masked (-1e30) in every frame: class
    0 is on no sample's lattice, so no sample leaves the fast path."""
    T, N, C = 50, 3, 6
    lp = oracles.random_log_probs(rng, T, N, C)
    lp[:, :, 0] = -1e30
    targets = np.array([[1, 2, 4, 5], [2, 2, 0, 0], [5, 0, 0, 0]])
    tl, il = np.array([4, 2, 1]), np.array([T, T, T - 9])
    with using("numpy"), path_stats() as stats:
        loss = deploy_ctc.ctc_loss(lp, targets, il, tl, blank=3, reduction="none")
    assert stats.exact == 0 and stats.fast == N
    oracles.assert_close(loss, oracles.torch_losses(lp, targets, il, tl, blank=3), np.float64, "loss")


def test_a_cell_far_below_its_feeder_takes_the_log_space_path(rng):
    """Target (1, 1), so l' = (b, 1, b, 1, b) without skips; frames 0-3 give the blank and label 1 in turn a
    log-prob 310 nats below the other. At frame 3 the cell s = 4 (reached only along b, 1, b, 1, b, each step at
    -310) lies about 4 * 310 nats (1,790 bits) below s = 3 (reached at no cost): more than G + R = 1391 bits, so
    the stored exponent cannot follow and the sample is redone exactly. Its neighbour (the same random frames
    without the construction) stays fast."""
    T, C = 60, 4
    lp = oracles.random_log_probs(rng, T, 2, C)
    lp[:, 1] = lp[:, 0]
    targets, il, tl = np.array([[1, 1], [1, 1]]), np.array([T, T]), np.array([2, 2])
    for t in range(4):
        lp[t, 0] = [0.0, -310.0, -1.0, -1.0] if t % 2 == 0 else [-310.0, 0.0, -1.0, -1.0]
    loss, stats = loss_only(lp, targets, il, tl)
    assert stats.records[0].exact == (0,) and stats.fast == 1
    assert_torch_losses(loss, lp, targets, il, tl)


def test_minus_inf_log_probs_take_the_log_space_path_and_match_torch(rng):
    """-inf on a lattice class in a used frame: exact zeros the pass does not represent (log-space path); an all
    -inf frame makes the loss infinite; -inf only in the padding (sample 3) stays on the fast path."""
    T, N, C, S = 200, 4, 5, 20
    lp, targets, il, tl = batch(rng, T, N, C, S)
    il[3] = T - 20
    lp[rng.random((T, N, C)) < 0.1] = -np.inf
    lp[:, 3] = oracles.random_log_probs(rng, T, 1, C)[:, 0]
    lp[il[3]:, 3] = -np.inf
    lp[50, 1, :] = -np.inf
    loss, stats = loss_only(lp, targets, il, tl)
    assert stats.records[0].exact == (0, 1, 2) and np.isinf(loss[1])
    assert_torch_losses(loss, lp, targets, il, tl)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_and_inf_follow_torch_in_used_frames_and_never_leak_from_padding(rng, value):
    T, N, C, S = 40, 4, 6, 6
    lp, targets, il, tl = batch(rng, T, N, C, S, full=True)
    il[2] = T - 5
    lp[10, 1, targets[1, 0]] = value  # used: torch's log-space recursion decides (NaN)
    lp[il[2]:, 2] = value  # padding: never read
    lp[3, 3, 0] = value  # the blank, used
    loss, stats = loss_only(lp, targets, il, tl)
    assert stats.records[0].exact == (1, 3)
    assert_torch_losses(loss, lp, targets, il, tl)
    assert np.isfinite(loss[[0, 2]]).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_reductions_and_zero_infinity_match_torch(rng, reduction, zero_infinity):
    lp, targets, il, tl = batch(rng, 30, 5, 6, 8, full=True)
    il[2] = 3  # infeasible: +inf, or 0 with zero_infinity
    loss, _ = loss_only(lp, targets, il, tl, reduction, zero_infinity)
    expected, _ = oracles.torch_reference(lp, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity)
    oracles.assert_close(loss, expected, np.float64, "loss")


def test_loss_only_agrees_with_the_loss_of_loss_and_grad(rng):
    """Two different recursions (forward alone with per-position exponents; forward and backward with per-frame
    scales, checked by their consistency identity) give the same losses."""
    lp, targets, il, tl = batch(rng, 300, 6, 15, 50, scale=3.0)
    with using("numpy"):
        loss = deploy_ctc.ctc_loss(lp, targets, il, tl, reduction="none")
        loss_both, _ = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, reduction="none")
    np.testing.assert_allclose(loss, loss_both, rtol=1e-12, atol=0)


def test_large_batches_run_in_pipelined_chunks(rng, monkeypatch):
    """Above the pipeline's threshold the batch is split over chunks (emissions on the worker threads); the losses
    are those of one chunk."""
    monkeypatch.setattr(pure_numpy, "_PARALLEL_MIN_CELLS", 1000)
    lp, targets, il, tl = batch(rng, 120, 12, 10, 15)
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    with path_stats() as stats:
        nll, grad = pure_numpy.forward_backward(problem)
    assert grad is None and stats.records[0].parts >= 2 and stats.exact == 0
    assert_torch_losses(nll, lp, targets, il, tl)


# ---- the representation, unit by unit ----

def brute_force_capped(e):
    """``E(s) = max_{j <= s} e(j) - G ceil((s - j) / 2)``, a loop per cell."""
    k, L = e.shape
    out = np.empty_like(e)
    for n in range(k):
        for s in range(L):
            out[n, s] = max(e[n, j] - loss_numpy.G * math.ceil((s - j) / 2) for j in range(s + 1))
    return out


@pytest.mark.parametrize("L", [1, 2, 5, 12])
def test_stored_exponents_are_the_capped_running_maximum(rng, L):
    e = rng.integers(-3000, 3000, (6, L))
    e[0] = -rng.integers(0, 5, L) * 10**6  # steep falls: every cell capped
    got = loss_numpy._capped(e)
    np.testing.assert_array_equal(got, brute_force_capped(e))
    assert (got >= e).all()
    assert (got[:, 1:] >= got[:, :-1] - loss_numpy.G).all() and (got[:, 2:] >= got[:, :-2] - loss_numpy.G).all()


def test_renormalisation_keeps_every_value_exactly_and_bounds_the_factors(rng):
    """Values ``a 2^E`` are unchanged bit for bit; nonzero mantissas land in ``[2^-(R+1), 1)``; factors are the
    powers of two between neighbouring exponents (at most 2^G); a cell more than G + R bits below its feeder loses
    its sample."""
    k, L = 3, 9
    width = L + 2
    a = np.zeros((k, width))
    a[:, 2:] = np.ldexp(rng.uniform(0.5, 4.0, (k, L)), rng.integers(-300, 300, (k, L)))
    a[0, 2 + 6:] = 0.0  # the top of sample 0 not reached yet
    exponent = np.cumsum(rng.integers(-50, 50, (k, L)), axis=1) + rng.integers(-5000, 5000, (k, 1))
    before = [[(a[n, s + 2], exponent[n, s]) for s in range(L)] for n in range(k)]
    skip = np.zeros((k, width))
    skip[:, 5::2] = 1.0
    factors = np.zeros((2, k, width))
    lost = np.zeros(k, dtype=bool)
    exponent[2, 4] = exponent[2, 3] - 2000  # sample 2's cell 4 lies ~2000 bits below its feeder
    before[2][4] = (a[2, 6], exponent[2, 4])
    loss_numpy._renormalise(a, exponent, factors, skip, lost)
    assert lost.tolist() == [False, False, True] and (a[2] == 0).all()
    for n in range(2):
        for s in range(L):
            value, e = before[n][s]
            if value == 0:
                assert a[n, s + 2] == 0
                continue
            mantissa = a[n, s + 2]
            assert 2.0 ** -(loss_numpy.R + 1) <= mantissa < 1.0
            # same value: the exponents differ by less than 1100, so comparing mantissas scaled by the difference
            assert np.ldexp(mantissa, int(exponent[n, s] - e)) == value
    factors1, factors2 = factors
    for n in range(2):
        for s in range(1, L):
            assert factors1[n, s + 2] == 2.0 ** float(exponent[n, s - 1] - exponent[n, s])
            assert factors2[n, s + 2] == (skip[n, s + 2] * 2.0 ** float(exponent[n, s - 2] - exponent[n, s])
                                          if s >= 2 else 0.0)
    assert factors1.max() <= 2.0 ** loss_numpy.G and factors2.max() <= 2.0 ** loss_numpy.G
    assert (factors1[:, :3] == 0).all() and (factors2[:, :4] == 0).all()  # nothing crosses between samples


def test_constants_satisfy_the_error_argument():
    """The module docstring's inequalities: no overflow (G + H + 2 <= 1023), dropped terms below 2^-53 of a cell
    (H + P <= 1021), and at least one frame between renormalisations (each frame costs at most B bits)."""
    c = loss_numpy
    assert c.G + c.H + 2 <= 1023 and c.H + c.P <= 1021 and c.P == c.R + 1 + c.B
    assert math.isclose(c.FLOOR_LOG, -(c.B - 1) * math.log(2.0))
