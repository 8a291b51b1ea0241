"""deploy_ctc._backends.cpu.common: what both CPU backends share (here: the worker-thread count and how work is split among the threads)."""

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
    from deploy_ctc.benchmark import make_inputs

    inputs = make_inputs(200, 24, 30, 40)  # large enough to be split across threads
    threaded = deploy_ctc.ctc_loss_and_grad(*inputs, reduction="none")
    common.pool_size.cache_clear()
    monkeypatch.setenv(common.THREADS_ENV, "1")
    single = deploy_ctc.ctc_loss_and_grad(*inputs, reduction="none")
    np.testing.assert_allclose(single[0], threaded[0], rtol=1e-6)
    np.testing.assert_allclose(single[1], threaded[1], rtol=1e-6, atol=1e-9)


def test_work_is_dealt_into_balanced_parts():
    samples = np.arange(10, dtype=np.int64) * 3
    cost = np.array([100, 1, 1, 1, 50, 50, 1, 1, 1, 1])
    parts = common.deal(samples, cost, 2)
    assert sorted(np.concatenate(parts).tolist()) == samples.tolist()
    loads = [cost[np.isin(samples, part)].sum() for part in parts]
    assert max(loads) - min(loads) <= 2
    assert [p.dtype for p in parts] == [np.int64, np.int64]
    assert len(common.deal(samples, cost, 1)) == 1
