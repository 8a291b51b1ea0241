"""kernels/ctc_launch.cu, the launch code of the ONNX Runtime library's CUDA ops, run on the CPU harness.

The same host code as the GPU build (workspace layout, the one upload, launch plan, the small kernels of its own) with
the kernels of ctc.cu on fibers under forward, reverse and random thread orders, on workspaces and outputs poisoned
with NaN bytes. Oracles: torch float64 (loss and gradient; float32 log-probs are computed in float32, as on the GPU)
and deploy_ctc.forced_align (alignments, exact).
"""

from __future__ import annotations

import numpy as np
import pytest

import deploy_ctc
from tests.utils import cuda_harness
from tests.utils.cuda_harness.launch import LaunchHarness, build_launch
from tests.utils.oracles import FLOAT32_COMPUTE, assert_close, random_log_probs, random_targets, torch_reference

ORDERS = tuple(cuda_harness.ORDERS)


@pytest.fixture(scope="module")
def launch_library(tmp_path_factory):
    if cuda_harness.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the CUDA kernel harness")
    return build_launch(tmp_path_factory.mktemp("ctc_launch"), sanitize=cuda_harness.sanitize_requested())


@pytest.fixture(params=ORDERS)
def harness(request, launch_library):
    return LaunchHarness(launch_library, order=request.param, seed=99)


def problem(rng, T, N, C, S, dtype, blank):
    tl = rng.integers(0, S + 1, N)
    tl[0] = S
    il = rng.integers(np.minimum(2 * tl + 1, T), T + 1)
    il[-1] = min(int(il[-1]), 1)  # infeasible unless its target is empty (or empty input)
    return random_log_probs(rng, T, N, C, dtype), random_targets(rng, tl, C, blank, S, 0.3), il, tl


def tolerance(dtype):
    return FLOAT32_COMPUTE if dtype == np.float32 else None  # the kernels compute in the input's float type


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_gradient_match_torch(harness, rng, dtype, reduction):
    lp, targets, il, tl = problem(rng, T=12, N=5, C=6, S=4, dtype=dtype, blank=2)
    attrs = dict(blank=2, reduction=reduction, zero_infinity=bool(rng.integers(2)))
    d_loss = rng.uniform(0.5, 2.0, (5,) if reduction == "none" else ()).astype(dtype)
    loss = harness.run(lp, targets, il, tl, **attrs)
    assert harness.launches[-1] == "1x1 256 0"  # reduce_losses after the loss-only lattice
    grad = harness.run(lp, targets, il, tl, **attrs, d_loss=d_loss)
    want_loss, want_grad = torch_reference(lp, targets, il, tl, **attrs, grad_output=d_loss)
    assert_close(loss, want_loss, dtype, "loss", tolerance(dtype))
    assert_close(grad, want_grad, dtype, "grad", tolerance(dtype))  # every element: the outputs start as NaN


def test_scalar_d_loss_broadcasts_and_empty_targets(launch_library, rng):
    """A scalar d_loss with reduction none; all targets empty (S = 0: no label links launch)."""
    harness = LaunchHarness(launch_library, "random", seed=5)
    lp = random_log_probs(rng, 7, 3, 4, np.float64)
    targets, il, tl = np.zeros((3, 0), np.int64), np.array([7, 3, 0]), np.zeros(3, np.int64)
    grad = harness.run(lp, targets, il, tl, reduction="none", d_loss=np.array(1.5))
    assert not any(launch.startswith("1x3 128") for launch in harness.launches)  # ctc_label_links skipped
    _, want_grad = torch_reference(lp, targets, il, tl, reduction="none", grad_output=np.full(3, 1.5))
    assert_close(grad, want_grad, np.float64, "grad")


def test_long_targets_take_the_global_memory_path(launch_library, rng):
    """2 (2S + 1) doubles above 48 KiB: the lattice reads its previous row from the table, as in cupy_kernels (float
    switches at twice that length, the same code)."""
    dtype, S = np.float64, 1550
    T, C = S + 40, 5
    lp = random_log_probs(rng, T, 1, C, dtype)
    targets = (np.arange(S) % (C - 1) + 1)[None]  # no repeats: feasible with T >= S
    harness = LaunchHarness(launch_library)
    loss = harness.run(lp, targets, [T], [S], reduction="none")
    lattice = harness.launches[0].split()
    assert int(lattice[2]) < 2 * (2 * S + 1) * lp.itemsize  # not both rows in shared memory
    want_loss, _ = torch_reference(lp, targets, [T], [S], reduction="none")
    assert_close(loss, want_loss, dtype, "loss", tolerance(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("long_targets", [False, True], ids=["rows-in-shared", "rows-in-workspace"])
def test_alignment_equals_forced_align(launch_library, rng, dtype, long_targets):
    T, N, C, S = (1600, 2, 5, 1550) if long_targets else (14, 6, 6, 5)  # 2 (2S + 1) doubles above 48 KiB
    lp = (-rng.choice([0.5, 1.0, 2.0], size=(T, N, C))).astype(dtype)  # exact ties
    targets = rng.choice([0, 1, 3, 4], size=(N, S))
    il, tl = rng.integers(0, T + 1, size=N), rng.integers(0, S + 1, size=N)
    il[0], tl[0] = T, S
    if long_targets:
        targets[0] = np.arange(S) % 4 + (np.arange(S) % 4 >= 2)  # no repeats (labels 0, 1, 3, 4): feasible
    for order in ORDERS if not long_targets else ("forward",):
        alignment, scores = LaunchHarness(launch_library, order, seed=11).align(lp, targets, il, tl, blank=2)
        want_alignment, want_scores = deploy_ctc.forced_align(lp, targets, il, tl, blank=2)
        np.testing.assert_array_equal(alignment, want_alignment)
        np.testing.assert_array_equal(scores, want_scores)


def test_capture_is_refused(launch_library):
    harness = LaunchHarness(launch_library)
    assert harness.capture_problem(False) == ""
    assert "cannot be captured in a CUDA graph" in harness.capture_problem(True)


def test_sizes_beyond_the_kernels_get_no_workspace(launch_library):
    harness = LaunchHarness(launch_library)
    assert harness.workspace_bytes("grad", 10, 3, 5, 2, 4) > 0
    assert harness.workspace_bytes("grad", 2**31, 1, 5, 2, 4) == 0  # T is an int in the kernels
    assert harness.workspace_bytes("loss", 10, 2**30, 5, 2, 4) == 0  # the lattice grid has 2N + 2048 blocks
    assert harness.workspace_bytes("loss", 2**30, 2**29, 5, 2**30, 8) == 0  # alpha alone above 2^62 bytes
