"""deploy_ctc._backends.cpu.workspace: scratch buffers reused between calls, bounded process-wide."""

import threading

import numpy as np

import deploy_ctc
from deploy_ctc import backends
from deploy_ctc._backends.cpu import workspace
from tests.utils import oracles


def _call_on_threads(threads, lp, targets, il, tl):
    barrier = threading.Barrier(threads)

    def one():
        barrier.wait()  # all calls in flight together: each needs its own workspace
        with backends.using("numpy"):
            deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def test_idle_threads_hold_at_most_the_pool_limit(rng, monkeypatch):
    """Sixteen threads calling at once, then idle: the cached scratch stays within the pool's limit (here lowered
    to 3 MiB; each call caches ~1 MiB), and release_workspace() frees it."""
    monkeypatch.setattr(workspace, "POOL_LIMIT_BYTES", 3 << 20)
    backends.release_workspace()
    T, N, C, S = 200, 8, 10, 20
    lp = oracles.random_log_probs(rng, T, N, C)
    tl = np.full(N, S)
    targets = oracles.random_targets(rng, tl, C)
    _call_on_threads(16, lp, targets, np.full(N, T), tl)
    assert 0 < workspace.cached_bytes() <= 3 << 20
    backends.release_workspace()
    assert workspace.cached_bytes() == 0


def test_workspace_is_reused_between_calls(rng):
    backends.release_workspace()
    lp = oracles.random_log_probs(rng, 50, 3, 6)
    targets, il, tl = np.array([[1, 2], [3, 3], [4, 5]]), np.array([50, 40, 30]), np.array([2, 2, 1])
    with backends.using("numpy"):
        first = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl)
        cached = workspace.cached_bytes()
        second = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl)
    assert cached > 0 and workspace.cached_bytes() == cached
    np.testing.assert_array_equal(first[1], second[1])
