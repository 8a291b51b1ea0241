"""deploy_ctc.torch: a drop-in for torch.nn.functional.ctc_loss / nn.CTCLoss on CPU tensors.

Losses and autograd gradients must equal torch's (float64 oracle on the same values, tests/utils/oracles.py),
for every input layout torch accepts, through an upstream log_softmax, and under torch.autograd.gradcheck; and
the op must behave like a torch operator: torch.compile (fullgraph), torch.export, TorchScript, autocast,
DistributedDataParallel, double backward (exact, unlike torch), patch() inside a third-party model.
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


# ---- torch integration: the op under torch's machinery ---------------------------------------------------

class TinyCTCModel(torch.nn.Module):
    """Linear + log_softmax + a CTC loss module over (T, N, 5) features: the smallest training graph."""

    def __init__(self, loss, features=5, classes=6):
        super().__init__()
        self.linear = torch.nn.Linear(features, classes, dtype=torch.float64)
        self.loss = loss

    def forward(self, features, targets, input_lengths, target_lengths):
        return self.loss(self.linear(features).log_softmax(-1), targets, input_lengths, target_lengths)


def twin_models(dctorch, reduction="mean"):
    """The same model with deploy_ctc's loss and with torch's (the oracle), sharing initial weights."""
    torch.manual_seed(0)
    ours = TinyCTCModel(dctorch.CTCLoss(reduction=reduction))
    reference = TinyCTCModel(torch.nn.CTCLoss(reduction=reduction))
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def training_batch(rng, T=14, N=4, C=6, S=4):
    """(features (T, N, 5) float64, targets (N, S), input_lengths (N,), target_lengths (N,)) tensors."""
    _, targets, il, tl = random_inputs(rng, T, N, C, S)
    return (torch.tensor(rng.standard_normal((T, N, 5))), torch.as_tensor(targets), torch.as_tensor(il),
            torch.as_tensor(tl))


def loss_and_grads(model, batch):
    """One training step's loss and parameter gradients (of the summed loss), as numpy."""
    model.zero_grad()
    loss = model(*batch)
    loss.sum().backward()
    return loss.detach().numpy(), [p.grad.numpy().copy() for p in model.parameters()]


def assert_same_step(got, want, dtype=np.float64, what="step"):
    oracles.assert_close(got[0], want[0], dtype, f"{what}: loss")
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        oracles.assert_close(g, w, dtype, f"{what}: grad of parameter {i}")


def op_arguments(rng, with_grad, reduction="mean"):
    lp, targets, il, tl = random_inputs(rng, 9, 3, 5, 3)
    return (torch.tensor(lp, requires_grad=True), torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl),
            0, reduction, False, with_grad)


def test_op_passes_torch_library_opcheck(rng, dctorch):
    """Schema, fake implementation (shapes, dtypes, devices), autograd registration, AOT dispatch."""
    op = torch.ops.deploy_ctc.ctc_loss.default
    # with_grad: the AOT check differentiates the gradient output too (double backward); the with_grad=False
    # path is test_no_grad_call_then_backward_through_the_op.
    torch.library.opcheck(op, op_arguments(rng, with_grad=True, reduction="none"))


def test_compiled_training_step_matches_torch(rng, dctorch, monkeypatch):
    """torch.compile(fullgraph=True, inductor) of the model: loss and gradients equal eager torch.nn.CTCLoss,
    and deploy_ctc computes them (the op runs once per step, forward and gradient in one pass)."""
    calls = []
    real = dctorch.api.ctc_loss_and_grad
    monkeypatch.setattr(dctorch.api, "ctc_loss_and_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, reference = twin_models(dctorch)
    compiled = torch.compile(ours, fullgraph=True)
    for step in range(2):  # the second batch has new values and lengths: it reuses the compiled graphs
        batch = training_batch(rng)
        assert_same_step(loss_and_grads(compiled, batch), loss_and_grads(reference, batch), what=f"step {step}")
    assert len(calls) == 2


def test_compiled_model_with_tuple_lengths_and_errors(rng, dctorch):
    """Python tuples for lengths trace as constants; a bad target still raises deploy_ctc's ValueError."""
    ours, reference = twin_models(dctorch, "sum")
    features, targets, il, tl = training_batch(rng)
    il, tl = tuple(il.tolist()), tuple(tl.tolist())
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    assert_same_step(loss_and_grads(compiled, (features, targets, il, tl)),
                     loss_and_grads(reference, (features, targets, il, tl)))
    targets[0, 0] = 6
    with pytest.raises(ValueError, match=r"targets\[0, 0\] = 6 is outside \[0, C=6\)"):
        compiled(features, targets, il, tl)


def test_export_captures_the_op(rng, dctorch):
    """torch.export keeps deploy_ctc::ctc_loss as one node, with dynamic T and N; the program runs other shapes."""
    ours, reference = twin_models(dctorch, "none")
    T, N = torch.export.Dim("T", min=2), torch.export.Dim("N", min=2)
    with torch.no_grad():
        program = torch.export.export(ours, training_batch(rng),
                                      dynamic_shapes=({0: T, 1: N}, {0: N}, {0: N}, {0: N}))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert torch.ops.deploy_ctc.ctc_loss.default in targets and torch.ops.aten._ctc_loss.default not in targets
    batch = training_batch(rng, T=17, N=3)
    with torch.no_grad():
        oracles.assert_close(program.module()(*batch).numpy(), reference(*batch).numpy(), np.float64, "loss")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_autocast_computes_and_returns_float32(rng, dtype, dctorch):
    """As torch's autocast policy for ctc_loss: float32 loss from the float32 cast of the input; the gradient
    flows back to the input in its own dtype."""
    lp, targets, il, tl = random_inputs(rng, 16, 3, 6, 4)
    x = torch.tensor(lp).to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16 if dtype == torch.float32 else dtype):
        loss = dctorch.ctc_loss(x, torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl))
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == dtype
    ref_loss, ref_grad = oracles.torch_reference(x.detach().double().numpy(), targets, il, tl)
    oracles.assert_close(loss.detach().numpy(), ref_loss, np.float32, "loss")
    tol = oracles.tolerance(np.float32) if dtype == torch.float32 else oracles.Tolerance(
        4e-3, 4e-3, "the float32 gradient rounded to the input's half type: 2**-8 relative at most")
    oracles.assert_close(x.grad.double().numpy(), ref_grad, np.float32, "grad", tol)


def test_autocast_keeps_float64_and_covers_cuda(rng, dctorch):
    """float64 is not cast (torch's rule); the CUDA autocast rule is registered (not run here: no GPU)."""
    lp, targets, il, tl = random_inputs(rng, 8, 2, 4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dctorch.ctc_loss(torch.tensor(lp), torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl))
    assert loss.dtype == torch.float64
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("deploy_ctc::ctc_loss", key), key


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", oracles.REDUCTIONS)
def test_double_backward_matches_finite_differences(rng, reduction, zero_infinity, dctorch):
    """gradgradcheck (finite differences of the first derivative, itself checked against torch) through
    logits -> log_softmax -> ctc_loss and on log_probs directly; torch's own ctc_loss raises here. Repeated
    labels, a short and an empty target; under zero_infinity also an infeasible sample (its rows are 0).
    fast_mode checks random projections of the second derivative; the full matrix is checked in
    test_hessian_matches_brute_force_enumeration."""
    targets = torch.tensor([[1, 2, 2], [2, 2, 0], [1, 0, 0], [3, 1, 0]])
    il, tl = torch.tensor([7, 5, 3, 2]), torch.tensor([3, 2, 0, 2 if zero_infinity else 1])
    z = torch.tensor(rng.standard_normal((7, 4, 4)), requires_grad=True)

    def through_log_softmax(z):
        return dctorch.ctc_loss(z.log_softmax(2), targets, il, tl, reduction=reduction, zero_infinity=zero_infinity)

    def on_log_probs(lp):
        return dctorch.ctc_loss(lp, targets, il, tl, reduction=reduction, zero_infinity=zero_infinity)

    assert torch.autograd.gradgradcheck(through_log_softmax, (z,), fast_mode=True)
    assert torch.autograd.gradgradcheck(on_log_probs, (z,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_double_backward_in_half_precision_matches_finite_differences_of_torch_float64(rng, dtype, dctorch):
    """The Hessian-vector product of float16 / bfloat16 log_probs (computed in float64, rounded once) against
    central differences of torch's float64 gradient at the same, exactly representable, point. Tolerance: the
    rounding of the result (bfloat16: 2**-8 relative) plus the differences' O(eps**2) error."""
    targets, il, tl = torch.tensor([[1, 2, 2], [3, 1, 0]]), torch.tensor([7, 5]), torch.tensor([3, 2])
    lp = torch.tensor(rng.standard_normal((7, 2, 4))).log_softmax(2).to(dtype)
    v = torch.tensor(rng.standard_normal((7, 2, 4))).to(dtype)
    x = lp.clone().requires_grad_()
    (grad,) = torch.autograd.grad(dctorch.ctc_loss(x, targets, il, tl), x, create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), x)

    def torch_grad(point):
        point = point.requires_grad_()
        return torch.autograd.grad(torch.nn.functional.ctc_loss(point, targets, il, tl), point)[0]

    eps = 1e-5
    want = (torch_grad(lp.double() + eps * v.double()) - torch_grad(lp.double() - eps * v.double())) / (2 * eps)
    assert hvp.dtype == dtype
    torch.testing.assert_close(hvp.double(), want, rtol=2**-7, atol=2**-7 * float(want.abs().max()))


def test_torch_has_no_double_backward(rng):
    """Why the test above needs finite differences: torch's ctc_loss raises on the same chain."""
    z = torch.tensor(rng.standard_normal((5, 2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match="derivative for aten::_ctc_loss_backward is not implemented"):
        torch.autograd.gradgradcheck(lambda z: torch.nn.functional.ctc_loss(
            z.log_softmax(2), torch.tensor([[1, 2], [2, 2]]), torch.tensor([5, 4]), torch.tensor([2, 1])), (z,))


def brute_force_ctc_loss(log_probs, target, blank=0):
    """-log sum over every alignment of ``target`` (enumerated: C**T paths) of exp(sum_t log_probs[t, pi_t]), in
    torch ops: autograd through it gives the exact Hessian (tiny T and C only)."""
    import itertools

    T, C = log_probs.shape
    scores = []
    for path in itertools.product(range(C), repeat=T):
        collapsed = [c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1])]
        if collapsed == list(target):
            scores.append(log_probs[torch.arange(T), torch.tensor(path)].sum())
    return -torch.logsumexp(torch.stack(scores), 0)


@pytest.mark.parametrize("reduction, through_log_softmax", [("mean", True), ("none", False), ("sum", False)],
                         ids=["mean-logits", "none-log_probs", "sum-log_probs"])
def test_hessian_matches_brute_force_enumeration(rng, reduction, through_log_softmax, dctorch):
    """The full Hessian (double backward, column by column) equals autograd's second derivative of the alignment
    enumeration, with respect to the logits (through log_softmax) or to log_probs themselves: a repeated label,
    a sample using fewer frames than T, a single label; the reduction's weights included."""
    targets, il, tl = [[1, 1], [2, 0], [1, 2]], [5, 4, 3], [2, 1, 2]
    x = torch.tensor(rng.standard_normal((5, 3, 3)))
    prepare = (lambda x: x.log_softmax(-1)) if through_log_softmax else (lambda x: x)

    def ours(x):
        loss = dctorch.ctc_loss(prepare(x), torch.tensor(targets), torch.tensor(il), torch.tensor(tl),
                                reduction=reduction)
        return loss.sum()

    def enumeration(x):
        lp = prepare(x)
        losses = torch.stack([brute_force_ctc_loss(lp[: il[n], n], targets[n][: tl[n]]) for n in range(3)])
        if reduction == "mean":
            return (losses / torch.tensor(tl, dtype=losses.dtype)).mean()
        return losses.sum()

    got = torch.autograd.functional.hessian(ours, x)  # (5, 3, 3, 5, 3, 3)
    want = torch.autograd.functional.hessian(enumeration, x)
    if not through_log_softmax:  # torch's gradient convention adds exp(log_probs): its derivative is diagonal
        extra = torch.zeros(5, 3, 3, dtype=torch.float64)
        weights = {"mean": [1 / (3 * max(n, 1)) for n in tl], "sum": [1.0] * 3, "none": [1.0] * 3}[reduction]
        for n in range(3):
            extra[: il[n], n] = x[: il[n], n].exp() * weights[n]
        want = want + torch.diag(extra.reshape(-1)).reshape(got.shape)
    oracles.assert_close(got.numpy(), want.numpy(), np.float64, "Hessian")


def test_gradient_penalty_on_the_weights(rng, dctorch):
    """A gradient penalty (create_graph=True, then backward through the gradient) on a Linear layer's weights:
    gradgradcheck through Linear -> log_softmax -> ctc_loss."""
    ours, _ = twin_models(dctorch)
    features, targets, il, tl = training_batch(rng, T=6, N=2, S=2)

    def loss_of(weight, bias):
        log_probs = torch.nn.functional.linear(features, weight, bias).log_softmax(-1)
        return dctorch.ctc_loss(log_probs, targets, il, tl)

    params = (ours.linear.weight.detach().clone().requires_grad_(), ours.linear.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradgradcheck(loss_of, params, fast_mode=True)


def test_third_derivative_raises(rng, dctorch):
    z = torch.tensor(rng.standard_normal((5, 2, 3)), requires_grad=True)
    loss = dctorch.ctc_loss(z.log_softmax(2), torch.tensor([[1, 2], [2, 2]]), torch.tensor([5, 4]),
                            torch.tensor([2, 1]))
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    (hvp,) = torch.autograd.grad(grad.pow(2).sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="third and higher order are not implemented"):
        hvp.sum().backward()


def test_no_grad_call_then_backward_through_the_op(rng, dctorch):
    """with_grad=False is a performance hint: backward computes the gradient it skipped."""
    lp, targets, il, tl, *options = op_arguments(rng, with_grad=False, reduction="sum")
    loss, empty = torch.ops.deploy_ctc.ctc_loss(lp, targets, il, tl, *options)
    assert empty.shape == (0,)
    loss.backward()
    _, ref_grad = oracles.torch_reference(lp.detach().numpy(), targets.numpy(), il.numpy(), tl.numpy(),
                                          reduction="sum")
    oracles.assert_close(lp.grad.numpy(), ref_grad, np.float64, "grad")


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_jit_script_matches_torch_and_round_trips(rng, dctorch, tmp_path):
    """torch.jit.script(CTCLoss) works on tensors and survives save/load (loading needs deploy_ctc.torch
    imported); value errors arrive as TorchScript's RuntimeError carrying deploy_ctc's message."""
    torch.jit.save(torch.jit.script(dctorch.CTCLoss(blank=2, reduction="none")), str(tmp_path / "ctc.pt"))
    loaded = torch.jit.load(str(tmp_path / "ctc.pt"))
    lp, targets, il, tl = random_inputs(rng, 12, 3, 5, 4, blank=2)
    go = rng.uniform(0.5, 2.0, 3)
    loss, grad = run_adapter(loaded, lp, targets, il, tl, torch.float64, go)
    ref_loss, ref_grad = oracles.torch_reference(lp, targets, il, tl, blank=2, reduction="none", grad_output=go)
    oracles.assert_close(loss, ref_loss, np.float64, "loss")
    oracles.assert_close(grad, ref_grad, np.float64, "grad")
    targets[1, 0] = 2
    tl[1] = max(tl[1], 1)
    with pytest.raises(RuntimeError, match=r"ValueError: targets\[1, 0\] = 2 equals blank=2"):
        loaded(torch.as_tensor(lp), torch.as_tensor(targets), torch.as_tensor(il), torch.as_tensor(tl))


# ---- patch(): deploy_ctc inside third-party code ---------------------------------------------------------

def computed_by_deploy_ctc(loss):
    return "deploy_ctc" in type(loss.grad_fn).__name__


def third_party_losses(rng):
    """Losses from code that calls torch's names at run time: F.ctc_loss, a new and an existing nn.CTCLoss."""
    lp, targets, il, tl = (torch.as_tensor(a) for a in random_inputs(rng, 10, 2, 5, 3))
    lp.requires_grad_()
    existing = torch.nn.CTCLoss(reduction="sum")
    return lambda: [torch.nn.functional.ctc_loss(lp, targets, il, tl), torch.nn.CTCLoss()(lp, targets, il, tl),
                    existing(lp, targets, il, tl)]


def test_patch_context_manager_swaps_and_restores(rng, dctorch):
    originals = torch.nn.functional.ctc_loss, torch.nn.CTCLoss.forward
    losses = third_party_losses(rng)
    reference = [loss.detach() for loss in losses()]
    with dctorch.patch():
        inside = losses()
        with dctorch.patch():  # nested: the inner exit leaves the outer patch in place
            pass
        inside += losses()
    assert all(computed_by_deploy_ctc(loss) for loss in inside)
    for i, loss in enumerate(inside):
        oracles.assert_close(loss.detach().numpy(), reference[i % 3].numpy(), np.float64, f"loss {i}")
    assert (torch.nn.functional.ctc_loss, torch.nn.CTCLoss.forward) == originals
    assert not any(computed_by_deploy_ctc(loss) for loss in losses())


def test_patch_restores_after_an_exception_and_decorates(rng, dctorch):
    originals = torch.nn.functional.ctc_loss, torch.nn.CTCLoss.forward
    losses = third_party_losses(rng)
    with pytest.raises(KeyError), dctorch.patch():
        raise KeyError("inside the block")
    assert (torch.nn.functional.ctc_loss, torch.nn.CTCLoss.forward) == originals

    @dctorch.patch()
    def train_step():
        return losses()

    for _ in range(2):  # a decorator re-enters on every call
        assert all(computed_by_deploy_ctc(loss) for loss in train_step())
        assert (torch.nn.functional.ctc_loss, torch.nn.CTCLoss.forward) == originals

    @dctorch.patch()
    def recursive(depth):  # the same decorator instance entered twice at once
        return losses() if depth == 0 else recursive(depth - 1)

    assert all(computed_by_deploy_ctc(loss) for loss in recursive(2))
    assert (torch.nn.functional.ctc_loss, torch.nn.CTCLoss.forward) == originals


def tiny_wav2vec2_for_ctc(transformers):
    """A randomly initialised Wav2Vec2ForCTC small enough for a unit test (49 frames per 400 samples)."""
    config = transformers.Wav2Vec2Config(
        vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 3), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, pad_token_id=0, ctc_loss_reduction="mean")
    torch.manual_seed(0)
    return transformers.Wav2Vec2ForCTC(config).eval()  # eval: no dropout or masking, gradients still flow


def test_patch_on_transformers_wav2vec2_for_ctc(rng, dctorch):
    """Wav2Vec2ForCTC computes its own loss with F.ctc_loss from ``labels=``; under patch() deploy_ctc computes
    it, with torch's loss and parameter gradients (float32: the model's log_softmax is float32)."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    model = tiny_wav2vec2_for_ctc(transformers)
    audio = torch.tensor(rng.standard_normal((3, 400)), dtype=torch.float32)
    labels = torch.tensor([[1, 2, 3, -100], [4, 4, 5, 6], [2, -100, -100, -100]])  # -100: padding

    def step():
        model.zero_grad()
        loss = model(audio, labels=labels).loss
        loss.backward()
        return loss, [p.grad.numpy().copy() for p in model.parameters() if p.grad is not None]

    reference = step()
    with dctorch.patch():
        ours = step()
    assert computed_by_deploy_ctc(ours[0]) and not computed_by_deploy_ctc(reference[0])
    assert len(ours[1]) == len(reference[1]) > 10
    oracles.assert_close(ours[0].detach().numpy(), reference[0].detach().numpy(), np.float32, "loss")
    scale = max(float(np.abs(w).max()) for w in reference[1])
    tol = oracles.Tolerance(5e-5, 2e-5 * scale, "float32 backpropagation through the model's layers amplifies the "
                            "float32 rounding of the CTC gradient; absolute part relative to the model's largest "
                            "gradient entry (measured: 4e-6 absolute where that entry is 14)")
    for i, (g, w) in enumerate(zip(ours[1], reference[1])):
        oracles.assert_close(g, w, np.float32, f"grad of parameter {i}", tol)


# ---- DistributedDataParallel ---------------------------------------------------------------------------

def ddp_rank_gradients(rank, world_size, init_file, state, batch, out_dir):
    """One DDP rank (gloo, CPU): the model with deploy_ctc's loss on its contiguous shard of the global batch;
    saves the parameter gradients after DDP's all-reduce (the average over ranks)."""
    import deploy_ctc.torch

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        model = TinyCTCModel(deploy_ctc.torch.CTCLoss())
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        features, targets, il, tl = batch
        shard = slice(rank * len(il) // world_size, (rank + 1) * len(il) // world_size)
        ddp(features[:, shard], targets[shard], il[shard], tl[shard]).backward()
        torch.save([p.grad for p in model.parameters()], out_dir / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process(rng, dctorch, tmp_path):
    """2 gloo ranks, each a mean-reduced half batch: DDP's averaged gradients equal torch.nn.CTCLoss's on the
    whole batch in one process (equal shards: the mean of the halves' means is the global mean)."""
    ours, reference = twin_models(dctorch)
    batch = training_batch(rng, N=6)
    torch.multiprocessing.spawn(ddp_rank_gradients, nprocs=2, join=True,
                                args=(2, tmp_path / "rendezvous", ours.state_dict(), batch, tmp_path))
    _, want = loss_and_grads(reference, batch)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (g, w) in enumerate(zip(got, want)):
            oracles.assert_close(g.numpy(), w, np.float64, f"rank {rank}: grad of parameter {i}")


# ---- errors: the API's messages on every path -----------------------------------------------------------

def _good_arguments():
    """(log_probs (6, 2, 4) float64, targets (2, 3), input_lengths, target_lengths, options) as NumPy."""
    rng = np.random.default_rng(0)
    return [oracles.random_log_probs(rng, 6, 2, 4), np.array([[1, 2, 3], [2, 2, 0]]), np.array([6, 5]),
            np.array([3, 2]), {}]


def _bad(**change):
    """Good arguments with some replaced (by index 0-3, or options by name)."""
    args = _good_arguments()
    for key, value in change.items():
        if key.startswith("arg"):
            args[int(key[3:])] = value(args[int(key[3:])]) if callable(value) else value
        else:
            args[4][key] = value
    return args


BAD_ARGUMENTS = {
    "float targets": _bad(arg1=lambda t: t.astype(np.float32)),
    "target outside C": _bad(arg1=lambda t: np.where(t == 3, 4, t)),
    "target equals blank": _bad(arg1=lambda t: np.where(t == 3, 0, t)),
    "concatenated length mismatch": _bad(arg1=np.array([1, 2, 3, 2])),
    "input length above T": _bad(arg2=np.array([7, 5])),
    "negative target length": _bad(arg3=np.array([-1, 2])),
    "target length above S": _bad(arg3=np.array([4, 2])),
    "lengths count": _bad(arg2=np.array([6, 5, 4])),
    "float lengths list": _bad(arg2=[6.0, 5.5]),
    "bool length": _bad(arg3=True),
    "integer log_probs": _bad(arg0=lambda lp: (lp * 10).astype(np.int64)),
    "4-D log_probs": _bad(arg0=lambda lp: lp[None]),
    "empty log_probs": _bad(arg0=lambda lp: lp[:0]),
    "blank outside C": _bad(blank=4),
    "bool blank": _bad(blank=True),
    "bad reduction": _bad(reduction="avg"),
    "bad zero_infinity": _bad(zero_infinity=2),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_errors_match_the_api(case, dctorch):
    """The same exception type and message as deploy_ctc.ctc_loss on the same (bad) values as tensors."""
    import deploy_ctc

    lp, targets, il, tl, options = BAD_ARGUMENTS[case]
    with pytest.raises((TypeError, ValueError)) as expected:
        deploy_ctc.ctc_loss(lp, targets, il, tl, **options)

    def tensor(value):
        return torch.from_numpy(value) if isinstance(value, np.ndarray) else value

    with pytest.raises(type(expected.value)) as got:
        dctorch.ctc_loss(tensor(lp), tensor(targets), tensor(il), tensor(tl), **options)
    assert str(got.value) == str(expected.value)


# torch reads out of bounds on a target outside [0, C) instead of raising: no oracle for that case.
TORCH_RAISES_TOO = [case for case in BAD_ARGUMENTS if case != "target outside C"]


@pytest.mark.parametrize("case", TORCH_RAISES_TOO)
def test_errors_are_also_the_type_torch_raises(case, dctorch):
    """Where torch's own ctc_loss refuses an input with a RuntimeError (or a subclass), deploy_ctc.torch's error is
    a RuntimeError too, so code written against torch keeps catching it; where torch accepts the input, deploy_ctc
    refuses it (documented: torch reads out of bounds or silently casts there)."""
    lp, targets, il, tl, options = BAD_ARGUMENTS[case]

    def tensor(value):
        return torch.from_numpy(value) if isinstance(value, np.ndarray) else value

    args = (tensor(lp), tensor(targets), tensor(il), tensor(tl))
    try:
        torch.nn.functional.ctc_loss(*args, **options)
    except Exception as error:  # noqa: BLE001 - torch's type is the oracle, whatever it is
        torch_type = type(error)
    else:
        torch_type = None
    with pytest.raises((TypeError, ValueError)) as got:
        dctorch.ctc_loss(*args, **options)
    if torch_type is not None and issubclass(torch_type, RuntimeError):
        assert isinstance(got.value, RuntimeError), (type(got.value), torch_type)


def test_device_errors(dctorch):
    """Tensors on an unsupported device, or on a device other than the CPU and log_probs's, are refused by name
    (a 'meta' tensor stands in for a second device: this machine has no GPU)."""
    lp, targets, il, tl, _ = _good_arguments()
    lp, targets, il, tl = (torch.from_numpy(a) for a in (lp, targets, il, tl))
    with pytest.raises(ValueError, match="supports CPU and CUDA tensors, got log_probs on device meta"):
        dctorch.ctc_loss(lp.to("meta"), targets, il, tl)
    for name, index in (("targets", 1), ("input_lengths", 2), ("target_lengths", 3)):
        args = [lp, targets, il, tl]
        args[index] = args[index].to("meta")
        with pytest.raises(ValueError, match=rf"{name} must be on the CPU or on log_probs's device \(cpu\), got "
                                             r"device meta"):
            dctorch.ctc_loss(*args)


def test_critical_target_length_with_0d_lengths(rng, dctorch):
    """torch's own test_CTCLoss_critical_target_len: batched N = 1, T = S (one alignment), lengths as 0-d tensors."""
    S = C = 256
    x = torch.tensor(oracles.random_log_probs(rng, S, 1, C), requires_grad=True)
    target = torch.from_numpy(rng.permutation(np.arange(1, C))[None, :S - 1].copy())  # no repeats: feasible
    il, tl = torch.tensor(S - 1), torch.tensor(S - 1)
    loss = dctorch.ctc_loss(x[: S - 1], target, il, tl, reduction="none")
    loss.sum().backward()
    ref_loss, ref_grad = oracles.torch_reference(x.detach().numpy()[: S - 1], target.numpy(), il.numpy(), tl.numpy(),
                                                 reduction="none")
    assert np.isfinite(ref_loss).all()
    oracles.assert_close(loss.detach().numpy(), ref_loss, np.float64, "loss")
    oracles.assert_close(x.grad.numpy()[: S - 1], ref_grad, np.float64, "grad")
