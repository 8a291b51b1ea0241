"""deploy_ctc._backends.cpu.common: what both CPU backends share (here: the worker threads, their count and how work
is dealt among them)."""

import numpy as np
import pytest

import deploy_ctc
from deploy_ctc._backends.cpu import common


@pytest.fixture
def fresh_pool_size():
    common.pool_size.cache_clear()
    yield
    common.pool_size.cache_clear()


def test_thread_count_from_the_environment(monkeypatch, fresh_pool_size):
    monkeypatch.setenv(common.THREADS_ENV, "3")
    assert common.pool_size() == 3


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_thread_count_names_the_variable(monkeypatch, fresh_pool_size, value):
    monkeypatch.setenv(common.THREADS_ENV, value)
    with pytest.raises(ValueError, match=f"DEPLOY_CTC_NUM_THREADS must be a positive integer, got {value!r}"):
        common.pool_size()


def test_default_thread_count_is_the_usable_cpus(monkeypatch, fresh_pool_size):
    monkeypatch.delenv(common.THREADS_ENV, raising=False)
    assert 1 <= common.pool_size() <= (__import__("os").cpu_count() or 1)


def test_one_thread_gives_the_same_results(monkeypatch, fresh_pool_size):
    from benchmarks.common import make_inputs

    inputs = make_inputs(200, 24, 30, 40)  # large enough to be split across threads
    threaded = deploy_ctc.ctc_loss_and_grad(*inputs, reduction="none")
    common.pool_size.cache_clear()
    monkeypatch.setenv(common.THREADS_ENV, "1")
    single = deploy_ctc.ctc_loss_and_grad(*inputs, reduction="none")
    np.testing.assert_allclose(single[0], threaded[0], rtol=1e-6)
    np.testing.assert_allclose(single[1], threaded[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_bad_thread_count_fails_the_first_call_however_small(monkeypatch, fresh_pool_size, backend):
    monkeypatch.setenv(common.THREADS_ENV, "many")
    lp = np.log(np.full((3, 1, 4), 0.25))
    with deploy_ctc.backends.using(backend), pytest.raises(ValueError, match="DEPLOY_CTC_NUM_THREADS"):
        deploy_ctc.ctc_loss(lp, np.array([[1, 2]]), [3], [2])


def logspace_problem():
    """A batch whose (T, N, C) gradient spans several of the log-space backend's row blocks."""
    from deploy_ctc import validation
    from benchmarks.common import make_inputs

    lp, targets, il, tl = make_inputs(200, 24, 300, 20)
    return validation.validate(lp, targets, il, tl, 0, "none", False)


def test_the_log_space_backend_uses_the_shared_pool(monkeypatch, fresh_pool_size):
    """No thread pool is created per call (nor sized by os.cpu_count): the shared one runs the blocks."""
    from concurrent.futures import ThreadPoolExecutor

    from deploy_ctc._backends.cpu import logspace

    monkeypatch.setenv(common.THREADS_ENV, "2")
    common.pool.cache_clear()
    problem = logspace_problem()
    scale = np.ones(problem.log_probs.shape[1])
    shared = common.pool()
    created, used = [], []
    real_init, real_map = ThreadPoolExecutor.__init__, ThreadPoolExecutor.map
    monkeypatch.setattr(ThreadPoolExecutor, "__init__", lambda self, *a, **k: created.append(self) or
                        real_init(self, *a, **k))
    monkeypatch.setattr(ThreadPoolExecutor, "map", lambda self, *a, **k: used.append(self) or
                        real_map(self, *a, **k))
    for _ in range(3):
        logspace.forward_backward(problem, scale)
    assert created == [] and used and all(executor is shared for executor in used)
    common.pool.cache_clear()


def test_one_thread_runs_the_log_space_backend_inline(monkeypatch, fresh_pool_size):
    from deploy_ctc._backends.cpu import logspace

    monkeypatch.setenv(common.THREADS_ENV, "1")
    monkeypatch.setattr(common, "pool", lambda: pytest.fail("a pool was used with DEPLOY_CTC_NUM_THREADS=1"))
    problem = logspace_problem()
    logspace.forward_backward(problem, np.ones(problem.log_probs.shape[1]))


# Every worker thread runs a large batch that the backend would split across those same workers.
REENTRY = """
import numpy as np, deploy_ctc
from deploy_ctc._backends.cpu import common
from benchmarks.common import make_inputs
inputs = make_inputs(200, 24, 30, 40)
direct = deploy_ctc.ctc_loss_and_grad(*inputs, reduction="none")
tasks = [common.pool().submit(deploy_ctc.ctc_loss_and_grad, *inputs, reduction="none")
         for _ in range(2 * common.pool_size())]
for task in tasks:
    nll, grad = task.result()
    np.testing.assert_allclose(nll, direct[0], rtol=1e-6)
    np.testing.assert_allclose(grad, direct[1], rtol=1e-6, atol=1e-9)
print("ok")
"""


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_calls_from_inside_the_worker_threads_do_not_deadlock(backend):
    """Run in a child process, so a deadlock fails the test after a timeout instead of hanging the suite."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, common.THREADS_ENV: "2", "DEPLOY_CTC_CPU_BACKEND": backend,
           "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", REENTRY], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_work_is_dealt_into_balanced_parts():
    samples = np.arange(10, dtype=np.int64) * 3
    cost = np.array([100, 1, 1, 1, 50, 50, 1, 1, 1, 1])
    parts = common.deal(samples, cost, 2)
    assert sorted(np.concatenate(parts).tolist()) == samples.tolist()
    loads = [cost[np.isin(samples, part)].sum() for part in parts]
    assert max(loads) - min(loads) <= 2
    assert [p.dtype for p in parts] == [np.int64, np.int64]
    assert len(common.deal(samples, cost, 1)) == 1


@pytest.mark.parametrize("span", [7, 1 << 16, 1 << 40])
def test_dealing_order_is_decreasing_cost_stable_for_any_span(span):
    """Costs spanning fewer than 2^16 values are sorted through 16-bit keys: the order is still NumPy's stable
    argsort of -cost (ties in sample order), beside the 64-bit path for wider spans."""
    rng = np.random.default_rng(span)
    cost = rng.integers(0, span, 5000) + span  # many ties when the span is small
    samples = np.arange(5000, dtype=np.int64) * 2
    (order,) = common.deal(samples, cost, 1)
    np.testing.assert_array_equal(order, samples[np.argsort(-cost, kind="stable")])


def test_bad_thread_count_fails_a_small_forced_alignment(monkeypatch, fresh_pool_size):
    monkeypatch.setenv(common.THREADS_ENV, "0")
    with pytest.raises(ValueError, match="DEPLOY_CTC_NUM_THREADS must be a positive integer, got '0'"):
        deploy_ctc.forced_align(np.log(np.full((3, 4), 0.25)), np.array([1, 2]), np.array(3), np.array(2))


@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_feasibility_at_the_frames_bound(backend):
    """start() skips the repeat count when every sample has 2 S - 1 frames; at and below that bound the losses stay
    torch's (+inf where a target needs more frames than the sample has, zero_infinity's 0, and their gradient rows)."""
    torch = pytest.importorskip("torch", reason="torch (the test extra) is the float64 oracle")
    rng = np.random.default_rng(5)
    T, C, S = 7, 4, 4
    targets = np.array([[1, 1, 1, 1], [1, 2, 1, 2], [2, 2, 3, 3], [3, 0, 0, 0]])
    tl = np.array([4, 4, 4, 1])
    for il in (np.full(4, 2 * S - 1), np.array([7, 4, 5, 1]), np.array([6, 3, 6, 0])):
        lp = np.log(rng.dirichlet(np.ones(C), size=(T, 4)))
        for zero_infinity in (False, True):
            with deploy_ctc.backends.using(backend):
                loss, grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, reduction="sum",
                                                          zero_infinity=zero_infinity)
            x = torch.from_numpy(lp).requires_grad_()
            expected = torch.nn.functional.ctc_loss(x, torch.as_tensor(targets), torch.as_tensor(il),
                                                    torch.as_tensor(tl), reduction="sum", zero_infinity=zero_infinity)
            expected.backward()
            np.testing.assert_allclose(loss, expected.item(), rtol=1e-12)
            np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-10, atol=1e-12)
