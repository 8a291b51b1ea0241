"""deploy_ctc._backends.cpu.pure_numpy.forward_backward on validated problems (the deploy_ctc._backends.Backend
protocol).

The backend returns per-sample nll (N,) in float64 (+inf when infeasible, never zeroed) and, when grad_scale is
given, grad = grad_scale[n] * (exp(lp) - posterior) (or -posterior), 0 beyond input_lengths, NaN rows for an
infinite nll (0 with zero_infinity). Oracles: torch float64 (reduction="none", unit weights) and brute force.
"""

import importlib
import importlib.util

import numpy as np
import pytest

from deploy_ctc import validation
from tests.utils import oracles, peak_memory

pytest.importorskip("torch", reason="torch (the test extra) is the float64 oracle")

# Both CPU backends (native where a compiler exists) and the exact log-space twin: one body tests all three.
BACKENDS = ["deploy_ctc._backends.cpu.pure_numpy", "deploy_ctc._backends.cpu.native"] + [
    name for name in ["deploy_ctc._backends.cpu.logspace"] if importlib.util.find_spec(name) is not None]


@pytest.fixture(params=BACKENDS)
def pure_numpy(request):
    if request.param == "deploy_ctc._backends.cpu.native":
        from deploy_ctc._backends.cpu import native_build

        try:
            native_build.library()
        except native_build.NativeUnavailable as error:
            pytest.skip(f"the native engine is not available here: {error}")
    return importlib.import_module(request.param)


def make_problem(rng, T, N, C, S, blank=0, dtype=np.float64, zero_infinity=False, scale=1.0, full=False):
    lp = oracles.random_log_probs(rng, T, N, C, dtype, scale)
    tl = np.full(N, S) if full else rng.integers(0, S + 1, N)
    targets = oracles.random_targets(rng, tl, C, blank, S=S, repeat_prob=0.3)
    il = np.full(N, T) if full else rng.integers(0, T + 1, N)
    return validation.validate(lp, targets, il, tl, blank, "none", zero_infinity), lp, targets, il, tl


def expected(lp, targets, il, tl, blank, scale, convention="torch", zero_infinity=False):
    """Oracle (nll, grad) of the backend contract from torch's per-sample loss and unit-weight gradient."""
    nll, unit_grad = oracles.torch_reference(lp, targets, il, tl, blank, "none", convention=convention)
    grad = unit_grad * scale[None, :, None]
    if zero_infinity:
        grad = np.where(np.isinf(nll)[None, :, None], 0.0, grad)
    return nll, grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", ["torch", "plain"])
@pytest.mark.parametrize("T,N,C,S", [(1, 1, 2, 1), (9, 5, 4, 4), (33, 7, 11, 9), (64, 3, 129, 20)])
def test_forward_backward_matches_torch(rng, T, N, C, S, convention, dtype, pure_numpy):
    blank = C // 2
    problem, lp, targets, il, tl = make_problem(rng, T, N, C, S, blank, dtype)
    scale = rng.uniform(-2, 2, N)
    nll, grad = pure_numpy.forward_backward(problem, scale, convention)
    ref_nll, ref_grad = expected(lp, targets, il, tl, blank, scale, convention)
    assert nll.shape == (N,) and nll.dtype == np.float64
    oracles.assert_close(nll, ref_nll, np.float64 if dtype == np.float64 else np.float32, "nll")
    assert grad.shape == (T, N, C) and grad.dtype == problem.log_probs.dtype
    oracles.assert_close(grad, ref_grad, dtype, "grad")


def test_no_grad_without_grad_scale(rng, pure_numpy):
    problem, lp, targets, il, tl = make_problem(rng, 12, 4, 5, 4)
    nll, grad = pure_numpy.forward_backward(problem)
    assert grad is None
    oracles.assert_close(nll, oracles.torch_reference(lp, targets, il, tl, 0, "none")[0], np.float64, "nll")


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_infeasible_rows(rng, zero_infinity, pure_numpy):
    lp = oracles.random_log_probs(rng, 5, 3, 4)
    targets, il, tl = np.array([[1, 1, 1], [1, 2, 3], [2, 0, 0]]), np.array([4, 2, 0]), np.array([3, 3, 1])
    problem = validation.validate(lp, targets, il, tl, 0, "none", zero_infinity)
    nll, grad = pure_numpy.forward_backward(problem, np.ones(3))
    np.testing.assert_array_equal(nll, np.inf)  # never zeroed by the backend
    inside = np.arange(5)[:, None] < il[None, :]  # (T, N)
    if zero_infinity:
        np.testing.assert_array_equal(grad, 0.0)
    else:
        assert np.isnan(grad[inside]).all()
    np.testing.assert_array_equal(grad[~inside], 0.0)


def test_rows_beyond_input_length_are_zero_and_never_read(rng, pure_numpy):
    problem, lp, targets, il, tl = make_problem(rng, 10, 4, 5, 3)
    il = np.array([10, 6, 1, 0])
    tl = np.minimum(tl, [3, 3, 1, 0])
    clean = lp.copy()
    for n, length in enumerate(il):
        lp[length:, n] = np.nan
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    nll, grad = pure_numpy.forward_backward(problem, np.ones(4))
    ref_nll, ref_grad = expected(clean, targets, il, tl, 0, np.ones(4))
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


def test_strided_log_probs_view(rng, pure_numpy):
    base = oracles.random_log_probs(rng, 5, 14, 9)  # (N, 2T, C)
    lp = base.transpose(1, 0, 2)[::2]  # (T, N, C) view
    targets, il, tl = np.array([[1, 2], [3, 3], [4, 0], [8, 1], [2, 2]]), np.full(5, 7), np.array([2, 2, 1, 2, 2])
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    assert not problem.log_probs.flags.c_contiguous
    nll, grad = pure_numpy.forward_backward(problem, np.ones(5))
    ref_nll, ref_grad = expected(lp, targets, il, tl, 0, np.ones(5))
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


@pytest.mark.parametrize("T,scale", [(2500, 1.0), (300, 300.0), (2000, 300.0)])
def test_long_and_peaky_stay_finite(rng, T, scale, pure_numpy):
    problem, lp, targets, il, tl = make_problem(rng, T, 2, 5, 40, scale=scale, full=True)
    ref_nll, ref_grad = expected(lp, targets, il, tl, 0, np.ones(2))
    assert np.isfinite(ref_nll).all()
    nll, grad = pure_numpy.forward_backward(problem, np.ones(2))
    assert np.isfinite(nll).all() and np.isfinite(grad).all()
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


@pytest.mark.parametrize("T,C", [(4, 3), (6, 3)])
def test_matches_brute_force(rng, T, C, pure_numpy):
    N = 6
    for blank in (0, C - 1):
        tl = np.array([0, 1, 2, 3, 2, 3])
        targets = oracles.random_targets(rng, tl, C, blank, repeat_prob=0.6)
        il = np.array([T, T, T, T, 2, T - 1])
        lp = oracles.random_log_probs(rng, T, N, C)
        nll, post = oracles.brute_force_batch(lp, targets, il, tl, blank)
        scale = rng.uniform(0.5, 2, N)
        problem = validation.validate(lp, targets, il, tl, blank, "none", False)
        got_nll, got_grad = pure_numpy.forward_backward(problem, scale)
        oracles.assert_close(got_nll, nll, np.float64, "nll")
        oracles.assert_close(got_grad, oracles.grad_from_posterior(lp, post, nll, il, scale), np.float64, "grad")


@pytest.mark.skipif(not peak_memory.supported(), reason="needs Linux /proc to measure a process's peak memory")
def test_large_C_allocates_no_float64_TNC_temporary(pure_numpy):
    """With large C, the float32 gradient is the only (T, N, C) array: no temporary of that size, not even a float32
    one, whoever allocates it (measured on the whole process, the native engine's malloc included)."""
    T, N, C, S = 40, 4, 20000, 10
    tnc32 = T * N * C * 4
    tables = T * N * (2 * S + 1) * 8
    peak = peak_memory.peak_growth("tests.utils.peak_memory:backend_call", backend=pure_numpy.__name__,
                                   T=T, N=N, C=C, S=S)
    assert peak >= 0.9 * tnc32, f"peak {peak / 2**20:.1f} MiB below the gradient itself: the measurement is broken"
    # grad + half a float32 (T, N, C) temporary + DP tables + 2 MiB (the process: allocator and interpreter noise)
    budget = 1.5 * tnc32 + 8 * tables + (2 << 20)
    assert peak < budget, f"peak {peak / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB"


@pytest.mark.skipif(not peak_memory.supported(), reason="needs Linux /proc to measure a process's peak memory")
def test_float16_peaks_below_float32(rng, pure_numpy):
    """float16 input is upcast a group of samples at a time: its peak (float16 gradient plus one group's float32
    copy and gradient) stays below float32's (its float32 gradient), instead of a whole float32 copy on top; the
    results match float32 on the same values to float16's rounding."""
    T, N, C, S = 100, 48, 1000, 5  # a 19 MB float32 copy: above the size upcast whole
    problem32, lp, targets, il, tl = make_problem(rng, T, N, C, S, dtype=np.float32, full=True)
    problem16 = validation.validate(lp.astype(np.float16), targets, il, tl, 0, "none")
    problem32 = validation.validate(lp.astype(np.float16).astype(np.float32), targets, il, tl, 0, "none")
    peak16, peak32 = (peak_memory.peak_growth("tests.utils.peak_memory:backend_call", backend=pure_numpy.__name__,
                                              T=T, N=N, C=C, S=S, dtype=dtype) for dtype in ("float16", "float32"))
    assert peak16 < peak32, f"float16 peak {peak16 / 2**20:.1f} MiB >= float32 peak {peak32 / 2**20:.1f} MiB"
    nll16, grad16 = pure_numpy.forward_backward(problem16, np.ones(N))
    nll32, grad32 = pure_numpy.forward_backward(problem32, np.ones(N))
    assert grad16.dtype == np.float16
    np.testing.assert_allclose(nll16, nll32, rtol=1e-12)
    np.testing.assert_allclose(grad16, grad32, rtol=0, atol=2.0**-11)


@pytest.mark.skipif(not peak_memory.supported(), reason="needs Linux /proc to measure a process's peak memory")
def test_broadcast_view_is_not_copied_per_sample(pure_numpy):
    """A (T, N, C) broadcast of one (T, 1, C) sample: only the gathered entries are read, never a (T, C) copy per
    sample (measured on the whole process, for the loss alone: the pure-NumPy backend's tables are all it needs)."""
    T, N, C, S = 300, 64, 2000, 4
    L = 2 * S + 1
    # The pure-NumPy backend's loss-only tables: float64 emissions (L + 2 columns), the float32 gathered log-probs,
    # and three float64 (T, 2N) normaliser arrays. The other backends need less.
    tables = T * N * ((L + 2) * 8 + L * 4 + 3 * 2 * 8)
    peak = peak_memory.peak_growth("tests.utils.peak_memory:backend_call", backend=pure_numpy.__name__,
                                   T=T, N=N, C=C, S=S, broadcast=True, with_grad=False)
    assert peak < tables + T * C * 4 / 2, f"peak {peak / 2**20:.1f} MiB: a (T, C) block was copied"


def test_large_mixed_batch(rng, pure_numpy, monkeypatch):
    """A batch large enough to be split into chunks and handed to (three) worker threads, mixing every kind of
    sample."""
    from deploy_ctc._backends.cpu import common
    from deploy_ctc.backends import path_stats

    monkeypatch.setattr(common, "pool_size", lambda: 3)
    T, N, C, S = 300, 24, 40, 30
    lp = oracles.random_log_probs(rng, T, N, C)
    lp[:, 5:8] = oracles.random_log_probs(rng, T, 3, C, scale=300.0)  # peaky samples
    tl = rng.integers(0, S + 1, N)
    tl[0] = S
    targets = oracles.random_targets(rng, tl, C, blank=7, S=S, repeat_prob=0.3)
    il = rng.integers(2 * S, T + 1, N)
    il[[3, 9]] = 0  # zero-length inputs (sample 3 infeasible unless its target is empty)
    il[11] = max(tl[11] - 1, 0)  # infeasible
    clean = lp.copy()
    for n in range(N):
        lp[il[n]:, n] = np.nan  # padding never read
    problem = validation.validate(lp, targets, il, tl, 7, "none", False)
    scale = rng.uniform(0.5, 2.0, N)
    with path_stats() as stats:
        nll, grad = pure_numpy.forward_backward(problem, scale)
    if not pure_numpy.__name__.endswith(".logspace"):  # the log-space twin has one path and no threads
        assert [record.parts >= 2 for record in stats.records] == [True], stats.records
    ref_nll, ref_grad = expected(clean, targets, il, tl, 7, scale)
    oracles.assert_close(nll, ref_nll, np.float64, "nll")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")
    nll_only, _ = pure_numpy.forward_backward(problem)
    oracles.assert_close(nll_only, ref_nll, np.float64, "nll without grad")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_large_batch_in_a_forked_child_after_the_parent_used_the_worker_pool():
    """The worker pool is per process: a child forked after the parent used it must not wait on dead threads."""
    import multiprocessing

    import torch

    import deploy_ctc
    from benchmarks.common import make_inputs

    inputs = make_inputs(300, 16, 40, 40)  # large enough for the threaded pipeline
    parent_loss, parent_grad = deploy_ctc.ctc_loss_and_grad(*inputs)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        child_loss, child_grad = pool.apply_async(deploy_ctc.ctc_loss_and_grad, inputs).get(timeout=30)
    np.testing.assert_array_equal(child_loss, parent_loss)
    np.testing.assert_array_equal(child_grad, parent_grad)
    expected = torch.nn.functional.ctc_loss(torch.from_numpy(inputs[0]).double(),
                                            *(torch.from_numpy(a) for a in inputs[1:]))
    assert np.isclose(float(parent_loss), float(expected), rtol=1e-6)


# --- fuzz against torch float64: low-precision, peaky and huge-negative inputs ----------------------------------
def _fuzz_case(rng, i):
    """Case ``i``: small random shapes and lengths, float16/float32/float64 log-softmax rows of logits scaled up to
    3000 (peaky: labels hundreds of nats below the frame's best), and in every other case finite masks
    (-1e30, -3.4e38, -1e300) or -inf on 20% of the entries."""
    T, C, N = int(rng.integers(1, 12)), int(rng.integers(2, 7)), int(rng.integers(1, 4))
    tl = rng.integers(0, min(T, 4) + 1, N)
    il = rng.integers(0, T + 1, N)
    dtype = (np.float16, np.float32, np.float64)[i % 3]
    lp = oracles.log_softmax(rng.normal(size=(T, N, C)) * rng.choice([1.0, 30.0, 300.0, 3000.0]))
    if i % 2:
        mask = rng.random(lp.shape) < 0.2
        lp[mask] = rng.choice([-1e30, -np.inf] if dtype != np.float64 else [-1e30, -3.4e38, -1e300, -np.inf])
    targets = rng.integers(1, C, (N, max(int(tl.max()), 1)))
    with np.errstate(over="ignore"):  # -1e30 is -inf in float16
        return lp.astype(dtype), targets, il, tl


def test_fuzz_against_torch(pure_numpy):
    """The loss in float64 (before the caller's rounding) must match torch on the same values: a float32 exp
    flushing labels 104 nats below the frame's best, or a finite mask read as log zero, shows up here. Gradients
    are compared where the loss is representable to float64 precision (below 1e15: with a 1e30 loss both torch's
    and any other float64 gradient are cancellation noise); torch's NaN at -inf entries of a finite loss is its
    own -inf - (-inf), where the derivative is 0."""
    rng = np.random.default_rng(20240610)
    for i in range(60):
        lp, targets, il, tl = _fuzz_case(rng, i)
        problem = validation.validate(lp, targets, il, tl, 0, "none", False)
        scale = np.ones(il.size)
        nll, grad = pure_numpy.forward_backward(problem, scale)
        ref_nll, ref_grad = expected(lp.astype(np.float64), targets, il, tl, 0, scale)
        what = f"case {i}: {lp.dtype} T={lp.shape[0]} il={il} tl={tl}"
        oracles.assert_close(nll, ref_nll, np.float64, f"{what} nll")
        meaningful = np.isfinite(ref_nll) & (np.abs(ref_nll) < 1e15)  # (N,)
        ref_grad = np.where(np.isneginf(lp) & np.isnan(ref_grad) & np.isfinite(ref_nll)[None, :, None], 0.0, ref_grad)
        oracles.assert_close(grad[:, meaningful], ref_grad[:, meaningful], grad.dtype, f"{what} grad")
        assert not np.isnan(grad[:, np.isfinite(ref_nll)]).any(), f"{what}: NaN in the gradient of a finite loss"


@pytest.mark.parametrize("mask", [-1e30, -3.4e38, -1e300])
@pytest.mark.parametrize("zero_infinity", [False, True])
def test_finite_masks_are_probabilities(mask, zero_infinity, pure_numpy):
    """A label masked with a finite value on every frame: torch's loss is finite (T frames cost about |mask|
    each, at least one of them on the label), never zeroed by zero_infinity, and its gradient is finite."""
    T, C = 3, 3
    lp = np.full((T, 1, C), mask)
    lp[:, 0, 0] = 0.0  # blank certain, label 1 masked
    problem = validation.validate(lp, np.array([[1]]), [T], [1], 0, "none", zero_infinity)
    nll, grad = pure_numpy.forward_backward(problem, np.ones(1))
    ref_nll, _ = expected(lp, np.array([[1]]), [T], [1], 0, np.ones(1))
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-12)
    assert np.isfinite(nll).all() and np.isfinite(grad).all()


SPECIAL_CASES = {  # (frame, class) of the special value in sample 0 (T = 5, target [1, 2], input length 4)
    "label on the path": (1, 1),
    "blank on the path": (2, 0),
    "class outside the target": (1, 3),
    "frame past the input length": (4, 1),
}


@pytest.mark.parametrize("value", [np.inf, np.nan])
@pytest.mark.parametrize("where", sorted(SPECIAL_CASES))
def test_nan_and_inf_log_probs_match_torch(rng, value, where, pure_numpy):
    """torch: NaN or +inf on the lattice of a used frame makes the loss NaN and the sample's rows NaN; on another
    class only that gradient entry (exp(lp): inf or NaN); in a frame past the input length nothing."""
    lp = oracles.random_log_probs(rng, 5, 2, 4)
    targets, il, tl = np.array([[1, 2], [3, 1]]), np.array([4, 5]), np.array([2, 2])
    lp[(SPECIAL_CASES[where][0], 0, SPECIAL_CASES[where][1])] = value
    problem = validation.validate(lp, targets, il, tl, 0, "none", False)
    scale = np.ones(2)
    nll, grad = pure_numpy.forward_backward(problem, scale)
    ref_nll, ref_grad = expected(lp, targets, il, tl, 0, scale)
    oracles.assert_close(nll, ref_nll, np.float64, f"{where} nll")
    np.testing.assert_array_equal(np.isinf(grad), np.isinf(ref_grad))
    oracles.assert_close(grad, ref_grad, np.float64, f"{where} grad")
