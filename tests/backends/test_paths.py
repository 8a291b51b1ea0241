"""deploy_ctc.backends.path_stats: which samples the CPU backends finish on the fast scaled recursions and which
they redo exactly in log space.

A defect in the fast recursions gives correct numbers through the exact redo, only slower, so the numerical tests
cannot see it: these tests pin the path. Ordinary inputs (random outputs up to T = 2000 frames and 100 labels,
outputs confident in their targets at any length tested) must finish on the fast path on both backends and through
every front end (the API, deploy_ctc.torch; the native ONNX Runtime library runs the same engine outside Python,
unrecorded); NaN log-probs must be redone, and peaky outputs that disagree with their targets too on the pure-NumPy
backend (the native engine keeps them exact with per-position exponents). The oracle for "must be redone" is the
construction of the input (alpha's and beta's mass on disjoint positions; NaN), not the backends' own check.
"""

import numpy as np
import pytest

import deploy_ctc
from deploy_ctc._backends import cpu as cpu_backends
from deploy_ctc._backends import paths
from deploy_ctc._backends.cpu import common
from deploy_ctc.backends import path_stats, using
from tests.utils import oracles


@pytest.fixture(params=["native", "numpy"])
def backend(request):
    """The name of a CPU backend, selected for the test (native only where the engine builds)."""
    if request.param == "native" and cpu_backends.name() != "native":
        pytest.skip("the native engine cannot be built here (no C++ compiler)")
    with using(request.param):
        yield request.param


def random_batch(rng, T, N, C, S, aligned=False, full=False):
    """:func:`tests.utils.oracles.random_batch`: random log-probs, or confident along each target with ``aligned``."""
    return oracles.random_batch(rng, T, N, C, S, full=full, aligned=aligned)


def run_paths(lp, targets, il, tl, with_grad=True):
    with path_stats() as stats:
        if with_grad:
            deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, reduction="none")
        else:
            deploy_ctc.ctc_loss(lp, targets, il, tl, reduction="none")
    return stats


def assert_all_fast(stats, backend, samples):
    assert [record.backend for record in stats.records] == [backend]
    record = stats.records[0]
    assert record.exact == (), f"samples {record.exact} left the fast path"
    assert record.samples == record.fast == samples


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("T,N,C,S,aligned", [
    (50, 16, 20, 30, False),  # the benchmark's smallest shape
    (400, 6, 100, 80, False),
    (2000, 2, 5, 100, False),  # long random outputs: the end of the range the fast path is documented for
    (3000, 2, 10, 150, True),  # a long utterance of a model confident in its transcript
    (300, 8, 30, 40, True),
])
def test_ordinary_inputs_take_the_fast_path(rng, backend, T, N, C, S, aligned, with_grad):
    lp, targets, il, tl = random_batch(rng, T, N, C, S, aligned)
    assert_all_fast(run_paths(lp, targets, il, tl, with_grad), backend, N)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_peaky_outputs_disagreeing_with_the_target(rng, backend, dtype):
    """Samples 1 and 3 are confident (log_softmax(30 randn)) in random labels over 300 frames: alpha's and beta's
    mass end up on different positions, which per-frame scales cannot represent. The native engine keeps them exact
    with per-position exponents (no log-space redo); the pure-NumPy backend redoes them in log space."""
    lp, targets, il, tl = random_batch(rng, 300, 5, 5, 40, full=True)
    lp[:, [1, 3]] = oracles.random_log_probs(rng, 300, 2, 5, scale=30.0)
    lp = lp.astype(dtype)
    stats = run_paths(lp, targets, il, tl)
    redone = (1, 3) if backend == "numpy" else ()
    assert [(record.backend, record.samples, record.exact) for record in stats.records] == [(backend, 5, redone)]
    loss, grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, reduction="none")  # and still right
    ref_loss, ref_grad = oracles.torch_reference(lp, targets, il, tl, reduction="none")
    oracles.assert_close(loss, ref_loss, dtype, "loss")
    oracles.assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("poison", ["NaN label", "all -inf frame"])
def test_nan_and_dead_frames_are_redone_alone(rng, backend, poison, with_grad):
    """Sample 2 has no finite fast result; its neighbours in the batch must keep theirs."""
    lp, targets, il, tl = random_batch(rng, 20, 4, 6, 5)
    if poison == "NaN label":
        lp[7, 2, targets[2, 0]] = np.nan
    else:
        lp[7, 2, :] = -np.inf
    stats = run_paths(lp, targets, il, tl, with_grad)
    assert [(record.samples, record.exact) for record in stats.records] == [(4, (2,))]


def test_samples_without_recursions_are_not_counted(rng, backend):
    """Infeasible targets and zero-length inputs are settled before the recursions: neither path."""
    lp, targets, il, tl = random_batch(rng, 12, 4, 5, 4, full=True)
    il[1], il[3], tl[3] = 3, 0, 0
    stats = run_paths(lp, targets, il, tl)
    assert [(record.samples, record.exact) for record in stats.records] == [(2, ())]


def test_large_batches_are_split_across_threads(rng, backend, monkeypatch):
    """Work above each backend's threshold is handed to the worker threads in several parts (and stays fast)."""
    monkeypatch.setattr(common, "pool_size", lambda: 3)
    lp, targets, il, tl = random_batch(rng, 300, 24, 40, 30)
    stats = run_paths(lp, targets, il, tl)
    assert_all_fast(stats, backend, 24)
    assert stats.records[0].parts >= 2


def test_small_batches_stay_on_the_calling_thread(rng, backend):
    stats = run_paths(*random_batch(rng, 10, 2, 4, 3))
    assert stats.records[0].parts == 1


def test_nothing_is_recorded_outside_a_block(rng, monkeypatch):
    entries = []
    monkeypatch.setattr(paths, "PathRecord", lambda *args: entries.append(args))
    deploy_ctc.ctc_loss(*random_batch(rng, 10, 2, 4, 3))
    assert entries == []


def test_nested_blocks_each_see_the_calls_made_inside_them(rng):
    batch = random_batch(rng, 10, 2, 4, 3)
    with path_stats() as outer:
        deploy_ctc.ctc_loss(*batch)
        with path_stats() as inner:
            deploy_ctc.ctc_loss(*batch)
    deploy_ctc.ctc_loss(*batch)
    assert len(outer.records) == 2 and len(inner.records) == 1
    assert outer.fast == 4 and inner.fast == 2 and outer.exact == inner.exact == 0


def test_torch_adapter_takes_the_backends_paths(rng, backend):
    torch = pytest.importorskip("torch", reason="deploy_ctc.torch needs torch (the test extra)")
    import deploy_ctc.torch as dctorch

    lp, targets, il, tl = random_batch(rng, 200, 4, 6, 20, full=True)
    lp[:, 2] = oracles.random_log_probs(rng, 200, 1, 6, scale=30.0)[:, 0]
    x = torch.tensor(lp, requires_grad=True)
    with path_stats() as stats:
        dctorch.ctc_loss(x, *(torch.as_tensor(a) for a in (targets, il, tl)), reduction="sum").backward()
    redone = (2,) if backend == "numpy" else ()  # the engine keeps the peaky sample exact itself
    assert [(record.backend, record.samples, record.exact) for record in stats.records] == [(backend, 4, redone)]
