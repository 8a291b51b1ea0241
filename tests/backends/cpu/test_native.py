"""deploy_ctc._backends.cpu.native beyond the backend contract (which tests/backends/test_contract.py runs on it too):
the engine's own exponential and layouts it must copy.

Oracles: NumPy's exp (correctly rounded to within an ulp) and torch float64 (tests/utils/oracles.py).
"""

import numpy as np
import pytest

from deploy_ctc import validation
from deploy_ctc._backends import cpu as cpu_backends
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


HUGE_T_SCRIPT = """
import numpy as np, deploy_ctc
from deploy_ctc import backends
lp = np.broadcast_to(np.log(np.full((1, 1, 3), 1 / 3)), (2**58, 1, 3))  # T = 2**58 frames, 24 bytes of data
with backends.using("native"):
    try:
        deploy_ctc.ctc_loss(lp, np.array([[1, 2]]), [2**58], [2])
    except MemoryError as error:
        print("MemoryError", error)
"""


def test_scratch_size_beyond_64_bits_is_a_memory_error_not_a_crash():
    """A broadcast log_probs can claim any T; the engine's scratch size (about 3 S T doubles) must not wrap around
    to a small allocation. In a subprocess, so that a crash fails the test instead of the run."""
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
