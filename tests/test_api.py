"""deploy_ctc.ctc_loss / ctc_loss_and_grad / CTCLoss on NumPy arrays against independent oracles.

The main oracle is torch.nn.functional.ctc_loss in float64 with torch's autograd gradient, evaluated on the very
same input values (low-precision inputs upcast exactly); tiny cases are also checked against brute-force
enumeration of alignments and the single-path closed form. Tolerances: tests/utils/oracles.py::TOLERANCES.
"""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import deploy_ctc
from tests.utils import oracles

pytest.importorskip("torch", reason="torch (the test extra) is the float64 oracle")

REDUCTIONS = oracles.REDUCTIONS


def snapshot(*arrays):
    """Copies of the array arguments, to check afterwards that deploy_ctc did not modify them."""
    return [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in arrays]


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg="deploy_ctc modified an input array")


def expected_loss_shape(log_probs, reduction):
    return (log_probs.shape[1],) if reduction == "none" and log_probs.ndim == 3 else ()


def check_against_torch(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean",
                        zero_infinity=False, grad_output=None, convention="torch", tol=None):
    """Run ctc_loss and ctc_loss_and_grad and compare both with torch float64; return (loss, grad)."""
    args = (log_probs, targets, input_lengths, target_lengths)
    before = snapshot(*args, grad_output)
    kwargs = dict(blank=blank, reduction=reduction, zero_infinity=zero_infinity)
    loss, grad = deploy_ctc.ctc_loss_and_grad(*args, **kwargs, grad_output=grad_output, convention=convention)
    loss_only = deploy_ctc.ctc_loss(*args, **kwargs)
    assert_unchanged(before, [*args, grad_output])

    ref_loss, ref_grad = oracles.torch_reference(*args, **kwargs, grad_output=grad_output, convention=convention)
    dtype = log_probs.dtype
    for name, value in (("ctc_loss", loss_only), ("ctc_loss_and_grad loss", loss)):
        assert isinstance(value, (np.ndarray, np.generic)), f"{name} returned {type(value)}"
        assert value.dtype == dtype, f"{name} dtype {value.dtype}, expected {dtype}"
        assert np.shape(value) == expected_loss_shape(log_probs, reduction), f"{name} shape {np.shape(value)}"
        oracles.assert_close(value, ref_loss, dtype, name, tol)
    assert isinstance(grad, np.ndarray) and grad.dtype == dtype and grad.shape == log_probs.shape, \
        f"grad {type(grad)} {getattr(grad, 'dtype', None)} {getattr(grad, 'shape', None)}"
    oracles.assert_close(grad, ref_grad, dtype, "grad", tol)
    return loss, grad


def random_case(rng, T, N, C, S, blank=0, dtype=np.float64, repeat_prob=0.3, full=False):
    """Log-probs, padded targets and lengths; lengths are random unless ``full`` (feasible by construction)."""
    lp = oracles.random_log_probs(rng, T, N, C, dtype)
    tl = np.full(N, S) if full else rng.integers(0, S + 1, N)
    tl[0] = S  # the padded width is exactly S
    targets = oracles.random_targets(rng, tl, C, blank, S=S, repeat_prob=repeat_prob)
    needed = np.array([oracles.minimal_input_length(row[:k]) for row, k in zip(targets, tl)])
    il = np.full(N, T) if full else rng.integers(np.minimum(needed, T), T + 1)
    return lp, targets, il, tl


# ------------------------------------------------------------------------------------------------------------
# Agreement with torch float64
# ------------------------------------------------------------------------------------------------------------
SHAPES = [  # (T, N, C, S): odd sizes around small powers of two, the torch doc's example, C = 2 (blank + 1)
    (1, 1, 2, 1), (2, 3, 3, 1), (7, 2, 5, 3), (33, 7, 11, 9), (50, 16, 20, 30), (17, 33, 2, 5), (129, 3, 65, 40),
]


BLANK_AT = {"first": lambda C: 0, "middle": lambda C: C // 2, "last": lambda C: C - 1}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("blank_at", BLANK_AT)
@pytest.mark.parametrize("T,N,C,S", SHAPES)
def test_matches_torch_over_shapes_and_blank_positions(rng, T, N, C, S, blank_at, reduction):
    blank = BLANK_AT[blank_at](C)
    S = min(S, T) if C > 2 else min(S, (T + 1) // 2)  # C = 2: the only label repeats, needs blanks between
    check_against_torch(*random_case(rng, T, N, C, S, blank), blank=blank, reduction=reduction)


@pytest.mark.parametrize("blank", [0, 2, 4])
def test_repeated_labels(rng, blank):
    lp, targets, il, tl = random_case(rng, 20, 5, 5, 8, blank, repeat_prob=0.8)
    assert any((row[1:k] == row[:k - 1]).any() for row, k in zip(targets, tl)), "case has no repeats"
    check_against_torch(lp, targets, il, tl, blank=blank, reduction="none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_targets(rng, reduction):
    lp = oracles.random_log_probs(rng, 6, 3, 4)
    loss, _ = check_against_torch(lp, np.zeros((3, 0), np.int64), [6, 3, 1], [0, 0, 0], reduction=reduction)
    if reduction == "none":  # an empty target is the all-blank path
        np.testing.assert_allclose(loss, -np.array([lp[:6, 0, 0].sum(), lp[:3, 1, 0].sum(), lp[0, 2, 0]]))


def test_zero_input_lengths(rng):
    lp = oracles.random_log_probs(rng, 5, 4, 4)
    targets = np.array([[0, 0], [1, 0], [0, 0], [2, 3]])
    loss, grad = check_against_torch(lp, targets, [0, 0, 5, 0], [0, 1, 0, 2], reduction="none")
    assert loss[0] == 0 and np.isinf(loss[1]) and np.isinf(loss[3])
    np.testing.assert_array_equal(grad[:, [0, 1, 3]], 0.0)  # no frame is inside a zero input length


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_infeasible_targets(rng, reduction, zero_infinity):
    lp = oracles.random_log_probs(rng, 6, 3, 5)
    targets = np.array([[1, 2, 3, 4], [1, 1, 1, 0], [2, 2, 0, 0]])
    il, tl = [6, 4, 6], [4, 3, 2]  # sample 1 needs 5 frames (two blanks between the repeats)
    loss, grad = check_against_torch(lp, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity)
    if zero_infinity:
        assert np.isfinite(loss).all()
        np.testing.assert_array_equal(grad[:, 1], 0.0)
    else:
        assert np.isinf(loss).any()
        assert np.isnan(grad[:4, 1]).all() and (grad[4:, 1] == 0).all()
    assert np.isfinite(grad[:, [0, 2]]).all()


@pytest.mark.parametrize("convention", ["torch", "plain"])
@pytest.mark.parametrize("with_nan", [True, False])
@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_non_finite_losses_follow_torch(rng, backend, reduction, zero_infinity, with_nan, convention):
    """torch's rules: an inf loss is 0 under zero_infinity and its rows 0, else its rows are NaN; a NaN loss stays
    NaN and keeps NaN rows even under zero_infinity; a reduction over a NaN loss is NaN, over an inf one inf unless
    zero_infinity; rows of finite samples stay finite (but for NaN entries of their own log-probs)."""
    if backend == "native" and deploy_ctc.backends.cpu_backend() != "native":
        pytest.skip("the native engine cannot be built here (no C++ compiler)")
    # The oracle's plain gradient is torch's minus exp(lp): NaN at sample 4's NaN entry, where -posterior is 0.
    lp, targets, il, tl = oracles.non_finite_batch(rng, with_nan, unused_class_nan=with_nan and convention == "torch")
    grad_output = rng.uniform(0.5, 2.0, 6) if reduction == "none" else np.float64(1.7)
    with deploy_ctc.backends.using(backend):
        loss, grad = check_against_torch(lp, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity,
                                         grad_output=grad_output, convention=convention)
    rows = np.arange(8)[:, None] < il[None, :]  # (T, N)
    assert np.isnan(grad[:, 2][rows[:, 2]]).all() == with_nan  # NaN loss: NaN rows, zero_infinity or not
    np.testing.assert_array_equal(np.isnan(grad[:, [1, 3]][rows[:, [1, 3]]]), not zero_infinity)
    if zero_infinity:
        np.testing.assert_array_equal(grad[:, [1, 3, 5]], 0.0)
    assert np.isfinite(grad[:, 0]).all()


# ------------------------------------------------------------------------------------------------------------
# Input layouts and types
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("int_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_concatenated_targets(rng, int_dtype, reduction):
    lp, targets, il, tl = random_case(rng, 12, 5, 6, 4)
    tl[2] = 0
    concat = oracles.concatenate_targets(targets, tl).astype(int_dtype)
    check_against_torch(lp, concat, il.astype(int_dtype), tl.astype(int_dtype), reduction=reduction)


@pytest.mark.parametrize("lengths_form", ["int", "0-d int64", "0-d int32", "tuple", "list"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched(rng, lengths_form, reduction):
    T, C = 9, 6
    lp = oracles.random_log_probs(rng, T, 1, C)[:, 0]  # (T, C)
    target = np.array([3, 3, 1, 5])
    il, tl = {"int": (8, 4), "0-d int64": (np.array(8), np.array(4)),
              "0-d int32": (np.array(8, np.int32), np.array(4, np.int32)),
              "tuple": ((8,), (4,)), "list": ([8], [4])}[lengths_form]
    loss, grad = check_against_torch(lp, target, il, tl, reduction=reduction)
    assert np.shape(loss) == ()
    assert grad.shape == (T, C) and (grad[8] == 0).all()


@pytest.mark.parametrize("form", ["tuple", "list", "int32 array", "int64 array"])
def test_batched_lengths_forms(rng, form):
    lp, targets, il, tl = random_case(rng, 10, 3, 5, 4)
    convert = {"tuple": lambda a: tuple(int(v) for v in a), "list": lambda a: [int(v) for v in a],
               "int32 array": lambda a: a.astype(np.int32), "int64 array": lambda a: a.astype(np.int64)}[form]
    check_against_torch(lp, targets, convert(il), convert(tl), reduction="none")


@pytest.mark.parametrize("int_dtype", [np.int32, np.int64])
def test_int32_and_int64_padded_targets(rng, int_dtype):
    lp, targets, il, tl = random_case(rng, 15, 4, 7, 5, blank=3)
    check_against_torch(lp, targets.astype(int_dtype), il.astype(int_dtype), tl.astype(int_dtype), blank=3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float_dtypes(rng, dtype, reduction):
    """float16 is computed in float32; torch refuses half, so the oracle runs on the exact float64 upcast."""
    lp, targets, il, tl = random_case(rng, 40, 6, 9, 12, dtype=dtype)
    check_against_torch(lp, targets, il, tl, reduction=reduction)


def test_padding_values_are_ignored(rng):
    lp, targets, il, tl = random_case(rng, 10, 3, 5, 4)
    tl[1:] = [1, 0]
    dirty = targets.copy()
    dirty[1, 1:], dirty[2, :] = [99, -3, 0], [0, -1, 5, 1000]  # out of range / blank, but past the lengths
    before = dirty.copy()
    loss, grad = deploy_ctc.ctc_loss_and_grad(lp, dirty, il, tl, reduction="none")
    np.testing.assert_array_equal(dirty, before)
    ref_loss, ref_grad = oracles.torch_reference(lp, targets, il, tl, reduction="none")
    oracles.assert_close(loss, ref_loss, lp.dtype, "loss")
    oracles.assert_close(grad, ref_grad, lp.dtype, "grad")


# ------------------------------------------------------------------------------------------------------------
# Gradient options
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("convention", ["torch", "plain"])
def test_grad_output_weighting(rng, reduction, convention):
    lp, targets, il, tl = random_case(rng, 14, 5, 6, 5)
    go = rng.standard_normal(5) if reduction == "none" else np.array(-1.75)
    check_against_torch(lp, targets, il, tl, reduction=reduction, grad_output=go, convention=convention)
    if reduction != "none":  # a Python float works like the 0-d array
        check_against_torch(lp, targets, il, tl, reduction=reduction, grad_output=2.5, convention=convention)


def test_grad_output_unbatched_none(rng):
    lp = oracles.random_log_probs(rng, 7, 1, 4)[:, 0]
    check_against_torch(lp, np.array([1, 2]), 7, 2, reduction="none", grad_output=np.array(0.3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_plain_convention_is_minus_posterior(rng, dtype, reduction):
    lp, targets, il, tl = random_case(rng, 25, 4, 6, 7, blank=5, dtype=dtype)
    check_against_torch(lp, targets, il, tl, blank=5, reduction=reduction, convention="plain")


def test_plain_convention_is_the_derivative_for_unnormalized_inputs(rng):
    """-posterior is d loss / d log_probs even when exp(log_probs) does not sum to 1 (finite differences)."""
    lp = rng.standard_normal((5, 2, 3))
    targets, il, tl = np.array([[1, 2], [2, 2]]), np.array([5, 4]), np.array([2, 2])
    _, grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, reduction="sum", convention="plain")
    fd = oracles.finite_difference(lambda x: oracles.torch_reference(x, targets, il, tl, reduction="sum")[0], lp)
    np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_torch_convention_is_the_gradient_through_log_softmax(rng):
    z = rng.standard_normal((6, 2, 4))
    targets, il, tl = np.array([[1, 3], [2, 0]]), np.array([6, 5]), np.array([2, 1])
    _, grad = deploy_ctc.ctc_loss_and_grad(oracles.log_softmax(z), targets, il, tl)
    fd = oracles.finite_difference(
        lambda x: oracles.torch_reference(oracles.log_softmax(x), targets, il, tl)[0], z)
    np.testing.assert_allclose(grad, fd, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# Strided views, numerics, NaN
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_inputs(rng, dtype):
    T, N, C, S = 11, 4, 7, 3
    base = oracles.random_log_probs(rng, N, 2 * T, C + 3, dtype)  # (N, 2T, C+3)
    lp = base.transpose(1, 0, 2)[::2, :, 1:C + 1]  # (T, N, C) strided in every axis
    lp = oracles.log_softmax(lp).astype(dtype)[:, :, ::-1]  # negative stride on C
    lp = np.lib.stride_tricks.as_strided(lp, lp.shape, lp.strides)  # a view, not a fresh array
    assert not lp.flags.c_contiguous
    _, targets, il, tl = random_case(rng, T, N, C, S)
    wide = np.zeros((N, 2 * S), np.int64)
    wide[:, ::2] = targets
    strided_targets = np.asfortranarray(wide)[:, ::2]  # (N, S), non-contiguous
    assert not strided_targets.flags.c_contiguous
    strided_il = np.repeat(il, 2)[::2]
    check_against_torch(lp, strided_targets, strided_il, tl, reduction="none")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_long_input(rng, dtype):
    T, N, C, S = 2000, 2, 6, 60
    lp, targets, il, tl = random_case(rng, T, N, C, S, dtype=dtype)
    loss, grad = check_against_torch(lp, targets, il, tl, reduction="none")
    assert np.isfinite(loss).all() and np.isfinite(grad).all()


@pytest.mark.parametrize("scale", [30.0, 300.0])
def test_peaky_input(rng, scale):
    """log_softmax(300 * randn) has log-probs down to about -1e3: no underflow where torch float64 is finite."""
    T, N, C, S = 120, 3, 5, 20
    lp = oracles.random_log_probs(rng, T, N, C, scale=scale)
    assert lp.min() < -5 * scale
    _, targets, il, tl = random_case(rng, T, N, C, S)
    ref_loss, _ = oracles.torch_reference(lp, targets, il, tl, reduction="none")
    assert np.isfinite(ref_loss).all()
    loss, grad = check_against_torch(lp, targets, il, tl, reduction="none")
    assert np.isfinite(loss).all() and np.isfinite(grad).all()


@pytest.mark.parametrize("gap", [0, 5, 500])
def test_peaky_path_flip(gap):
    """Adversarial peaky case: the alignment that is e^-800 behind at frame 0 wins by e^200 at the end.

    Target [1], blank 0: "1 0 ... 0 0" costs 1000 nats at the last frame, "0 0 ... 0 1" costs 800 at the
    first; a recursion that rescales per frame flushes e^-800 to zero at frame 0 and would report ~1000.
    ``gap`` blank-friendly frames in between make the two chains travel before they meet again.
    """
    first = [-800.0, 0.0, -1000.0]
    middle = [[0.0, -1000.0, -1000.0]] * (gap + 1)
    last = [-1000.0, 0.0, -1000.0]
    lp = oracles.log_softmax(np.array([first, *middle, last]))[:, None, :]  # (T, 1, 3)
    loss, _ = check_against_torch(lp, np.array([[1]]), [lp.shape[0]], [1], reduction="sum")
    assert 799 < loss < 801


def test_long_and_peaky_input(rng):
    T, N, C, S = 2000, 2, 4, 100
    lp = oracles.random_log_probs(rng, T, N, C, scale=300.0)
    _, targets, il, tl = random_case(rng, T, N, C, S, full=True)
    loss, grad = check_against_torch(lp, targets, il, tl, reduction="sum")
    assert np.isfinite(loss) and np.isfinite(grad).all()


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_minus_infinity_log_probs(rng, reduction, zero_infinity):
    """log(0) entries (masked classes); an all -inf sample is infeasible.

    torch's kernel computes exp(lp) - exp(log_posterior + nll - lp) and so returns NaN where lp = -inf (-inf minus
    -inf) even for a finite loss; the gradient there is exp(-inf) - 0 = 0, which deploy_ctc must return.
    """
    lp, targets, il, tl = random_case(rng, 10, 3, 6, 3, full=True)
    lp[:, :, 5] = -np.inf  # a class no target uses
    targets = np.where(targets == 5, 1, targets)
    lp[:, 2, :] = -np.inf  # sample 2: no alignment has non-zero probability
    kw = dict(reduction=reduction, zero_infinity=zero_infinity)
    loss, grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, **kw)
    ref_loss, ref_grad = oracles.torch_reference(lp, targets, il, tl, **kw)
    ref_grad[:, :2, 5] = 0.0  # feasible samples: torch's NaN artifact at lp = -inf
    oracles.assert_close(loss, ref_loss, np.float64, "loss")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


def test_large_vocabulary_float32(rng):
    check_against_torch(*random_case(rng, 100, 4, 1000, 30, blank=999, dtype=np.float32), blank=999)


@pytest.mark.parametrize("case", ["infeasible", "zero input length", "peaky", "tiny"])
def test_finite_inputs_raise_no_numpy_warnings(rng, case):
    """Ordinary batches (an infeasible target is ordinary: zero_infinity exists for it) must not spam
    RuntimeWarnings from NumPy's floating-point checks; torch does not warn either."""
    lp, targets, il, tl = random_case(rng, 30, 4, 5, 6, full=True)
    if case == "infeasible":
        il[1] = 3
    elif case == "zero input length":
        il[2] = 0
    elif case == "peaky":
        lp = oracles.random_log_probs(rng, 30, 4, 5, scale=300.0)
    else:
        lp, targets, il, tl = random_case(rng, 1, 2, 2, 1, full=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for zero_infinity in (False, True):
            deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, reduction="none", zero_infinity=zero_infinity)


@pytest.mark.parametrize("scale", [1.0, 300.0])  # peaky inputs may take another code path
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_beyond_input_length_does_not_leak(rng, dtype, scale):
    lp, targets, il, tl = random_case(rng, 12, 3, 5, 3, dtype=dtype)
    lp = oracles.random_log_probs(rng, 12, 3, 5, dtype, scale)
    il = np.array([12, 7, 0])
    clean = lp.copy()
    for n, length in enumerate(il):
        lp[length:, n] = np.nan
    for reduction in REDUCTIONS:
        loss, grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, np.minimum(tl, [3, 3, 0]), reduction=reduction)
        ref_loss, ref_grad = oracles.torch_reference(clean, targets, il, np.minimum(tl, [3, 3, 0]),
                                                     reduction=reduction)
        oracles.assert_close(loss, ref_loss, dtype, f"loss ({reduction})")
        oracles.assert_close(grad, ref_grad, dtype, f"grad ({reduction})")


def test_nan_inside_input_length_gives_nan_loss(rng):
    lp, targets, il, tl = random_case(rng, 10, 3, 5, 3, full=True)
    il[1] = 7  # torch: NaN rows up to the input length, zero rows after it
    lp[4, 1, 0] = np.nan  # the blank column is on every alignment
    loss, grad = check_against_torch(lp, targets, il, tl, reduction="none")  # NaN exactly where torch has NaN
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()
    assert np.isnan(grad[:, 1]).any() and np.isfinite(grad[:, [0, 2]]).all()
    assert np.isnan(deploy_ctc.ctc_loss(lp, targets, il, tl))


# ------------------------------------------------------------------------------------------------------------
# Independent of torch: brute force and single-path cases
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["torch", "plain"])
@pytest.mark.parametrize("T,C", [(1, 2), (3, 3), (5, 3), (6, 4)])
def test_matches_brute_force_enumeration(rng, T, C, convention):
    N = 5
    for blank in sorted({0, C // 2, C - 1}):
        lp = oracles.random_log_probs(rng, T, N, C)
        tl = np.minimum([0, 1, 2, 3, T + 1], T + 1)  # includes infeasible targets
        targets = oracles.random_targets(rng, tl, C, blank, repeat_prob=0.5)
        il = rng.integers(0, T + 1, N)
        il[0] = T
        nll, post = oracles.brute_force_batch(lp, targets, il, tl, blank)
        for reduction in REDUCTIONS:
            loss, grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, blank=blank, reduction=reduction,
                                                      convention=convention)
            oracles.assert_close(loss, oracles.reduce_nll(nll, tl, reduction), np.float64, "loss")
            w = oracles.reduction_weights(nll, tl, reduction)
            expected = oracles.grad_from_posterior(lp, post, nll, il, w, convention)
            oracles.assert_close(grad, expected, np.float64, f"grad (blank={blank}, {reduction})")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target", [[1], [2, 2], [1, 2, 1], [3, 3, 3], [1, 1, 2, 2, 3, 1]])
@pytest.mark.parametrize("blank", [0, 2])
def test_single_path_closed_form(rng, target, blank, dtype):
    """T = minimal alignment length: one path; loss = -sum of its log-probs, posterior = its one-hot."""
    C = 5
    target = [c if c != blank else 4 for c in target]
    T = oracles.minimal_input_length(target)
    lp = oracles.random_log_probs(rng, T, 1, C, dtype)
    nll, post = oracles.single_path_expected(lp[:, 0], target, blank)
    for convention, local in (("torch", np.exp(lp[:, 0].astype(np.float64)) - post), ("plain", -post)):
        loss, grad = deploy_ctc.ctc_loss_and_grad(lp[:, 0], np.array(target), T, len(target), blank=blank,
                                                  reduction="sum", convention=convention)
        oracles.assert_close(loss, nll, dtype, "loss")
        oracles.assert_close(grad, local, dtype, f"grad ({convention})")


def test_all_blank_path_for_empty_target(rng):
    lp = oracles.random_log_probs(rng, 4, 1, 3)[:, 0]
    loss, grad = deploy_ctc.ctc_loss_and_grad(lp, np.zeros(0, np.int64), 4, 0, blank=1, reduction="sum")
    oracles.assert_close(loss, -lp[:, 1].sum(), np.float64, "loss")
    oracles.assert_close(grad, np.exp(lp) - np.eye(3)[[1, 1, 1, 1]], np.float64, "grad")


# ------------------------------------------------------------------------------------------------------------
# CTCLoss and torch's documented examples
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ctcloss_callable(rng, reduction, zero_infinity):
    lp, targets, il, tl = random_case(rng, 9, 4, 5, 5, blank=4)
    il[1] = 0  # infeasible unless its target is empty
    tl[1] = 2
    criterion = deploy_ctc.CTCLoss(blank=4, reduction=reduction, zero_infinity=zero_infinity)
    ref, _ = oracles.torch_reference(lp, targets, il, tl, 4, reduction, zero_infinity)
    oracles.assert_close(criterion(lp, targets, il, tl), ref, np.float64, "CTCLoss")


def test_ctcloss_defaults_match_torch(rng):
    lp, targets, il, tl = random_case(rng, 8, 2, 4, 3)
    ref, _ = oracles.torch_reference(lp, targets, il, tl)
    oracles.assert_close(deploy_ctc.CTCLoss()(lp, targets, il, tl), ref, np.float64, "CTCLoss()")


def test_torch_doc_examples(rng):
    """The three examples of torch.nn.CTCLoss's page: padded, concatenated, unbatched (float32)."""
    T, C, N, S, S_min = 50, 20, 16, 30, 10
    lp = oracles.random_log_probs(rng, T, N, C, np.float32)
    target = rng.integers(1, C, (N, S))
    il = np.full(N, T)
    tl = rng.integers(S_min, S, N)
    check_against_torch(lp, target, il, tl)  # padded
    concat = rng.integers(1, C, int(tl.sum()))
    check_against_torch(lp, concat, il, tl)  # concatenated
    tl0 = int(rng.integers(1, T))
    check_against_torch(lp[:, 0], rng.integers(1, C, tl0), np.array(T), np.array(tl0))  # unbatched


# ------------------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# ------------------------------------------------------------------------------------------------------------
@st.composite
def problems(draw, max_T=12, max_N=5, max_C=6):
    T = draw(st.integers(1, max_T))
    N = draw(st.integers(1, max_N))
    C = draw(st.integers(2, max_C))
    blank = draw(st.integers(0, C - 1))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    S = draw(st.integers(0, T))
    lp, targets, il, tl = random_case(rng, T, N, C, S, blank, repeat_prob=0.3)
    return lp, targets, il, tl, blank


@given(problems(), st.randoms(use_true_random=False))
def test_batch_permutation_permutes_losses_and_gradients(problem, random):
    lp, targets, il, tl, blank = problem
    perm = np.array(random.sample(range(lp.shape[1]), lp.shape[1]))
    loss, grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, blank=blank, reduction="none")
    loss_p, grad_p = deploy_ctc.ctc_loss_and_grad(lp[:, perm], targets[perm], il[perm], tl[perm], blank=blank,
                                                  reduction="none")
    np.testing.assert_allclose(loss_p, loss[perm], rtol=1e-12)
    np.testing.assert_allclose(grad_p, grad[:, perm], rtol=1e-12, atol=1e-14)


@given(problems())
def test_loss_is_non_negative_for_normalized_inputs(problem):
    lp, targets, il, tl, blank = problem
    loss = deploy_ctc.ctc_loss(lp, targets, il, tl, blank=blank, reduction="none")
    assert (loss >= -1e-12).all()  # p(target) <= 1; -0.0 / rounding of an all-blank certainty allowed


@given(problems(), st.booleans())
def test_reductions_are_consistent(problem, zero_infinity):
    lp, targets, il, tl, blank = problem
    kw = dict(blank=blank, zero_infinity=zero_infinity)
    none = deploy_ctc.ctc_loss(lp, targets, il, tl, reduction="none", **kw)
    total = deploy_ctc.ctc_loss(lp, targets, il, tl, reduction="sum", **kw)
    mean = deploy_ctc.ctc_loss(lp, targets, il, tl, reduction="mean", **kw)
    np.testing.assert_allclose(total, none.sum(), rtol=1e-12)
    np.testing.assert_allclose(mean, (none / np.maximum(tl, 1)).mean(), rtol=1e-12)
    _, g_none = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, reduction="none", **kw)
    _, g_sum = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, reduction="sum", **kw)
    np.testing.assert_allclose(g_sum, g_none, rtol=1e-12, atol=1e-15)


@given(problems())
def test_concatenated_equals_padded(problem):
    lp, targets, il, tl, blank = problem
    padded = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, blank=blank, reduction="none")
    concat = deploy_ctc.ctc_loss_and_grad(lp, oracles.concatenate_targets(targets, tl), il, tl, blank=blank,
                                          reduction="none")
    for a, b in zip(padded, concat):
        np.testing.assert_array_equal(a, b)
