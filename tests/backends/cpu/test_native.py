"""deploy_ctc._backends.cpu.native beyond the backend contract (which tests/backends/test_contract.py runs on it too):
the engine's own exponential and layouts it must copy.

Oracles: NumPy's exp (correctly rounded to within an ulp) and torch float64 (tests/utils/oracles.py).
"""

import numpy as np
import pytest

from deploy_ctc import validation
from deploy_ctc._backends import cpu as cpu_backends
from deploy_ctc._backends import paths
from deploy_ctc._backends.cpu import native
from deploy_ctc.backends import path_stats
from tests.utils import oracles

if cpu_backends.name() != "native":
    pytest.skip("the native engine cannot be built here (no C++ compiler)", allow_module_level=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_gradient_term_is_exp_to_one_ulp_with_ieee_special_values(rng, dtype):
    """Classes outside the target get grad = grad_scale * exp(lp) exactly: the engine's polynomial exp, checked
    against NumPy over the whole range, subnormal results, overflow, +-inf and NaN."""
    T, N, C = 4, 2, 4096
    info = np.finfo(dtype)
    low, high = np.log(float(info.smallest_subnormal)) - 2, np.log(float(info.max)) + 2
    lp = rng.uniform(low, high, (T, N, C)).astype(dtype)
    lp[:, :, :2] = np.log(0.5)  # blank 0 and label 1: the lattice stays ordinary
    lp[0, 0, 2:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, np.log(float(info.max)) * 0.999]
    targets, il, tl = np.ones((N, 1), dtype=np.int64), np.full(N, T), np.ones(N, dtype=np.int64)
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    nll, grad = native.forward_backward(problem, np.ones(N))
    with np.errstate(over="ignore"):
        expected = np.exp(lp[:, :, 2:].astype(np.float64)).astype(dtype)
    got = grad[:, :, 2:]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    ulps = np.abs(got[finite].astype(np.float64) - expected[finite]) / np.spacing(expected[finite]).astype(np.float64)
    assert ulps.max() <= 1.0, f"exp off by {ulps.max()} ulp"
    assert (got[expected == 0] == 0).all()
    assert np.isfinite(nll).all()  # NaN in a class no alignment uses does not reach the loss (as in torch)


def test_strides_that_are_not_whole_elements(rng):
    """A float64 view with 12-byte steps (inside packed records) is copied for the engine, not misread."""
    T, N, C = 7, 3, 5
    dense = oracles.random_log_probs(rng, T, N, C)
    buffer = np.zeros(T * N * C * 12 + 4, dtype=np.uint8)
    view = np.ndarray((T, N, C), dtype=np.float64, buffer=buffer, offset=4, strides=(N * C * 12, C * 12, 12))
    view[...] = dense
    targets, il, tl = np.array([[1, 2], [3, 3], [4, 0]]), np.array([7, 6, 3]), np.array([2, 2, 1])
    scale = np.array([1.0, 0.5, 2.0])
    nll, grad = native.forward_backward(validation.validate(view, targets, il, tl, 0, "none", False), scale)
    ref_nll, ref_grad = oracles.torch_reference(dense, targets, il, tl, 0, "none")
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad * scale[None, :, None], np.float64, "grad")


def test_big_endian_input(rng):
    lp = oracles.random_log_probs(rng, 9, 2, 4)
    targets, il, tl = np.array([[1, 2], [3, 3]]), np.array([9, 8]), np.array([2, 2])
    problem = validation.validate(lp.astype(">f8"), targets, il, tl, 0, "none", False)
    nll, grad = native.forward_backward(problem, np.ones(2))
    ref_nll, ref_grad = oracles.torch_reference(lp, targets, il, tl, 0, "none")
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


def test_many_samples_on_the_worker_threads_match_one_at_a_time(rng, monkeypatch):
    """A batch big enough for the thread split (and for lanes of samples in lockstep) gives each sample exactly
    what it gets alone; three worker threads are asked for whatever this machine has, and the recorded paths show
    the work went to them in three parts."""
    from deploy_ctc._backends.cpu import common

    monkeypatch.setattr(common, "pool_size", lambda: 3)
    T, N, C, S = 200, 48, 12, 20
    lp = oracles.random_log_probs(rng, T, N, C)
    tl = np.full(N, S)
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    il = rng.integers(2 * S + 1, T + 1, N)
    cells = int((il * (2 * tl + 1 + C)).sum())  # the engine's cost estimate
    assert cells >= 1.3 * native._PARALLEL_MIN_CELLS
    scale = rng.uniform(0.5, 2, N)
    with path_stats() as stats:
        nll, grad = native.forward_backward(validation.validate(lp, targets, il, tl, 0, "none", False), scale)
    assert [(record.parts, record.exact) for record in stats.records] == [(3, ())]
    for n in (0, 17, 39):
        one = validation.validate(lp[:, n:n + 1], targets[n:n + 1], il[n:n + 1], tl[n:n + 1], 0, "none", False)
        nll_n, grad_n = native.forward_backward(one, scale[n:n + 1])
        assert nll_n[0] == nll[n]
        np.testing.assert_array_equal(grad_n[:, 0], grad[:, n])


def engine_ok(problem, scale, convention="torch"):
    """Per-sample ``ok`` flags of one engine call: 1 where the engine produced the result itself (either path)."""
    from deploy_ctc._backends.cpu import common
    from deploy_ctc._backends.cpu import native_build

    nll, grad, scale, run = common.start(problem, scale)
    ok = np.zeros(nll.shape, dtype=np.uint8)
    native._run_engine(native_build.library(), problem, np.flatnonzero(run), nll, ok, grad, scale,
                               convention)
    return ok


@pytest.mark.parametrize("convention", ["torch", "plain"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_peaky_inputs_take_the_engines_log_space_path(rng, convention, dtype):
    """Confident (peaky) outputs make the scaled recursions' alpha and beta masses disjoint (Z_t near 1e-300): the
    engine redoes such samples in log space itself, overwriting the rows its failed pass wrote."""
    T, N, C, S = 300, 4, 5, 40
    lp = oracles.random_log_probs(rng, T, N, C, dtype, scale=30.0)
    tl = np.full(N, S)
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    il = np.full(N, T)
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    scale = rng.uniform(0.5, 2, N)
    assert engine_ok(problem, scale, convention).all()  # no sample left for the Python twin
    nll, grad = native.forward_backward(problem, scale, convention)
    ref_nll, ref_grad = oracles.torch_reference(lp, targets, il, tl, 0, "none", convention=convention)
    oracles.assert_close(nll, ref_nll, np.float64 if dtype == np.float64 else np.float32, "nll")
    oracles.assert_close(grad, ref_grad * scale[None, :, None], dtype, "grad")


def test_nan_log_probs_are_left_to_the_python_twin(rng):
    lp = oracles.random_log_probs(rng, 6, 2, 4)
    lp[2, 1, 1] = np.nan  # a label of sample 1's target, inside its input length
    targets, il, tl = np.array([[1, 2], [1, 3]]), np.array([6, 6]), np.array([2, 2])
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    np.testing.assert_array_equal(engine_ok(problem, np.ones(2)), [1, 0])
    nll, grad = native.forward_backward(problem, np.ones(2))
    ref_nll, ref_grad = oracles.torch_reference(lp, targets, il, tl, 0, "none")
    assert np.isnan(nll[1])
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


# Loss and gradient on lattices a per-frame scale cannot hold (long or peaky): the engine's per-position exponent
# passes (kernels/README.md), not the log-space path.


def loss_and_grad(lp, targets, il, tl, convention="torch"):
    """``(nll, grad, paths)`` of the native backend with unit gradient weights."""
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    with paths.recording() as stats:
        nll, grad = native.forward_backward(problem, np.ones(len(il)), convention)
    return nll, grad, stats


@pytest.mark.parametrize("T, S, scale", [(3000, 300, 1.0), (2000, 100, 10.0), (1200, 200, 20.0), (500, 40, 5.0)])
def test_long_and_peaky_gradients_stay_on_the_fast_path(rng, T, S, scale):
    """Random logits at T = 3000 and confident ones at any length put alpha's and beta's mass 1e-300 and more apart
    (a per-frame scale flushes one of them, and the consistency check fails); per-position exponents keep both, so
    these samples are not redone in log space and still match torch float64. NaN padding is never read."""
    N, C = 2, 12
    lp = oracles.random_log_probs(rng, T, N, C, scale=scale)
    tl = np.array([S, S // 2])
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    il = np.array([T, T - 7])
    lp[T - 7:, 1] = np.nan
    for convention in ("torch", "plain"):
        nll, grad, stats = loss_and_grad(lp, targets, il, tl, convention)
        assert stats.exact == 0 and stats.fast == N
        ref_nll, ref_grad = oracles.torch_reference(lp, targets, il, tl, 0, "none", convention=convention)
        oracles.assert_close(nll, ref_nll, np.float64, "nll")
        oracles.assert_close(grad, ref_grad, np.float64, f"grad ({convention})")


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18, reason="needs an extended-precision long double")
@pytest.mark.parametrize("T, S, scale", [(1500, 150, 1.0), (600, 60, 10.0)])
def test_long_and_peaky_gradients_are_exact_to_a_few_ulps(rng, T, S, scale):
    """Against an extended-precision oracle the per-position exponent passes are within ~1e-14 where torch float64
    itself is ~1e-11 off: they round a few times per cell and never lose mass."""
    C = 8
    lp = oracles.random_log_probs(rng, T, 1, C, scale=scale)
    targets = oracles.random_targets(rng, np.array([S]), C, 0, S=S, repeat_prob=0.3)
    nll, grad, stats = loss_and_grad(lp, targets, np.array([T]), np.array([S]))
    assert stats.exact == 0
    ref_nll, ref_grad = oracles.extended_precision_reference(lp[:, 0], targets[0, :S])
    assert abs(nll[0] - ref_nll) <= 1e-14 * ref_nll
    assert np.max(np.abs(grad[:, 0] - ref_grad)) <= 1e-13


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_gradients_with_minus_inf_log_probs(rng, dtype):
    """-inf emissions (exact zeros) on a long, confident lattice: cells they empty restart from their feeders'
    exponents in both directions; a label impossible everywhere makes the loss infinite (NaN rows, torch's)."""
    T, N, C, S = 1500, 3, 6, 100
    lp = oracles.random_log_probs(rng, T, N, C, dtype, scale=5.0)
    tl = np.array([S, S, 3])
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    lp[rng.random((T, N, C)) < 0.1] = -np.inf
    lp[::5, 0, 0] = -np.inf  # no blank on every 5th frame
    lp[:, 2, targets[2, 0]] = -np.inf
    nll, grad, stats = loss_and_grad(lp, targets, np.full(N, T), tl)
    assert np.isinf(nll[2])
    ref_nll, ref_grad = oracles.torch_reference(lp, targets, np.full(N, T), tl, 0, "none")
    # torch's NaN at a -inf entry of a finite-loss sample is its -inf - (-inf); the derivative there is 0.
    ref_grad = np.where(np.isneginf(lp) & np.isnan(ref_grad) & np.isfinite(ref_nll)[None, :, None], 0.0, ref_grad)
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad, dtype, "grad")


def test_gradients_outside_the_exponent_passes_range_take_the_log_space_path(rng):
    """An emission between e^-700 and e^-415 of its frame's largest (log-probs near -500) on a long lattice is outside
    the per-position passes' proven range: that sample is redone in log space, its neighbour is not."""
    T, N, C, S = 1500, 2, 8, 100
    lp = oracles.random_log_probs(rng, T, N, C, scale=5.0)  # confident: beyond a per-frame scale
    lp[1000, 0, 3] = lp[1000, 0].max() - 500.0
    tl = np.full(N, S)
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    targets[0, :4] = 3  # the class is used
    nll, grad, stats = loss_and_grad(lp, targets, np.full(N, T), tl)
    assert stats.records[0].exact == (0,) and stats.fast == 1
    ref_nll, ref_grad = oracles.torch_reference(lp, targets, np.full(N, T), tl, 0, "none")
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


# The loss-only pass (forward recursion alone, per-position exponents; kernels/README.md): exact on every input,
# with the log-space path only for the extreme ones. Oracle: torch float64 losses (tests/utils/oracles.py).


def loss_only(lp, targets, il, tl):
    """``(nll, paths)``: the native backend's losses without a gradient, and the paths its samples took."""
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    with paths.recording() as stats:
        nll, grad = native.forward_backward(problem)
    assert grad is None
    return nll, stats


@pytest.mark.parametrize("T, S, scale", [(3000, 60, 1.0), (2500, 300, 1.0), (3000, 100, 10.0), (1200, 200, 30.0)])
def test_loss_only_is_exact_on_long_and_peaky_inputs_without_the_log_space_path(rng, T, S, scale):
    """Long lattices put the forward mass far ahead of the alignments that can still finish (1e-300 and less
    behind the frame's largest value): a per-frame scale flushed them and fell back to log space. The per-position
    exponent keeps them, so these stay on the fast path and match torch float64."""
    N, C = 2, 12
    lp = oracles.random_log_probs(rng, T, N, C, scale=scale)
    tl = np.array([S, S // 2])
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    il = np.array([T, T - 7])
    lp[T - 7:, 1] = np.nan  # padding beyond input_lengths[1]: never read
    nll, stats = loss_only(lp, targets, il, tl)
    assert stats.exact == 0 and stats.fast == N
    oracles.assert_close(nll, oracles.torch_losses(lp, targets, il, tl), np.float64, "nll")


def test_loss_only_takes_the_log_space_path_for_extreme_emissions_and_stays_exact(rng):
    """Emissions below e^-415 relative to their frame's largest (log-probs down to about -1e3) are outside the
    pass's proven range: such samples are redone in log space."""
    T, N, C, S = 200, 3, 6, 30
    lp = oracles.random_log_probs(rng, T, N, C, scale=300.0)
    lp[:, 2] = oracles.random_log_probs(rng, T, 1, C)[:, 0]  # an ordinary sample beside them
    tl = np.full(N, S)
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    il = np.full(N, T)
    nll, stats = loss_only(lp, targets, il, tl)
    assert stats.records[0].exact == (0, 1) and stats.fast == 1
    oracles.assert_close(nll, oracles.torch_losses(lp, targets, il, tl), np.float64, "nll")


def test_loss_only_with_minus_inf_log_probs(rng):
    """-inf emissions are exact zeros: cells they empty restart from their feeders' exponents, a frame with every
    class at -inf makes the loss infinite, and a target whose label is -inf everywhere is infinite too."""
    T, N, C, S = 400, 4, 5, 40
    lp = oracles.random_log_probs(rng, T, N, C)
    tl = np.array([S, S, S, 3])
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    lp[rng.random((T, N, C)) < 0.15] = -np.inf  # scattered zeros, blank included
    lp[::7, 0, 0] = -np.inf  # the blank impossible on every 7th frame
    lp[100, 1, :] = -np.inf  # a frame where nothing is possible
    lp[:, 3, targets[3, 0]] = -np.inf  # a label that can never be emitted
    il = np.full(N, T)
    nll, _ = loss_only(lp, targets, il, tl)
    expected = oracles.torch_losses(lp, targets, il, tl)
    assert np.isinf(nll[1]) and np.isinf(nll[3])
    oracles.assert_close(nll, expected, np.float64, "nll")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_ctc_loss_runs_the_loss_only_pass_in_every_precision(rng, dtype):
    """deploy_ctc.ctc_loss computes float16/32/64 input in float64 and rounds once: torch float64 on the same
    (upcast) values is the oracle; NaN in the padding beyond each input length never leaks."""
    import deploy_ctc

    T, N, C, S = 1500, 3, 9, 80
    lp = oracles.random_log_probs(rng, T, N, C, dtype, scale=5.0)
    tl = np.array([S, 40, 1])
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    il = np.array([T, 1000, 3])
    for n in range(N):
        lp[il[n]:, n] = np.nan
    with deploy_ctc.backends.using("native"), paths.recording() as stats:
        loss = deploy_ctc.ctc_loss(lp, targets, il, tl, reduction="none")
    assert loss.dtype == dtype and stats.fast == N
    oracles.assert_close(loss, oracles.torch_losses(lp.astype(np.float64), targets, il, tl), dtype, "loss")


def test_loss_only_agrees_with_the_loss_of_loss_and_grad(rng):
    """Two independent recursions (forward with per-position exponents; forward and backward with per-frame
    scales, checked by their consistency identity) give the same losses on ordinary inputs."""
    T, N, C, S = 300, 6, 15, 50
    lp = oracles.random_log_probs(rng, T, N, C, scale=3.0)
    tl = rng.integers(0, S + 1, N)
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    il = rng.integers(2 * S + 1, T + 1, N)
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    nll, _ = native.forward_backward(problem)
    nll_both, _ = native.forward_backward(problem, np.ones(N))
    np.testing.assert_allclose(nll, nll_both, rtol=1e-12, atol=1e-12)


HUGE_T_SCRIPT = """
import numpy as np
from deploy_ctc import validation
from deploy_ctc._backends.cpu import native, native_build
lp = np.broadcast_to(np.log(np.full((1, 1, 3), 1 / 3)), (2**58, 1, 3))  # T = 2**58 frames, 24 bytes of data
problem = validation.validate(lp, np.array([[1, 2]]), [2**58], [2], 0, "none", False)
nll, ok = np.full(1, np.nan), np.zeros(1, dtype=np.uint8)
grad = np.zeros((1, 1, 3))  # never reached: the engine refuses the scratch size before anything else
try:
    native._run_engine(native_build.library(), problem, np.array([0]), nll, ok, grad, np.ones(1), "torch")
except MemoryError as error:
    print("MemoryError", error)
"""


def test_scratch_size_beyond_64_bits_is_a_memory_error_not_a_crash():
    """A broadcast log_probs can claim any T; the gradient pass's scratch size (about 3 S T doubles) must not wrap
    around to a small allocation (the loss-only pass has no T-sized scratch). In a subprocess, so that a crash
    fails the test instead of the run."""
    import subprocess
    import sys

    from deploy_ctc._backends.cpu import native_build

    try:
        native_build.library()
    except native_build.NativeUnavailable as error:
        pytest.skip(f"the native engine is not available here: {error}")
    result = subprocess.run([sys.executable, "-c", HUGE_T_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"exit status {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.startswith("MemoryError"), result.stdout


def test_engine_addresses_of_every_kind_of_array():
    """_address reads the data address through the buffer protocol, falling back for arrays that cannot export a
    writable buffer; numpy's own .ctypes.data is the oracle."""
    base = np.arange(12, dtype=np.int64)
    read_only = base.copy()
    read_only.flags.writeable = False
    strided = (base[::2], base[::-1], np.asfortranarray(base.reshape(3, 4)), base.reshape(3, 4)[:, 1:])
    for array in (base, base[2:], read_only, np.broadcast_to(base, (2, 12)), np.zeros((3, 0)), *strided):
        assert native._address(array) == array.ctypes.data
