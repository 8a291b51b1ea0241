"""The CPU harness itself: barriers order shared memory, thread orders expose a missing barrier, barrier misuse
is an error, warp shuffles exchange values, and arguments are checked against the kernel's parameter types."""

import numpy as np
import pytest

from tests.utils import cuda_harness

NAMES = ("rotate_synced", "rotate_racy", "divergent_barrier", "warp_sum")
THREADS = 64


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    if cuda_harness.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the CUDA kernel harness")
    return cuda_harness.build(tmp_path_factory.mktemp("harness_selftest"), source_dir=cuda_harness.HERE / "selftest",
                              source="selftest.cu", names=NAMES)


def _rotate(library, kernel, order):
    x = np.arange(THREADS, dtype=np.float32)
    y = np.zeros(THREADS, dtype=np.float32)
    cuda_harness.Harness(library, order, seed=7).launch(kernel, (1, 1, 1), (THREADS, 1, 1), (x, y), 4 * THREADS)
    return y, np.roll(x, -1)


@pytest.mark.parametrize("order", cuda_harness.ORDERS)
def test_barrier_orders_shared_memory(library, order):
    got, expected = _rotate(library, "rotate_synced", order)
    np.testing.assert_array_equal(got, expected)


def test_some_thread_order_exposes_a_missing_barrier(library):
    # Forward order: every thread reads its successor's slot before the successor ran (unwritten: NaN).
    wrong = {order: not np.array_equal(*_rotate(library, "rotate_racy", order)) for order in cuda_harness.ORDERS}
    assert wrong["forward"] and wrong["random"], wrong


def test_barrier_not_reached_by_every_thread_is_an_error(library):
    harness = cuda_harness.Harness(library)
    with pytest.raises(RuntimeError, match="__syncthreads not reached by every thread"):
        harness.launch("divergent_barrier", (1, 1, 1), (THREADS, 1, 1), (np.zeros(THREADS, np.float32),))


@pytest.mark.parametrize("order", cuda_harness.ORDERS)
def test_warp_shuffle_butterfly_sums_each_warp(library, order):
    x = np.random.default_rng(0).standard_normal(THREADS)
    y = np.zeros(THREADS)
    cuda_harness.Harness(library, order).launch("warp_sum", (1, 1, 1), (THREADS, 1, 1), (x, y))
    np.testing.assert_allclose(y, np.repeat(x.reshape(-1, 32).sum(axis=1), 32), rtol=1e-12)


def test_arguments_are_checked_against_parameter_types(library):
    harness = cuda_harness.Harness(library)
    y = np.zeros(THREADS, np.float32)
    with pytest.raises(TypeError, match="parameter 0: array of float64 for a f\\* parameter"):
        harness.launch("rotate_synced", (1, 1, 1), (THREADS, 1, 1), (y.astype(np.float64), y))
    with pytest.raises(TypeError, match="2 arguments for 1 parameters"):
        harness.launch("divergent_barrier", (1, 1, 1), (THREADS, 1, 1), (y, y))
    with pytest.raises(TypeError, match="int is not a NumPy array or sized scalar"):
        harness.launch("divergent_barrier", (1, 1, 1), (THREADS, 1, 1), (3,))
