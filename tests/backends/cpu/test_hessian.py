"""The derivative of the CTC gradient (deploy_ctc._backends.cpu.hessian) against central finite differences of the
gradient itself (deploy_ctc.ctc_loss_and_grad, checked against torch elsewhere), with no torch involved."""

import numpy as np
import pytest

import deploy_ctc
from deploy_ctc._backends.cpu.hessian import hessian_vector_product
from deploy_ctc.api import grad_scale
from deploy_ctc.validation import validate
from tests.utils import oracles


def finite_difference(lp, targets, il, tl, v, step=1e-6, **options):
    """(grad(lp + step v) - grad(lp - step v)) / (2 step): error O(step**2) on smooth inputs."""
    plus = deploy_ctc.ctc_loss_and_grad(lp + step * v, targets, il, tl, **options)[1]
    minus = deploy_ctc.ctc_loss_and_grad(lp - step * v, targets, il, tl, **options)[1]
    return (plus - minus) / (2 * step)


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", oracles.REDUCTIONS)
def test_matches_finite_differences_of_the_gradient(rng, reduction, zero_infinity):
    """Repeated labels, unused frames, an empty target on zero frames, and an infeasible sample (NaN rows, or 0
    under zero_infinity, as the gradient)."""
    T, N, C = 9, 5, 4
    lp = oracles.random_log_probs(rng, T, N, C)
    targets = np.array([[1, 1, 2], [3, 0, 0], [2, 3, 2], [0, 0, 0], [1, 1, 1]])
    il, tl = np.array([9, 6, 5, 0, 4]), np.array([3, 1, 3, 0, 3])  # sample 4: 1 _ 1 _ 1 needs 5 frames
    v = rng.standard_normal((T, N, C))
    options = dict(reduction=reduction, zero_infinity=zero_infinity)
    problem = validate(lp, targets, il, tl, **options)
    got = hessian_vector_product(problem, v, grad_scale(problem, None))
    want = finite_difference(lp, targets, il, tl, v, **options)
    oracles.assert_close(got, want, np.float64, "Hessian-vector product", oracles.Tolerance(
        1e-6, 1e-8, "central differences with step 1e-6: truncation ~1e-12, rounding ~1e-16 / 1e-6 = 1e-10"))
    assert np.isnan(got[:4, 4]).all() != zero_infinity and (got[4:, 4] == 0).all()
    assert (got[il[1]:, 1] == 0).all() and (got[:, 3] == 0).all()


def test_float32_input_long_and_peaky(rng):
    """T = 300 with peaky log-probs (down to -90): the log-space recursions keep the product finite and exact."""
    lp = oracles.random_log_probs(rng, 300, 2, 6, scale=30.0).astype(np.float32)
    targets, il, tl = np.array([[1, 2, 2, 5], [3, 4, 0, 0]]), np.array([300, 250]), np.array([4, 2])
    v = rng.standard_normal(lp.shape)
    problem = validate(lp, targets, il, tl, reduction="sum")
    got = hessian_vector_product(problem, v, grad_scale(problem, None))
    want = finite_difference(lp.astype(np.float64), targets, il, tl, v, step=1e-4, reduction="sum")
    assert np.isfinite(got).all()
    oracles.assert_close(got, want, np.float64, "Hessian-vector product", oracles.Tolerance(
        1e-5, 1e-6, "central differences with step 1e-4 (the gradient's own rounding over 300 frames, ~1e-11, "
                    "divided by a smaller step would dominate): measured 5e-8 against the exact log-space backend"))
