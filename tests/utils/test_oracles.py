"""The oracles agree with each other, so a disagreement with deploy_ctc points at deploy_ctc.

Brute-force enumeration and the single-path closed form are checked against torch float64, and torch's
gradient convention against finite differences of torch's own loss.
"""

import numpy as np
import pytest

from tests.utils import oracles

torch = pytest.importorskip("torch", reason="torch (the test extra) is the float64 oracle")


@pytest.mark.parametrize("blank", [0, 1, 2])
@pytest.mark.parametrize("T,C", [(1, 3), (4, 3), (6, 3), (5, 4)])
def test_brute_force_matches_torch(T, C, blank):
    rng = np.random.default_rng(T * 10 + C + 100 * blank)
    N = 4
    lp = oracles.random_log_probs(rng, T, N, C)
    tl = np.array([0, 1, min(2, T), min(3, T + 1)])  # the last one may be infeasible
    targets = oracles.random_targets(rng, tl, C, blank, repeat_prob=0.5)
    il = np.array([T, max(T - 1, 0), T, T])
    nll, post = oracles.brute_force_batch(lp, targets, il, tl, blank)
    for reduction in oracles.REDUCTIONS:
        loss, grad = oracles.torch_reference(lp, targets, il, tl, blank, reduction)
        oracles.assert_close(oracles.reduce_nll(nll, tl, reduction), loss, np.float64, "loss")
        w = oracles.reduction_weights(nll, tl, reduction)
        oracles.assert_close(oracles.grad_from_posterior(lp, post, nll, il, w), grad, np.float64, "grad")


def test_brute_force_plain_convention_matches_plain_from_torch():
    rng = np.random.default_rng(3)
    lp = oracles.random_log_probs(rng, 5, 3, 3)
    tl = np.array([2, 1, 2])
    targets = oracles.random_targets(rng, tl, 3, blank=1, repeat_prob=0.5)
    il = np.array([5, 3, 4])
    nll, post = oracles.brute_force_batch(lp, targets, il, tl, blank=1)
    go = np.array([0.5, -2.0, 3.0])
    _, grad = oracles.torch_reference(lp, targets, il, tl, 1, "none", grad_output=go, convention="plain")
    w = oracles.reduction_weights(nll, tl, "none", go)
    oracles.assert_close(oracles.grad_from_posterior(lp, post, nll, il, w, "plain"), grad, np.float64, "grad")


@pytest.mark.parametrize("target", [[1], [1, 1], [2, 1, 2], [1, 1, 1], [3, 3, 2, 2]])
@pytest.mark.parametrize("blank", [0, 4])
def test_single_path_matches_torch_and_brute_force(target, blank):
    target = [c if c != blank else 4 - blank for c in target]
    T = oracles.minimal_input_length(target)
    rng = np.random.default_rng(len(target))
    lp = oracles.random_log_probs(rng, T, 1, 5)
    nll, post = oracles.single_path_expected(lp[:, 0], target, blank)
    loss, grad = oracles.torch_reference(lp, [target], [T], [len(target)], blank, "sum")
    oracles.assert_close(nll, loss, np.float64, "loss")
    oracles.assert_close(np.exp(lp[:, 0]) - post, grad[:, 0], np.float64, "grad")
    if T <= 6:
        bf_nll, bf_post = oracles.brute_force(lp[:, 0], target, blank)
        oracles.assert_close(bf_nll, nll, np.float64, "brute-force loss")
        oracles.assert_close(bf_post, post, np.float64, "brute-force posterior")


def test_single_path_with_one_frame_fewer_is_infeasible():
    target = [1, 1, 2]
    T = oracles.minimal_input_length(target) - 1
    lp = oracles.random_log_probs(np.random.default_rng(0), T, 1, 3)
    loss, _ = oracles.torch_reference(lp, [target], [T], [3], 0, "none")
    assert np.isinf(loss).all()
    assert np.isinf(oracles.brute_force(lp[:, 0], target)[0])


def test_torch_gradient_is_finite_difference_through_log_softmax():
    """torch's convention = d/dz loss(log_softmax(z)); the plain one = d loss / d lp (unnormalized lp)."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((4, 2, 3))
    targets, il, tl = np.array([[1, 2], [2, 2]]), np.array([4, 4]), np.array([2, 2])

    def loss_of(lp):
        return oracles.torch_reference(lp, targets, il, tl, 0, "mean")[0]

    _, grad = oracles.torch_reference(oracles.log_softmax(z), targets, il, tl, 0, "mean")
    fd = oracles.finite_difference(lambda zz: loss_of(oracles.log_softmax(zz)), z)
    np.testing.assert_allclose(grad, fd, atol=1e-8)
    lp = z  # unnormalized: only the plain convention is a derivative here
    _, plain = oracles.torch_reference(lp, targets, il, tl, 0, "mean", convention="plain")
    np.testing.assert_allclose(plain, oracles.finite_difference(loss_of, lp), atol=1e-8)


def test_torch_reference_layouts_agree():
    rng = np.random.default_rng(11)
    lp = oracles.random_log_probs(rng, 7, 3, 5)
    tl = np.array([2, 0, 3])
    targets = oracles.random_targets(rng, tl, 5, blank=0)
    il = np.array([7, 5, 6])
    padded = oracles.torch_reference(lp, targets, il, tl, 0, "none")
    concat = oracles.torch_reference(lp, oracles.concatenate_targets(targets, tl), il, tl, 0, "none")
    for a, b in zip(padded, concat):
        np.testing.assert_array_equal(a, b)
    unbatched = oracles.torch_reference(lp[:, 2], targets[2], 6, 3, 0, "none")
    np.testing.assert_array_equal(unbatched[0], padded[0][2])
    np.testing.assert_array_equal(unbatched[1], padded[1][:, 2])


def test_random_targets_avoid_blank_and_pad():
    rng = np.random.default_rng(0)
    targets = oracles.random_targets(rng, [3, 1, 0], 4, blank=2, repeat_prob=0.5, pad_value=-7)
    assert targets.shape == (3, 3)
    assert ((targets[0] != 2) & (targets[0] >= 0) & (targets[0] < 4)).all()
    np.testing.assert_array_equal(targets[1, 1:], -7)
    np.testing.assert_array_equal(targets[2], -7)
