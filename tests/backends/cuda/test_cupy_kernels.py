"""The CUDA backend's kernels against torch float64, on the CPU harness in CI and on a GPU when there is one.

Harness tests run the real ``kernels/ctc.cu`` through :func:`deploy_ctc._backends.cuda.cupy_kernels.run_kernels` (the
launch code the GPU uses) with NumPy arrays, each under the forward, reverse and random thread orders, so a missing
barrier changes the result. GPU tests run :func:`deploy_ctc._backends.cuda.cupy_kernels.forward_backward` on CuPy
arrays. The oracle is ``torch.nn.functional.ctc_loss`` in float64 (tests/utils/oracles.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy_ctc import validation
from deploy_ctc._backends.cuda import cupy_kernels
from tests.utils import cuda_harness, oracles
from tests.utils.gpu import gpu_count


@dataclass(frozen=True)
class Case:
    """A batch: log-prob shape, lengths and options. ``slack`` frames beyond the longest input are padding."""

    name: str
    C: int
    target_lengths: tuple
    input_lengths: tuple
    blank: int = 0
    repeat_prob: float = 0.3
    scale: float = 1.0
    slack: int = 0


CASES = [
    Case("mixed", C=6, target_lengths=(3, 0, 5, 2), input_lengths=(12, 7, 10, 9), slack=2),
    # nll 0, -log p(blanks), inf
    Case("empty_and_zero_lengths", C=4, target_lengths=(0, 0, 2), input_lengths=(0, 5, 0)),
    Case("repeats", C=3, target_lengths=(4, 3), input_lengths=(7, 9), repeat_prob=1.0),  # 7 = minimal length of aaaa
    Case("infeasible", C=5, target_lengths=(4, 2, 6), input_lengths=(3, 6, 6), repeat_prob=0.5),
    Case("blank_last", C=5, target_lengths=(2, 4), input_lengths=(8, 10), blank=4),
    Case("blank_middle", C=7, target_lengths=(5, 1, 3), input_lengths=(11, 4, 8), blank=3),
    Case("single_frame", C=2, target_lengths=(1, 0), input_lengths=(1, 1)),
    Case("peaky_long_T", C=5, target_lengths=(6, 9), input_lengths=(60, 45), scale=40.0),
    Case("odd_sizes_around_warp", C=33, target_lengths=(16, 17, 1), input_lengths=(40, 35, 2), repeat_prob=0.2),
    Case("vocabulary_32k", C=32768, target_lengths=(3, 2), input_lengths=(6, 4), blank=32767, repeat_prob=0.0),
]
ORDERS = tuple(cuda_harness.ORDERS)
DTYPES = (np.float64, np.float32)


def _tolerance(dtype, lp):
    """float64: the project's table. float32: the kernels add log-values in float32 frame after frame, so the
    log-likelihood and log-posteriors carry an absolute error of about eps32 * sum_t max_c |lp[t, :, c]|
    (tiny for ordinary inputs, ~1e-3 for peaky ones whose log-probs reach -1e3); the gradient entries inherit it."""
    if dtype == np.float64:
        return oracles.TOLERANCES[np.dtype(np.float64)]
    finite = np.where(np.isfinite(lp), np.abs(lp), 0.0)
    drift = 8 * np.finfo(np.float32).eps * float(finite.max(axis=2).sum(axis=0).max(initial=0.0))
    base = oracles.FLOAT32_COMPUTE
    return oracles.Tolerance(base.rtol, max(base.atol, drift), base.reason + " Plus the peaky-input drift above.")


def _inputs(case, rng, dtype):
    """(log_probs (T, N, C), targets (N, S), input_lengths, target_lengths, grad_scale (N,)) as NumPy arrays."""
    il = np.array(case.input_lengths, dtype=np.int64)
    tl = np.array(case.target_lengths, dtype=np.int64)
    T = int(il.max()) + case.slack
    lp = oracles.random_log_probs(rng, T, il.size, case.C, dtype=dtype, scale=case.scale)
    targets = oracles.random_targets(rng, tl, case.C, blank=case.blank, repeat_prob=case.repeat_prob)
    grad_scale = rng.uniform(0.5, 2.0, size=il.size)
    return lp, targets, il, tl, grad_scale


def _expected(lp, targets, il, tl, blank, grad_scale, zero_infinity, convention):
    """torch float64: nll (N,) (never zeroed) and the grad_scale-weighted gradient (T, N, C)."""
    nll, _ = oracles.torch_reference(lp, targets, il, tl, blank=blank, reduction="none")
    _, grad = oracles.torch_reference(lp, targets, il, tl, blank=blank, reduction="none",
                                      zero_infinity=zero_infinity, grad_output=grad_scale, convention=convention)
    return nll, grad


def _check(got_nll, got_grad, expected, dtype, what, lp):
    tol = _tolerance(dtype, lp)
    oracles.assert_close(got_nll, expected[0], dtype, f"{what}: nll", tol)
    oracles.assert_close(got_grad, expected[1], dtype, f"{what}: grad", tol)
    assert got_nll.dtype == dtype and got_grad.dtype == dtype, f"{what}: dtypes {got_nll.dtype}, {got_grad.dtype}"


# ----------------------------------------------------------------------------------------------------------
# CPU harness
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def harness_library(tmp_path_factory):
    if cuda_harness.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the CUDA kernel harness")
    return cuda_harness.build(tmp_path_factory.mktemp("cuda_harness"), sanitize=cuda_harness.sanitize_requested())


@pytest.fixture(params=ORDERS)
def harness(request, harness_library):
    return cuda_harness.Harness(harness_library, order=request.param, seed=1234)


def _run(harness, lp, targets, il, tl, blank, zero_infinity=False, grad_scale=None, convention="torch"):
    problem = validation.validate(lp, targets, il, tl, blank, "none", zero_infinity)
    return cupy_kernels.run_kernels(problem, grad_scale, convention, harness)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_harness_matches_torch(case, dtype, harness, rng):
    lp, targets, il, tl, w = _inputs(case, rng, dtype)
    for zero_infinity in (False, True):
        nll, grad = _run(harness, lp, targets, il, tl, case.blank, zero_infinity, w)
        expected = _expected(lp, targets, il, tl, case.blank, w, zero_infinity, "torch")
        _check(nll, grad, expected, dtype, f"{case.name} zero_infinity={zero_infinity}", lp)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_harness_matches_the_numpy_backend(case, harness_library, rng):
    """The kernels and the NumPy backend agree on the Core issue's edge cases (float64, every option)."""
    from deploy_ctc._backends.cpu import pure_numpy

    harness = cuda_harness.Harness(harness_library, order="random", seed=7)
    lp, targets, il, tl, w = _inputs(case, rng, np.float64)
    for zero_infinity in (False, True):
        for convention in ("torch", "plain"):
            problem = validation.validate(lp, targets, il, tl, case.blank, "none", zero_infinity)
            got = cupy_kernels.run_kernels(problem, w, convention, harness)
            expected = pure_numpy.forward_backward(problem, w, convention)
            what = f"{case.name} zero_infinity={zero_infinity} {convention}"
            oracles.assert_close(got[0], expected[0], np.float64, f"{what}: nll")
            oracles.assert_close(got[1], expected[1], np.float64, f"{what}: grad")


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_harness_non_finite_losses_follow_torch(harness, zero_infinity, rng):
    """torch's rules for inf and NaN losses (tests/utils/oracles.py::non_finite_batch): zero_infinity zeroes the
    rows of inf losses only, NaN losses keep NaN rows."""
    lp, targets, il, tl = oracles.non_finite_batch(rng, with_nan=True, unused_class_nan=True)
    w = rng.uniform(0.5, 2.0, il.size)
    nll, grad = _run(harness, lp, targets, il, tl, 0, zero_infinity, w)
    _check(nll, grad, _expected(lp, targets, il, tl, 0, w, zero_infinity, "torch"), np.float64, "non-finite", lp)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: c.name)
def test_harness_plain_convention(case, harness, rng):
    lp, targets, il, tl, w = _inputs(case, rng, np.float64)
    nll, grad = _run(harness, lp, targets, il, tl, case.blank, False, w, convention="plain")
    _check(nll, grad, _expected(lp, targets, il, tl, case.blank, w, False, "plain"), np.float64, case.name, lp)


SPECIAL_CASES = {  # (frame, class) of the special value in sample 0 (T = 5, target [1, 2], input length 4)
    "label on the path": (1, 1), "blank on the path": (2, 0), "class outside the target": (1, 3),
    "frame past the input length": (4, 1)}


@pytest.mark.parametrize("value", [np.inf, np.nan])
@pytest.mark.parametrize("where", sorted(SPECIAL_CASES))
def test_harness_nan_and_inf_log_probs_match_torch(harness_library, rng, value, where):
    """NaN or +inf on a used frame's lattice: NaN loss and NaN rows (as torch; a NaN must not be dropped by the
    max in log_add); elsewhere only that gradient entry; past the input length nothing."""
    harness = cuda_harness.Harness(harness_library, order="random", seed=3)
    lp = oracles.random_log_probs(rng, 5, 2, 4)
    targets, il, tl, w = np.array([[1, 2], [3, 1]]), np.array([4, 5]), np.array([2, 2]), np.ones(2)
    lp[(SPECIAL_CASES[where][0], 0, SPECIAL_CASES[where][1])] = value
    nll, grad = _run(harness, lp, targets, il, tl, 0, False, w)
    _check(nll, grad, _expected(lp, targets, il, tl, 0, w, False, "torch"), np.float64, where, lp)


def test_harness_fuzz_peaky_and_finite_masks(harness_library):
    """float32 and float64 log-softmax rows of logits scaled up to 3000, and -1e30 masks (finite: a probability,
    as in torch), against torch float64 on the same values."""
    harness = cuda_harness.Harness(harness_library, order="random", seed=5)
    rng = np.random.default_rng(20240611)
    for i in range(40):
        T, C, N = int(rng.integers(1, 12)), int(rng.integers(2, 7)), int(rng.integers(1, 4))
        tl, il = rng.integers(0, min(T, 4) + 1, N), rng.integers(0, T + 1, N)
        dtype = DTYPES[i % 2]
        lp = oracles.log_softmax(rng.normal(size=(T, N, C)) * rng.choice([1.0, 30.0, 300.0, 3000.0]))
        if i % 4 > 1:
            lp[rng.random(lp.shape) < 0.2] = -1e30
        lp = lp.astype(dtype)
        targets = rng.integers(1, C, (N, max(int(tl.max()), 1)))
        nll, _ = _run(harness, lp, targets, il, tl, 0, False, np.ones(N))
        want, _ = oracles.torch_reference(lp.astype(np.float64), targets, il, tl, reduction="none")
        oracles.assert_close(nll, want, dtype, f"case {i}", _tolerance(dtype, np.where(lp > -1e29, lp, 0.0)))


def test_harness_loss_only_runs_the_forward_lattice(harness, rng):
    lp, targets, il, tl, _ = _inputs(CASES[0], rng, np.float64)
    nll, grad = _run(harness, lp, targets, il, tl, 0)
    assert grad is None
    assert harness.launches == ["ctc_lattice<double>"]
    oracles.assert_close(nll, _expected(lp, targets, il, tl, 0, np.ones(il.size), False, "torch")[0],
                         np.float64, "nll")


@pytest.mark.parametrize("T, S, scale, dtype", [(1000, 100, 1.0, np.float32)] + [
    (600, 60, scale, dtype) for scale in (10.0, 40.0) for dtype in DTYPES])
def test_harness_loss_only_on_long_and_peaky_inputs(T, S, scale, dtype, harness, rng):
    """The forward lattice blocks alone (no gradient wanted) on long lattices, whose forward variables span thousands
    of bits, and confident outputs (logits x 10, x 40, log-probs down to about -300): log space keeps them all."""
    C = 8
    il, tl = np.array([T, T - 50]), np.array([S, S // 2])
    lp = oracles.random_log_probs(rng, T, 2, C, dtype=dtype, scale=scale)
    targets = oracles.random_targets(rng, tl, C, 0, S=S, repeat_prob=0.3)
    nll, grad = _run(harness, lp, targets, il, tl, 0)
    assert grad is None and harness.launches == [f"ctc_lattice<{'double' if dtype == np.float64 else 'float'}>"]
    oracles.assert_close(nll, oracles.torch_losses(lp.astype(np.float64), targets, il, tl), dtype, "nll",
                         _tolerance(dtype, lp))


def test_harness_strided_log_probs(harness, rng):
    """A non-contiguous view (batch-major storage, every other class) is read in place through its strides."""
    case = CASES[0]
    il = np.array(case.input_lengths)
    tl = np.array(case.target_lengths)
    storage = oracles.random_log_probs(rng, il.size, int(il.max()), 2 * case.C)  # (N, T, 2C)
    lp = storage.transpose(1, 0, 2)[:, :, ::2]  # (T, N, C) view, strides (2C, 2TC, 2) elements
    targets = oracles.random_targets(rng, tl, case.C)
    w = np.ones(il.size)
    nll, grad = _run(harness, lp, targets, il, tl, 0, grad_scale=w)
    _check(nll, grad, _expected(lp, targets, il, tl, 0, w, False, "torch"), np.float64, "strided", lp)


def test_harness_never_reads_frames_past_input_length(harness, rng):
    lp, targets, il, tl, w = _inputs(CASES[0], rng, np.float64)
    poisoned = lp.copy()
    for n, length in enumerate(il):
        poisoned[length:, n, :] = np.nan
    nll, grad = _run(harness, poisoned, targets, il, tl, 0, grad_scale=w)
    _check(nll, grad, _expected(lp, targets, il, tl, 0, w, False, "torch"), np.float64, "NaN past input_lengths", lp)


@pytest.mark.parametrize("path", ["global_rows_direct_loads", "global_rows_staged", "shared_rows_restaged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_harness_lattice_memory_paths(path, dtype, harness, rng, monkeypatch):
    """The lattice's slow paths, forced on a small batch through the launch code's shared-memory plan:
    rows read back from global memory (long targets) with emissions loaded directly or staged one frame at a
    time, and shared rows with the emission stage refilled every 3 frames (a partial last refill)."""
    case = CASES[3]
    lp, targets, il, tl, w = _inputs(case, rng, dtype)
    row_bytes = (2 * targets.shape[1] + 1) * np.dtype(dtype).itemsize
    if path == "global_rows_direct_loads":
        monkeypatch.setattr(cupy_kernels, "SHARED_BUDGET", 0)
    elif path == "global_rows_staged":
        monkeypatch.setattr(cupy_kernels, "SHARED_BUDGET", row_bytes + row_bytes // 2)
    else:
        monkeypatch.setattr(cupy_kernels, "MAX_STAGE_FRAMES", 3)
    nll, grad = _run(harness, lp, targets, il, tl, case.blank, True, w)
    _check(nll, grad, _expected(lp, targets, il, tl, case.blank, w, True, "torch"), dtype, path, lp)


def test_harness_grid_y_limit_loops_over_samples(harness, rng, monkeypatch):
    """Batches larger than the grid's y limit (65535 on a GPU) are covered by the kernels' loops over n."""
    monkeypatch.setattr(cupy_kernels, "MAX_GRID_Y", 2)
    case = CASES[0]  # N = 4
    lp, targets, il, tl, w = _inputs(case, rng, np.float64)
    nll, grad = _run(harness, lp, targets, il, tl, case.blank, False, w)
    _check(nll, grad, _expected(lp, targets, il, tl, case.blank, w, False, "torch"), np.float64, "grid y", lp)


def test_harness_target_too_long_for_shared_memory(harness_library, rng):
    """No target-length ceiling: 2 rows of 2*1540+1 doubles exceed 48 KiB, so this takes the slow path unpatched."""
    L, C = 1540, 5
    assert 2 * (2 * L + 1) * 8 > cupy_kernels.SHARED_BUDGET
    targets = oracles.random_targets(rng, [L], C, repeat_prob=0.1)
    T = oracles.minimal_input_length(targets[0]) + 40  # feasible, with some freedom in the alignment
    lp = oracles.random_log_probs(rng, T, 1, C)
    il, tl, w = np.array([T]), np.array([L]), np.ones(1)
    nll, grad = _run(cuda_harness.Harness(harness_library), lp, targets, il, tl, 0, grad_scale=w)
    _check(nll, grad, _expected(lp, targets, il, tl, 0, w, False, "torch"), np.float64, "long target", lp)
    assert np.isfinite(nll).all()


@given(data=st.data())
def test_harness_random_batches(harness_library, data):
    """Random shapes, blank, lengths, repeats, conventions and shared-memory plans, random thread order."""
    draw = data.draw
    N, C = draw(st.integers(1, 4), label="N"), draw(st.integers(2, 12), label="C")
    blank = draw(st.integers(0, C - 1), label="blank")
    tl = np.array(draw(st.lists(st.integers(0, 6), min_size=N, max_size=N), label="target_lengths"))
    il = np.array(draw(st.lists(st.integers(0, 14), min_size=N, max_size=N), label="input_lengths"))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    lp = oracles.random_log_probs(rng, max(int(il.max()), 1), N, C, scale=draw(st.sampled_from([0.5, 1.0, 4.0])))
    targets = oracles.random_targets(rng, tl, C, blank=blank, repeat_prob=draw(st.sampled_from([0.0, 0.5, 1.0])))
    w = rng.uniform(0.1, 3.0, size=N)
    convention = draw(st.sampled_from(["torch", "plain"]), label="convention")
    zero_infinity = draw(st.booleans(), label="zero_infinity")
    budget = draw(st.sampled_from([0, 150, 400, cupy_kernels.SHARED_BUDGET]), label="shared budget")
    stage = draw(st.integers(1, 5), label="stage frames")
    harness = cuda_harness.Harness(harness_library, "random", seed=int(rng.integers(1 << 30)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cupy_kernels, "SHARED_BUDGET", budget)
        patch.setattr(cupy_kernels, "MAX_STAGE_FRAMES", stage)
        nll, grad = _run(harness, lp, targets, il, tl, blank, zero_infinity, w, convention)
    expected = _expected(lp, targets, il, tl, blank, w, zero_infinity, convention)
    _check(nll, grad, expected, np.float64, "random batch", lp)


def test_harness_results_are_bitwise_identical_across_thread_orders(harness_library, rng):
    """No order-dependent reduction: every schedule gives the same bits (the GPU's determinism argument)."""
    lp, targets, il, tl, w = _inputs(CASES[8], rng, np.float32)
    results = []
    for order, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
        problem = validation.validate(lp, targets, il, tl, 0, "none", False)
        harness = cuda_harness.Harness(harness_library, order, seed)
        results.append(cupy_kernels.run_kernels(problem, w, "torch", harness))
    for nll, grad in results[1:]:
        np.testing.assert_array_equal(nll, results[0][0])
        np.testing.assert_array_equal(grad, results[0][1])


# ----------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------
requires_gpu = pytest.mark.skipif(gpu_count() == 0, reason="needs CuPy and a CUDA GPU")


@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gpu_matches_torch(case, dtype, rng):
    import cupy

    lp, targets, il, tl, w = _inputs(case, rng, dtype)
    for zero_infinity in (False, True):
        problem = validation.validate(cupy.asarray(lp), cupy.asarray(targets), il, tl, case.blank, "none",
                                      zero_infinity)
        nll, grad = cupy_kernels.forward_backward(problem, cupy.asarray(w), "torch")
        assert isinstance(grad, cupy.ndarray)
        expected = _expected(lp, targets, il, tl, case.blank, w, zero_infinity, "torch")
        _check(cupy.asnumpy(nll), cupy.asnumpy(grad), expected, dtype, f"{case.name} zero_infinity={zero_infinity}", lp)


@requires_gpu
def test_gpu_long_target_and_determinism(rng):
    import cupy

    L, C = 2000, 40
    targets = oracles.random_targets(rng, [L, L // 2], C, repeat_prob=0.1)
    T = oracles.minimal_input_length(targets[0]) + 100
    lp = oracles.random_log_probs(rng, T, 2, C, dtype=np.float32)
    il, tl, w = np.array([T, T - 50]), np.array([L, L // 2]), np.ones(2)
    problem = validation.validate(cupy.asarray(lp), cupy.asarray(targets), il, tl, 0, "none", False)
    first = [cupy.asnumpy(x) for x in cupy_kernels.forward_backward(problem, cupy.asarray(w))]
    second = [cupy.asnumpy(x) for x in cupy_kernels.forward_backward(problem, cupy.asarray(w))]
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    _check(first[0], first[1], _expected(lp, targets, il, tl, 0, w, False, "torch"), np.float32, "long target", lp)


@requires_gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_public_api_returns_cupy_arrays(reduction, rng):
    import cupy

    import deploy_ctc

    lp, targets, il, tl, _ = _inputs(CASES[0], rng, np.float32)
    loss, grad = deploy_ctc.ctc_loss_and_grad(cupy.asarray(lp), cupy.asarray(targets), il, tl, reduction=reduction)
    assert isinstance(loss, cupy.ndarray) and isinstance(grad, cupy.ndarray)
    expected_loss, expected_grad = oracles.torch_reference(lp, targets, il, tl, reduction=reduction)
    tol = _tolerance(np.float32, lp)
    oracles.assert_close(cupy.asnumpy(loss), expected_loss, np.float32, "loss", tol)
    oracles.assert_close(cupy.asnumpy(grad), expected_grad, np.float32, "grad", tol)
