"""The portable function bodies, run by plain onnxruntime (no custom-op library), against torch float64 autograd."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

from deploy_ctc.onnx.append import ctc_loss_model  # noqa: E402
from tests.onnx.helpers import PORTABLE, Problem, grad_model, make_problem, session  # noqa: E402
from tests.utils.oracles import assert_close, concatenate_targets, non_finite_batch, torch_reference  # noqa: E402

REDUCTIONS = ("none", "mean", "sum")


def _portable(problem: Problem, reduction="mean", zero_infinity=False, grad_output=None, shapeless=()):
    """(loss, grad) from plain-onnxruntime sessions of the CTCLoss and CTCLossGrad bodies."""
    dtype = problem.log_probs.dtype.name
    loss_model = ctc_loss_model(dtype, blank=problem.blank, reduction=reduction, zero_infinity=zero_infinity)
    g_model = grad_model(dtype, blank=problem.blank, reduction=reduction, zero_infinity=zero_infinity)
    for model in (loss_model, g_model):
        for value in model.graph.input:
            if value.name in shapeless:  # other layouts than the declared (T, N, C), (N, S), (N,)
                value.type.tensor_type.ClearField("shape")
        if "loss" in shapeless:
            model.graph.output[0].type.tensor_type.ClearField("shape")
    feeds = problem.feeds()
    loss = session(loss_model).run(None, feeds)[0]
    d_loss = np.ones(loss.shape, problem.log_probs.dtype) if grad_output is None else grad_output
    grad = session(g_model).run(None, {"d_loss": d_loss, **feeds})[0]
    return loss, grad


def _check(problem, reduction, zero_infinity=False, rng=None, **kwargs):
    shape = (problem.log_probs.shape[1],) if reduction == "none" and problem.log_probs.ndim == 3 else ()
    grad_output = None if rng is None else rng.uniform(0.5, 2.0, shape).astype(problem.log_probs.dtype)
    loss, grad = _portable(problem, reduction, zero_infinity, grad_output, **kwargs)
    want_loss, want_grad = torch_reference(*problem.args(), blank=problem.blank, reduction=reduction,
                                           zero_infinity=zero_infinity, grad_output=grad_output)
    tol = PORTABLE[problem.log_probs.dtype]
    assert loss.dtype == problem.log_probs.dtype
    assert_close(loss, want_loss, problem.log_probs.dtype, f"loss ({reduction})", tol)
    assert_close(grad, want_grad, problem.log_probs.dtype, f"grad ({reduction})", tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_random_batches(rng, dtype, reduction):
    _check(make_problem(rng, T=40, N=5, C=7, S=8, dtype=dtype), reduction, rng=rng)


@pytest.mark.parametrize("blank", [3, 6])
def test_blank_not_zero(rng, blank):
    _check(make_problem(rng, T=30, N=4, C=7, S=6, blank=blank), "mean", rng=rng)


def test_single_frame(rng):
    """T = 1 (the Loop runs once): targets of length 0 or 1, and an input length 0."""
    problem = make_problem(rng, T=1, N=3, C=5, S=1, input_lengths=[1, 1, 0], target_lengths=[1, 0, 0])
    _check(problem, "none")


def test_empty_targets_and_zero_input_length(rng):
    """All targets empty (S = 0): loss = -log p(all blanks); input_length 0 gives loss 0."""
    problem = make_problem(rng, T=6, N=3, C=4, S=0, input_lengths=[6, 3, 0], target_lengths=[0, 0, 0])
    _check(problem, "none")
    _check(problem, "mean")


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_infeasible(rng, reduction, zero_infinity):
    """Too-short inputs (one with a repeated label needing a blank between): inf / NaN grads, or 0."""
    problem = make_problem(rng, T=6, N=3, C=5, S=4, input_lengths=[6, 2, 4], target_lengths=[4, 3, 4])
    problem.targets[2] = [1, 1, 2, 2]  # needs 6 frames, has 4
    _check(problem, reduction, zero_infinity)


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_finite_losses_follow_torch(rng, reduction, zero_infinity):
    """torch's rules for inf and NaN losses (tests/utils/oracles.py::non_finite_batch): zero_infinity zeroes the
    rows of inf losses only; NaN losses keep NaN rows, every class included."""
    lp, targets, il, tl = non_finite_batch(rng, with_nan=True, unused_class_nan=True)
    _check(Problem(lp, targets, il, tl), reduction, zero_infinity, rng=rng)


def test_concatenated_targets(rng):
    problem = make_problem(rng, T=20, N=4, C=6, S=5)
    problem.targets = concatenate_targets(problem.targets, problem.target_lengths)
    _check(problem, "mean", rng=rng, shapeless=("targets",))


def test_frames_past_input_length_are_never_read(rng):
    """NaN in frames t >= input_lengths[n] must not leak into the loss or gradient."""
    problem = make_problem(rng, T=10, N=2, C=5, S=3, input_lengths=[10, 7], target_lengths=[3, 3])
    clean_loss, clean_grad = _portable(problem, "none")
    problem.log_probs[7:, 1] = np.nan
    loss, grad = _portable(problem, "none")
    np.testing.assert_array_equal(loss, clean_loss)
    np.testing.assert_array_equal(grad, clean_grad)


def test_int32_indices(rng):
    problem = make_problem(rng, T=15, N=3, C=6, S=4)
    want = session(ctc_loss_model()).run(None, problem.feeds())[0]
    model = ctc_loss_model()
    for i in (1, 2, 3):
        model.graph.input[i].type.tensor_type.elem_type = 6  # int32
    np.testing.assert_array_equal(session(model).run(None, problem.feeds(np.int32))[0], want)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # log(0) = -inf is meant
def test_reference_evaluator_runs_the_bodies(rng):
    """onnx.reference inlines model-local functions: the same bodies, another runtime."""
    from onnx.reference import ReferenceEvaluator

    problem = make_problem(rng, T=8, N=2, C=4, S=3)
    got = ReferenceEvaluator(ctc_loss_model(reduction="none")).run(None, problem.feeds())[0]
    want, _ = torch_reference(*problem.args(), reduction="none")
    assert_close(got, want, np.float32, "loss", PORTABLE[np.dtype(np.float32)])


@pytest.mark.parametrize("name, value, message", [
    ("reduction", "avg", "reduction must be one of 'none', 'mean', 'sum'"),
    ("zero_infinity", 3, "zero_infinity must be 0 or 1"),
])
@pytest.mark.parametrize("op", ["CTCLoss", "CTCLossGrad"])
def test_bad_attribute_fails_at_run_time_with_its_name(rng, op, name, value, message):
    """Plain onnxruntime raises (never crashes), the failing node naming the rule."""
    import onnx

    problem = make_problem(rng, T=6, N=2, C=4, S=2)
    model = ctc_loss_model() if op == "CTCLoss" else grad_model()
    for attribute in model.graph.node[0].attribute:
        if attribute.name == name:
            attribute.CopyFrom(onnx.helper.make_attribute(name, value))
    feeds = problem.feeds() if op == "CTCLoss" else {"d_loss": np.array(1, np.float32), **problem.feeds()}
    with pytest.raises(Exception, match=message):
        session(model).run(None, feeds)


def _padded():
    """A valid padded batch: T = 6, N = 3, C = 5, S = 3."""
    return Problem(np.log(np.full((6, 3, 5), 0.2, np.float32)), np.array([[1, 2, 3], [4, 4, 0], [2, 0, 0]]),
                   np.array([6, 5, 4]), np.array([3, 2, 1]))


def _concatenated():
    problem = _padded()
    problem.targets = np.array([1, 2, 3, 4, 4, 2])
    return problem


REJECTED = {  # every input deploy_ctc.ctc_loss rejects, and the rule the body's error must name
    "target -1": (_padded, "targets", lambda p: p.targets.__setitem__((0, 1), -1), r"targets must lie in \[0, C\)"),
    "target == C": (_padded, "targets", lambda p: p.targets.__setitem__((1, 0), 5), r"targets must lie in \[0, C\)"),
    "target == blank": (_padded, "targets", lambda p: p.targets.__setitem__((2, 0), 0), "must not contain the blank"),
    "concatenated target -1": (_concatenated, "targets", lambda p: p.targets.__setitem__(5, -1),
                               r"targets must lie in \[0, C\)"),
    "blank >= C": (_padded, None, lambda p: setattr(p, "blank", 5), r"blank must be in \[0, C\)"),
    "input_length > T": (_padded, None, lambda p: p.input_lengths.__setitem__(1, 7), "input_lengths must not exceed T"),
    "negative input_length": (_padded, None, lambda p: p.input_lengths.__setitem__(0, -1),
                              "input_lengths must be non-negative"),
    "negative target_length": (_padded, None, lambda p: p.target_lengths.__setitem__(2, -1),
                               "target_lengths must be non-negative"),
    "target_length > S": (_padded, None, lambda p: p.target_lengths.__setitem__(2, 4),
                          "target_lengths must not exceed S"),
    "concatenated sum too short": (_concatenated, "targets", lambda p: p.target_lengths.__setitem__(2, 0),
                                   r"sum\(target_lengths\) must equal"),
    "concatenated sum wraps": (_concatenated, "targets",
                               lambda p: setattr(p, "target_lengths", np.array([2**63 - 1, 2**63 - 1, 8])),
                               "target_lengths must not exceed S"),
    "too few input_lengths": (_padded, "input_lengths", lambda p: setattr(p, "input_lengths", np.array([6, 5])),
                              "input_lengths must have N entries"),
}


@pytest.mark.parametrize("op", ["CTCLoss", "CTCLossGrad"])
@pytest.mark.parametrize("case", sorted(REJECTED))
def test_every_rejected_input_fails_at_run_time_naming_the_rule(case, op):
    """What the API rejects, plain onnxruntime refuses too (never a number), its error naming the rule."""
    make, shapeless, spoil, message = REJECTED[case]
    problem = make()
    spoil(problem)
    with pytest.raises(ValueError):  # the API's verdict on the same input
        import deploy_ctc

        deploy_ctc.ctc_loss(*problem.args(), blank=problem.blank)
    model = ctc_loss_model(blank=problem.blank) if op == "CTCLoss" else grad_model(blank=problem.blank)
    for value in model.graph.input:
        if value.name in (shapeless, "targets"):
            value.type.tensor_type.ClearField("shape")
    feeds = problem.feeds() if op == "CTCLoss" else {"d_loss": np.array(1, np.float32), **problem.feeds()}
    with pytest.raises(Exception, match=message):
        session(model).run(None, feeds)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unbatched(rng, reduction):
    """log_probs (T, C), targets (S,), 0-d lengths, as torch accepts them."""
    batched = make_problem(rng, T=9, N=1, C=5, S=3, target_lengths=[3], input_lengths=[8])
    problem = Problem(batched.log_probs[:, 0], batched.targets[0], batched.input_lengths[0],
                      batched.target_lengths[0])
    _check(problem, reduction, rng=rng,
           shapeless=("d_loss", "log_probs", "targets", "input_lengths", "target_lengths", "loss"))


@settings(max_examples=15)
@given(T=st.integers(1, 12), N=st.integers(1, 4), C=st.integers(2, 6), S=st.integers(0, 4),
       reduction=st.sampled_from(REDUCTIONS), zero_infinity=st.booleans(), seed=st.integers(0, 2**16),
       data=st.data())
def test_property_matches_torch(T, N, C, S, reduction, zero_infinity, seed, data):
    """Random small problems (any lengths, feasible or not, repeats, any blank) against torch float64."""
    rng = np.random.default_rng(seed)
    blank = data.draw(st.integers(0, C - 1))
    problem = make_problem(rng, T, N, C, S, blank=blank, input_lengths=rng.integers(0, T + 1, N),
                           repeat_prob=0.5)
    _check(problem, reduction, zero_infinity, rng=rng)


@pytest.mark.parametrize("opset", [19, 21, 23])
def test_later_onnx_opsets(rng, opset):
    """The bodies import the model's own opset; their ops mean the same from 18 on."""
    problem = make_problem(rng, T=12, N=3, C=5, S=4)
    got = session(ctc_loss_model(reduction="none", opset=opset)).run(None, problem.feeds())[0]
    want, _ = torch_reference(*problem.args(), reduction="none")
    assert_close(got, want, np.float32, f"loss at opset {opset}", PORTABLE[np.dtype(np.float32)])


@pytest.mark.parametrize("dtype,mask", [(np.float32, -1e30), (np.float32, -3.4e38), (np.float64, -1e300)])
def test_finite_masks_are_probabilities(rng, dtype, mask):
    """Only -inf is log zero: masked labels (every frame of sample 0's label 1, a fifth of sample 1's entries) give
    torch's finite losses, not +inf."""
    problem = make_problem(rng, T=8, N=2, C=4, S=2, dtype=dtype, input_lengths=[8, 8], target_lengths=[1, 2])
    problem.targets[0, 0] = 1
    problem.log_probs[:, 0, 1] = mask
    problem.log_probs[:, 1][rng.random((8, 4)) < 0.2] = mask
    loss = session(ctc_loss_model(np.dtype(dtype).name, reduction="none")).run(None, problem.feeds())[0]
    want, _ = torch_reference(*problem.args(), reduction="none")
    assert np.isfinite(loss).all()
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_nan_and_inf_log_probs_match_torch(rng):
    """NaN or +inf on a used frame's lattice (label, blank): NaN loss and NaN rows; another class: only that
    gradient entry; a frame past the input length: nothing -- as torch, in plain onnxruntime."""
    loss_session = session(ctc_loss_model("float64", reduction="none"))
    grad_session = session(grad_model("float64", reduction="none"))
    for value in (np.inf, np.nan):
        for frame, label in ((1, 1), (2, 0), (1, 3), (4, 1)):
            problem = Problem(make_problem(rng, T=5, N=2, C=4, S=2, dtype=np.float64).log_probs,
                              np.array([[1, 2], [3, 1]]), np.array([4, 5]), np.array([2, 2]))
            problem.log_probs[frame, 0, label] = value
            loss = loss_session.run(None, problem.feeds())[0]
            grad = grad_session.run(None, {"d_loss": np.ones(2), **problem.feeds()})[0]
            want_loss, want_grad = torch_reference(*problem.args(), reduction="none")
            what = f"{value} at frame {frame}, class {label}"
            assert_close(loss, want_loss, np.float64, f"{what}: loss", PORTABLE[np.dtype(np.float64)])
            assert_close(grad, want_grad, np.float64, f"{what}: grad", PORTABLE[np.dtype(np.float64)])
