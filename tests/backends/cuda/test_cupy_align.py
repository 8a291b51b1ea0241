"""The CUDA forced-alignment kernel (ctc_align in kernels/ctc.cu) on the CPU harness, under the three thread orders,
against the NumPy reference (itself checked against brute force in tests/test_align.py) and brute force.

The harness runs the unmodified kernel on the CPU; the GPU test runs it through CuPy where a GPU is present.
"""

import numpy as np
import pytest

from deploy_ctc import validation
from deploy_ctc._backends.cpu import align_numpy
from deploy_ctc._backends.cuda import cupy_align
from tests.backends.cuda.test_cupy_kernels import requires_gpu
from tests.utils import cuda_harness, oracles


@pytest.fixture(scope="module")
def harness_library(tmp_path_factory):
    if cuda_harness.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the CUDA kernel harness")
    return cuda_harness.build(tmp_path_factory.mktemp("cuda_harness"), sanitize=cuda_harness.sanitize_requested())


@pytest.fixture(params=tuple(cuda_harness.ORDERS))
def harness(request, harness_library):
    return cuda_harness.Harness(harness_library, order=request.param, seed=99)


def _case(rng, T, N, C, S, blank, dtype, ties=False):
    lp = (-rng.choice([0.5, 1.0, 2.0], size=(T, N, C)) if ties
          else oracles.random_log_probs(rng, T, N, C, dtype=np.float64, scale=3.0)).astype(dtype)
    tl = rng.integers(0, S + 1, size=N)
    targets = oracles.random_targets(rng, tl, C, blank=blank, S=S, repeat_prob=0.4)
    il = rng.integers(0, T + 1, size=N)
    return lp, targets, il, tl


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_matches_the_numpy_reference(harness, rng, dtype, ties):
    lp, targets, il, tl = _case(rng, T=14, N=6, C=5, S=5, blank=1, dtype=dtype, ties=ties)
    lp[3, 0, 2] = np.nan
    lp[5, 1, 3] = np.inf
    problem = validation.validate(lp, targets, il, tl, blank=1)
    got = cupy_align.run_align(problem, harness)
    expected = align_numpy.forced_align(problem)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_kernel_matches_brute_force_and_uses_global_rows_for_long_targets(harness, rng):
    # S = 1600: two delta rows of 3201 doubles exceed the shared-memory budget, so the global-row path runs.
    T, C = 6, 3
    lp = oracles.random_log_probs(rng, T, 2, C, scale=2.0)
    targets = np.zeros((2, 1600), dtype=np.int64)
    targets[0, :3] = [1, 2, 2]
    targets[1, :1600] = 1 + np.arange(1600) % 2
    tl = np.array([3, 1600])
    problem = validation.validate(lp, targets, [T, T], tl)
    alignment, scores = cupy_align.run_align(problem, harness)
    path, best = oracles.brute_force_alignment(lp[:, 0], [1, 2, 2])
    np.testing.assert_array_equal(alignment[:, 0], path)
    assert sum(float(v) for v in scores[:, 0]) == best
    np.testing.assert_array_equal(alignment[:, 1], 0)  # infeasible: 1600 labels in 6 frames
    np.testing.assert_array_equal(scores[:, 1], -np.inf)


def test_every_front_end_returns_the_same_alignment(harness_library, rng):
    """NumPy (pure and native), the CUDA kernel (CPU harness), the ONNX portable body in plain onnxruntime, the native
    ONNX Runtime library and the torch adapter, on one batch with exact ties, repeats, NaN, an infeasible sample and
    short inputs."""
    from deploy_ctc import backends, forced_align

    lp, targets, il, tl = _case(rng, T=12, N=8, C=5, S=5, blank=0, dtype=np.float32, ties=True)
    lp[2, 3, 1] = np.nan
    il[0], tl[0], targets[0] = 3, 5, [1, 2, 3, 4, 1]  # infeasible
    results = {}
    for choice in ("numpy", "native"):
        with backends.using(choice):
            results[choice] = forced_align(lp, targets, il, tl)
    problem = validation.validate(lp, targets, il, tl)
    results["cuda_kernel"] = cupy_align.run_align(problem, cuda_harness.Harness(harness_library, order="random"))
    try:
        import deploy_ctc.onnx as dco
        import onnxruntime as ort

        session = ort.InferenceSession(dco.forced_align_model("float32").SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        feeds = {"log_probs": lp, "targets": targets, "input_lengths": il.astype(np.int64),
                 "target_lengths": tl.astype(np.int64)}
        results["onnx"] = tuple(session.run(["alignment", "scores"], feeds))
        dco.library_path()  # the native custom-op library, where it builds (else NativeUnavailable)
        native = ort.InferenceSession(dco.forced_align_model("float32", embed_functions=False).SerializeToString(),
                                      dco.session_options(), providers=["CPUExecutionProvider"])
        results["onnx_native_library"] = tuple(native.run(["alignment", "scores"], feeds))
    except (ImportError, RuntimeError):  # no onnx, or no native library here (NativeUnavailable)
        pass
    try:
        import torch

        import deploy_ctc.torch as dt

        got = dt.forced_align(torch.from_numpy(lp).transpose(0, 1), torch.from_numpy(targets),
                              torch.from_numpy(il), torch.from_numpy(tl))
        results["torch"] = (got[0].numpy().T, got[1].numpy().T)
    except ImportError:
        pass
    reference = results.pop("numpy")
    assert np.isneginf(reference[1][:3, 0]).all()
    for name, (alignment, scores) in results.items():
        np.testing.assert_array_equal(alignment, reference[0], err_msg=name)
        np.testing.assert_array_equal(scores, reference[1], err_msg=name)


@requires_gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_matches_the_numpy_reference(rng, dtype):
    import cupy

    from deploy_ctc import backends, forced_align

    lp, targets, il, tl = _case(rng, T=300, N=9, C=40, S=60, blank=0, dtype=dtype)
    with backends.using("numpy"):
        expected = forced_align(lp, targets, il, tl)
    alignment, scores = forced_align(cupy.asarray(lp), cupy.asarray(targets), il, tl)
    assert isinstance(alignment, cupy.ndarray) and scores.dtype == dtype
    np.testing.assert_array_equal(alignment.get(), expected[0])
    np.testing.assert_array_equal(scores.get(), expected[1])
