"""deploy_ctc.torch: a drop-in for torch.nn.functional.ctc_loss / nn.CTCLoss on CPU tensors.

Losses and autograd gradients must equal torch's (float64 oracle on the same values, tests/utils/oracles.py),
for every input layout torch accepts, through an upstream log_softmax, and under torch.autograd.gradcheck.
"""

import importlib

import numpy as np
import pytest

from tests.utils import oracles

torch = pytest.importorskip("torch", reason="deploy_ctc.torch needs torch (the test extra)")


@pytest.fixture
def dctorch():
    """deploy_ctc.torch, imported per test (after the skip above; a missing module fails tests, not collection)."""
    return importlib.import_module("deploy_ctc.torch")


DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def random_inputs(rng, T, N, C, S, blank=0, full=False):
    lp = oracles.random_log_probs(rng, T, N, C)
    tl = np.full(N, S) if full else rng.integers(0, S + 1, N)
    tl[0] = S
    targets = oracles.random_targets(rng, tl, C, blank, S=S, repeat_prob=0.3)
    il = np.full(N, T) if full else rng.integers(np.minimum(2 * tl, T), T + 1)
    return lp, targets, il, tl


def run_adapter(fn, lp, targets, il, tl, dtype, grad_output, **kw):
    """Loss and autograd gradient of ``fn`` on torch tensors built from the numpy inputs."""
    x = torch.tensor(lp, dtype=dtype, requires_grad=True)
    before = x.detach().clone()
    loss = fn(x, torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl), **kw)
    assert isinstance(loss, torch.Tensor) and loss.dtype == dtype and loss.device.type == "cpu"
    assert loss.requires_grad
    loss.backward(torch.as_tensor(grad_output, dtype=dtype).reshape(loss.shape))
    np.testing.assert_array_equal(x.detach().numpy(), before.numpy(), "the adapter modified log_probs")  # NaN too
    return loss.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", oracles.REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_matches_torch(rng, dtype, reduction, zero_infinity, dctorch):
    T, N, C, S = 21, 5, 7, 6
    lp, targets, il, tl = random_inputs(rng, T, N, C, S, blank=3)
    il[2], tl[2] = 3, 4  # infeasible
    lp = lp.astype(DTYPES[dtype])
    go = rng.uniform(0.5, 2.0, N) if reduction == "none" else np.array(1.5)
    kw = dict(blank=3, reduction=reduction, zero_infinity=zero_infinity)
    loss, grad = run_adapter(dctorch.ctc_loss, lp, targets, il, tl, dtype, go, **kw)
    ref_loss, ref_grad = oracles.torch_reference(lp, targets, il, tl, **kw, grad_output=go)
    oracles.assert_close(loss, ref_loss, DTYPES[dtype], "loss")
    oracles.assert_close(grad, ref_grad, DTYPES[dtype], "grad")


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", oracles.REDUCTIONS)
def test_non_finite_losses_follow_torch(rng, reduction, zero_infinity, dctorch):
    """torch's rules for inf and NaN losses (tests/utils/oracles.py::non_finite_batch), loss and gradient."""
    lp, targets, il, tl = oracles.non_finite_batch(rng, with_nan=True, unused_class_nan=True)
    grad_output = rng.uniform(0.5, 2.0, 6) if reduction == "none" else 1.7
    kw = dict(reduction=reduction, zero_infinity=zero_infinity)
    loss, grad = run_adapter(dctorch.ctc_loss, lp, targets, il, tl, torch.float64, grad_output, **kw)
    ref_loss, ref_grad = oracles.torch_reference(lp, targets, il, tl, grad_output=grad_output, **kw)
    oracles.assert_close(loss, ref_loss, np.float64, "loss")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


@pytest.mark.parametrize("reduction", oracles.REDUCTIONS)
def test_module_matches_nn_ctcloss(rng, reduction, dctorch):
    lp, targets, il, tl = random_inputs(rng, 30, 4, 6, 8, blank=5)
    module = dctorch.CTCLoss(blank=5, reduction=reduction)
    assert isinstance(module, torch.nn.Module)
    go = np.ones(4) if reduction == "none" else np.array(1.0)
    loss, grad = run_adapter(module, lp, targets, il, tl, torch.float64, go)
    ref_loss, ref_grad = oracles.torch_reference(lp, targets, il, tl, 5, reduction)
    oracles.assert_close(loss, ref_loss, np.float64, "loss")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


def test_module_defaults_and_zero_infinity(rng, dctorch):
    """Default options (blank 0, mean) and zero_infinity with an infeasible sample: loss and gradient as torch's."""
    lp, targets, il, tl = random_inputs(rng, 6, 3, 4, 4)
    il[1] = 2
    for kwargs in ({}, {"zero_infinity": True}):
        results = []
        for module in (dctorch.CTCLoss(**kwargs), torch.nn.CTCLoss(**kwargs)):
            x = torch.tensor(lp, requires_grad=True)
            loss = module(x, torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl))
            loss.backward()
            results.append((loss.detach().numpy(), x.grad.numpy()))
        (ours, our_grad), (ref, ref_grad) = results
        oracles.assert_close(ours, ref, np.float64, f"CTCLoss({kwargs}) loss")
        oracles.assert_close(our_grad, ref_grad, np.float64, f"CTCLoss({kwargs}) grad")


def test_concatenated_and_tuple_lengths(rng, dctorch):
    lp, targets, il, tl = random_inputs(rng, 15, 4, 5, 5)
    concat = oracles.concatenate_targets(targets, tl)
    x = torch.tensor(lp, requires_grad=True)
    loss = dctorch.ctc_loss(x, torch.as_tensor(concat, dtype=torch.int32), tuple(il.tolist()), tuple(tl.tolist()))
    loss.backward()
    ref_loss, ref_grad = oracles.torch_reference(lp, concat, il, tl)
    oracles.assert_close(loss.detach().numpy(), ref_loss, np.float64, "loss")
    oracles.assert_close(x.grad.numpy(), ref_grad, np.float64, "grad")


def test_unbatched_with_0d_lengths(rng, dctorch):
    lp = oracles.random_log_probs(rng, 12, 1, 6)[:, 0]
    target = np.array([2, 2, 5])
    loss, grad = run_adapter(dctorch.ctc_loss, lp, target, np.array(10), np.array(3), torch.float64, np.array(1.0),
                             reduction="none")
    ref_loss, ref_grad = oracles.torch_reference(lp, target, 10, 3, reduction="none")
    assert loss.shape == () and grad.shape == (12, 6)
    oracles.assert_close(loss, ref_loss, np.float64, "loss")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


def test_gradient_through_log_softmax_and_non_contiguous_input(rng, dctorch):
    """The usual training graph: logits (N, T, C) -> transpose -> log_softmax -> CTC; compare the logits' grad."""
    T, N, C, S = 25, 3, 8, 6
    _, targets, il, tl = random_inputs(rng, T, N, C, S)
    logits = rng.standard_normal((N, T, C))
    grads = []
    for fn in (dctorch.ctc_loss, torch.nn.functional.ctc_loss):
        z = torch.tensor(logits, requires_grad=True)
        lp = z.transpose(0, 1).log_softmax(2)  # (T, N, C), non-contiguous
        loss = fn(lp, torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl))
        loss.backward()
        grads.append(z.grad.numpy())
    oracles.assert_close(grads[0], grads[1], np.float64, "d loss / d logits")


def test_gradcheck_through_log_softmax(rng, dctorch):
    """Finite differences agree with the adapter's backward (torch's convention is exact through log_softmax)."""
    targets, il, tl = torch.tensor([[1, 2], [2, 2]]), torch.tensor([5, 5]), torch.tensor([2, 2])
    z = torch.tensor(rng.standard_normal((5, 2, 3)), requires_grad=True)

    def f(z):
        return dctorch.ctc_loss(z.log_softmax(2), targets, il, tl, reduction="sum")

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_no_grad_forward(rng, dctorch):
    lp, targets, il, tl = random_inputs(rng, 9, 2, 4, 3)
    with torch.no_grad():
        loss = dctorch.ctc_loss(torch.as_tensor(lp), torch.as_tensor(targets), torch.as_tensor(il),
                                torch.as_tensor(tl), reduction="none")
    oracles.assert_close(loss.numpy(), oracles.torch_reference(lp, targets, il, tl, reduction="none")[0],
                         np.float64, "loss")


def test_bad_target_is_rejected(rng, dctorch):
    lp, targets, il, tl = random_inputs(rng, 9, 2, 4, 3, full=True)
    targets[1, 0] = 4
    with pytest.raises(ValueError, match=r"targets\[1, 0\]"):
        dctorch.ctc_loss(torch.as_tensor(lp), torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(rng, dtype, dctorch):
    """torch refuses half; deploy_ctc computes it in float32 and returns the input dtype.

    The oracle runs on the exact float64 upcast of the rounded inputs; the result is rounded to the half type,
    so the tolerance is half an ulp of the output type (float16: 2**-11, bfloat16: 2**-8 relative).
    """
    lp, targets, il, tl = random_inputs(rng, 20, 3, 6, 5)
    x = torch.tensor(lp).to(dtype).requires_grad_()
    loss = dctorch.ctc_loss(x, torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl), reduction="sum")
    assert loss.dtype == dtype
    loss.backward()
    assert x.grad.dtype == dtype
    exact = x.detach().double().numpy()
    ref_loss, ref_grad = oracles.torch_reference(exact, targets, il, tl, reduction="sum")
    tol = oracles.tolerance(np.float16) if dtype == torch.float16 else oracles.Tolerance(
        4e-3, 4e-3, "bfloat16 rounding of the result: 2**-8 relative, at most 2**-8 absolute for |grad| <= 1")
    oracles.assert_close(loss.double().detach().numpy(), ref_loss, np.float16, "loss", tol)
    oracles.assert_close(x.grad.double().numpy(), ref_grad, np.float16, "grad", tol)


def test_expanded_zero_stride_input(rng, dctorch):
    """A batch broadcast from one sequence (stride 0 on N) works like a materialized copy, and its gradient flows
    back summed over the batch into the one sequence."""
    targets, il, tl = torch.tensor([[1, 2], [3, 3], [4, 0]]), torch.tensor([10, 9, 4]), torch.tensor([2, 2, 1])
    one = oracles.random_log_probs(rng, 10, 1, 5)  # (T, 1, C)
    results = []
    for fn in (dctorch.ctc_loss, torch.nn.functional.ctc_loss):
        lp = torch.tensor(one, requires_grad=True)
        expanded = lp.expand(10, 3, 5)  # (T, N, C) with stride 0 on N
        loss = fn(expanded, targets, il, tl, reduction="none")
        loss.backward(torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
        results.append((loss.detach().numpy(), lp.grad.numpy()))
    (loss, grad), (ref_loss, ref_grad) = results
    oracles.assert_close(loss, ref_loss, np.float64, "loss")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")


def test_non_tensor_log_probs_is_a_type_error(rng, dctorch):
    lp, targets, il, tl = random_inputs(rng, 5, 2, 4, 2)
    with pytest.raises(TypeError, match="log_probs"):
        dctorch.ctc_loss(lp, torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl))
