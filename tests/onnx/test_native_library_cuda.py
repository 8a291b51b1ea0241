"""The CUDA build of deploy_ctc's ONNX Runtime library (kernels/ort_cuda_ops.cpp, kernels/ctc_launch.cu).

Without a GPU (CI): the device code compiles for sm_80 and sm_90 with no spills and no stack frame, the library
exports only RegisterCustomOps and needs neither libcudart nor libcuda to load, and in a CPU-only session it serves
the CPU ops bit for bit as deploy_ctc.ctc_loss (its CUDA kernels, registered for an absent provider, stay unused).
The CUDA ops' host code also runs whole in a CPU session: built for the CPU provider with its launches on the CPU
harness (tests/utils/cuda_harness), against torch float64 and forced_align.
With a GPU and onnxruntime's CUDAExecutionProvider: the CUDA loss and gradient against torch float64, the CUDA
alignment against the Python API, and bad input as an error status.
"""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import deploy_ctc  # noqa: E402
import deploy_ctc.onnx  # noqa: E402
from deploy_ctc._backends.kernel_sources import kernel_sources_dir  # noqa: E402
from deploy_ctc.onnx import native_library  # noqa: E402
from deploy_ctc.onnx import native_library_cuda as cuda_build  # noqa: E402
from tests.onnx.helpers import make_problem, native_library_or_skip, node_model  # noqa: E402
from tests.utils import cuda_harness  # noqa: E402
from tests.utils.cuda_harness.launch import build_ort_library  # noqa: E402
from tests.utils.gpu import gpu_count  # noqa: E402
from tests.utils.oracles import FLOAT32_COMPUTE, assert_close, torch_reference  # noqa: E402

#: Threads per block the launch code (ctc_launch.cu) gives each kernel at most: registers x threads must fit the
#: 65536-register file of sm_80 / sm_90.
MAX_THREADS = {"ctc_lattice": 512, "ctc_grad": 256, "ctc_label_links": 128, "ctc_align": 512, "reduce_losses": 256,
               "gradient_weights": 256, "fill_alignment": 256}
#: The instantiations the library launches, as they appear in mangled names.
ENTRIES = ("ctc_latticeIf", "ctc_latticeId", "ctc_gradIf", "ctc_gradId", "ctc_label_links", "ctc_alignIf",
           "ctc_alignId", "reduce_lossesIf", "reduce_lossesId", "gradient_weightsIf", "gradient_weightsId",
           "fill_alignmentIf", "fill_alignmentId")


@pytest.fixture(scope="module")
def cuda_library() -> str:
    try:
        return native_library.library_path(cuda=True)
    except native_library.NativeUnavailable as error:
        pytest.skip(f"the CUDA ONNX Runtime library cannot be built here: {error}")


def session(library: str, model, providers=("CPUExecutionProvider",), profile=False):
    so = ort.SessionOptions()
    so.register_custom_ops_library(library)
    so.enable_profiling = profile
    return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))


def feeds_of(lp, targets, il, tl, int_dtype=np.int64) -> dict:
    return {"log_probs": lp, "targets": np.asarray(targets, int_dtype),
            "input_lengths": np.asarray(il, int_dtype), "target_lengths": np.asarray(tl, int_dtype)}


# ----------------------------------------------------------------------------------------------------------
# Without a GPU
# ----------------------------------------------------------------------------------------------------------
def test_device_code_has_no_spills_and_no_stack_frame(cuda_library, tmp_path):
    """ptxas's report for ctc_launch.cu under the library's own flags, for both architectures."""
    nvcc = cuda_build.find_nvcc()
    kernels = kernel_sources_dir()
    command = [nvcc, *cuda_build.compile_flags(native_library.FLAGS), *cuda_build.toolkit_flags(nvcc),
               f"-I{kernels}", "-Xptxas", "-v", "-c", str(kernels / "ctc_launch.cu"), "-o", str(tmp_path / "launch.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "warning" not in report.lower(), report
    entries = {}  # (mangled name, arch) -> [stack, spill stores, spill loads, registers]
    current = None
    for line in report.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line):
            current = (match.group(1), match.group(2))
            entries[current] = []
        elif match := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            entries[current] += [int(v) for v in match.groups()]
        elif match := re.search(r"Used (\d+) registers", line):
            entries[current].append(int(match.group(1)))
    for arch in cuda_build.ARCHITECTURES:
        names = [name for name, a in entries if a == arch]
        for entry in ENTRIES:
            assert any(entry in name for name in names), f"sm_{arch}: no {entry} in {names}"
    for (name, arch), (stack, stores, loads, registers) in entries.items():
        assert (stack, stores, loads) == (0, 0, 0), f"{name} sm_{arch}: stack {stack}, spills {stores}/{loads}"
        threads = next(t for kernel, t in MAX_THREADS.items() if kernel in name)
        assert registers * threads <= 65536, f"{name} sm_{arch}: {registers} registers x {threads} threads"
        print(f"sm_{arch} {name}: {registers} registers")


def test_exports_only_register_custom_ops(cuda_library):
    symbols = subprocess.run(["readelf", "--dyn-syms", "--wide", cuda_library], capture_output=True, text=True,
                             check=True).stdout
    # Symbol table rows: Num: Value Size Type Bind Vis Ndx Name; defined = Ndx other than UND.
    defined = [row.split()[7] for row in symbols.splitlines()
               if len(row.split()) >= 8 and row.split()[0].endswith(":") and row.split()[6] != "UND"
               and row.split()[4] in ("GLOBAL", "WEAK")]
    assert defined == ["RegisterCustomOps"]


def test_needs_no_cuda_library_at_load_time(cuda_library):
    """The CUDA runtime is linked statically and libcuda is opened only when a kernel first runs."""
    dynamic = subprocess.run(["readelf", "-d", cuda_library], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    assert needed, dynamic
    for name in needed:
        assert re.match(r"(libstdc\+\+|libm|libgcc_s|libc|ld-linux[-\w]*|libdl|libpthread|librt)\.so", name), needed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("int_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("layout", ["padded", "concatenated"])
def test_cpu_session_serves_the_cpu_ops_as_the_python_api(cuda_library, rng, dtype, int_dtype, layout):
    p = make_problem(rng, T=20, N=4, C=6, S=5, dtype=dtype, blank=2)
    p.input_lengths[-1] = 1  # infeasible unless its target is empty
    lp, targets, il, tl = p.args(layout)
    feeds = feeds_of(lp, targets, il, tl, int_dtype)
    attrs = dict(blank=2, reduction="none", zero_infinity=1)
    loss = session(cuda_library, node_model("CTCLoss", feeds, **attrs)).run(None, feeds)[0]
    d_loss = rng.uniform(0.5, 2.0, 4).astype(dtype)
    grad_feeds = {"d_loss": d_loss, **feeds}
    grad = session(cuda_library, node_model("CTCLossGrad", grad_feeds, **attrs)).run(None, grad_feeds)[0]
    np.testing.assert_array_equal(loss, deploy_ctc.ctc_loss(lp, targets, il, tl, **attrs))
    _, want_grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, **attrs, grad_output=d_loss)
    np.testing.assert_array_equal(grad, want_grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_session_serves_the_cpu_alignment_as_the_python_api(cuda_library, rng, dtype):
    p = make_problem(rng, T=20, N=4, C=6, S=5, dtype=dtype, blank=2)
    p.input_lengths[-1] = 1  # infeasible unless its target is empty: all blank, -inf scores
    feeds = p.feeds(np.int32)
    alignment, scores = session(cuda_library, node_model("CTCAlign", feeds, blank=2)).run(None, feeds)
    want_alignment, want_scores = deploy_ctc.forced_align(*p.args(), blank=2)
    np.testing.assert_array_equal(alignment, want_alignment)
    np.testing.assert_array_equal(scores, want_scores)


def test_cpu_session_reports_invalid_input(cuda_library, rng):
    p = make_problem(rng, T=10, N=2, C=5, S=3, blank=0)
    feeds = p.feeds()
    feeds["targets"][1, 0] = 0
    feeds["target_lengths"][1] = max(int(feeds["target_lengths"][1]), 1)
    with pytest.raises(Exception, match=r"targets\[1, 0\] = 0 equals blank=0"):
        session(cuda_library, node_model("CTCLoss", feeds)).run(None, feeds)


class RecordingOptions:
    """Stands in for onnxruntime.SessionOptions: records the libraries registered on it."""

    def __init__(self):
        self.libraries = []

    def register_custom_ops_library(self, path):
        self.libraries.append(path)


def test_session_options_registers_the_cuda_library(cuda_library):
    so = deploy_ctc.onnx.session_options(RecordingOptions(), cuda=True)
    deploy_ctc.onnx.session_options(so, cuda=True)  # once per SessionOptions
    assert so.libraries == [cuda_library]


def test_session_options_falls_back_to_the_cpu_library(monkeypatch, rng):
    from deploy_ctc.onnx import runtime

    cpu_library = native_library_or_skip()
    monkeypatch.setattr(native_library, "_failures", {True: native_library.NativeUnavailable("no nvcc here")})
    monkeypatch.setattr(runtime, "_warned", set())
    expected = r"CUDA build .* unavailable \(no nvcc here\); the CPU library is registered"
    with pytest.warns(RuntimeWarning, match=expected):
        so = deploy_ctc.onnx.session_options(RecordingOptions(), cuda=True)
    assert so.libraries == [cpu_library]


def test_missing_nvcc_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_build.NVCC_ENV, str(tmp_path / "nvcc"))
    with pytest.raises(native_library.NativeUnavailable, match=f"{cuda_build.NVCC_ENV}=.*not an executable file"):
        cuda_build.find_nvcc()
    monkeypatch.delenv(cuda_build.NVCC_ENV)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cuda_build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(native_library.NativeUnavailable, match=r"nvcc was not found .*deploy_ctc\[ort-cuda\]"):
        cuda_build.find_nvcc()


def test_missing_cuda_runtime_is_named(tmp_path):
    """An nvcc whose toolkit has neither the runtime's header nor its static library: both are named."""
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '#$ TOP={tmp_path}'\n")
    fake.chmod(0o700)
    with pytest.raises(native_library.NativeUnavailable, match=r"lacks cuda_runtime.h .* and libcudart_static.a"):
        cuda_build.toolkit_flags(str(fake))


# ----------------------------------------------------------------------------------------------------------
# The CUDA ops' host code in a CPU session: built for the CPU provider, launches on the CPU harness
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ops_on_cpu(tmp_path_factory) -> str:
    if cuda_harness.compiler() is None:
        pytest.skip("no C++ compiler (g++ or $CXX) to build the CUDA kernel harness")
    try:
        include = native_library.include_dir()
    except native_library.NativeUnavailable as error:
        pytest.skip(f"the native ONNX Runtime library is unavailable here: {error}")
    return str(build_ort_library(tmp_path_factory.mktemp("ort_on_cpu"), include))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("int_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("layout", ["padded", "concatenated", "unbatched"])
def test_cuda_ops_host_code_matches_torch(ops_on_cpu, rng, dtype, int_dtype, layout):
    """ort_cuda_ops.cpp end to end in a session (validation, upload block, workspace from the session's allocator,
    output shapes, the three reductions) with ctc_launch.cu's launches on the harness; outputs of any element left
    unwritten would hold the arena's leftovers."""
    p = make_problem(rng, T=14, N=1 if layout == "unbatched" else 4, C=6, S=4, dtype=dtype, blank=1)
    p.input_lengths[-1] = 1  # infeasible unless its target is empty
    lp, targets, il, tl = p.args(layout)
    feeds = feeds_of(lp, targets, il, tl, int_dtype)
    for reduction in ("none", "mean", "sum"):
        attrs = dict(blank=1, reduction=reduction, zero_infinity=bool(rng.integers(2)))
        d_loss = rng.uniform(0.5, 2.0, np.shape(deploy_ctc.ctc_loss(lp, targets, il, tl, **attrs))).astype(dtype)
        loss = session(ops_on_cpu, node_model("CTCLoss", feeds, **attrs)).run(None, feeds)[0]
        grad_feeds = {"d_loss": d_loss, **feeds}
        grad = session(ops_on_cpu, node_model("CTCLossGrad", grad_feeds, **attrs)).run(None, grad_feeds)[0]
        want_loss, want_grad = torch_reference(lp, targets, il, tl, **attrs, grad_output=d_loss)
        tol = FLOAT32_COMPUTE if dtype == np.float32 else None  # the kernels compute in the input's float type
        assert loss.dtype == dtype and grad.dtype == dtype
        assert_close(loss, want_loss, dtype, f"loss ({reduction})", tol)
        assert_close(grad, want_grad, dtype, f"grad ({reduction})", tol)
    alignment, scores = session(ops_on_cpu, node_model("CTCAlign", feeds, blank=1)).run(None, feeds)
    want_alignment, want_scores = deploy_ctc.forced_align(lp, targets, il, tl, blank=1)
    np.testing.assert_array_equal(alignment, want_alignment)
    np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("op", ["CTCLoss", "CTCLossGrad", "CTCAlign"])
def test_cuda_ops_report_invalid_input(ops_on_cpu, rng, op):
    feeds = make_problem(rng, T=10, N=2, C=5, S=3, blank=0).feeds()
    feeds["input_lengths"][0] = 11
    if op == "CTCLossGrad":
        feeds = {"d_loss": np.array(1.0, np.float32), **feeds}
    with pytest.raises(Exception, match=rf"deploy_ctc::{op}: input_lengths\[0\] = 11 exceeds T=10"):
        session(ops_on_cpu, node_model(op, feeds)).run(None, feeds)


def test_cuda_ops_report_a_d_loss_of_the_wrong_shape(ops_on_cpu, rng):
    feeds = {"d_loss": np.ones(3, np.float32), **make_problem(rng, T=10, N=2, C=5, S=3).feeds()}
    with pytest.raises(Exception, match=r"d_loss must be a scalar or have the loss's shape \(2,\), got shape \(3,\)"):
        session(ops_on_cpu, node_model("CTCLossGrad", feeds, reduction="none")).run(None, feeds)


# ----------------------------------------------------------------------------------------------------------
# On a GPU (skipped without one)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_provider(cuda_library):
    if gpu_count() == 0 or "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs a GPU and onnxruntime's CUDAExecutionProvider")
    return cuda_library


def run_on_cuda(library, op, feeds, **attrs):
    """The outputs of one ``op`` node on CUDAExecutionProvider, after checking from the profile that it ran there."""
    s = session(library, node_model(op, feeds, **attrs), ("CUDAExecutionProvider", "CPUExecutionProvider"),
                profile=True)
    out = s.run(None, feeds)
    with open(s.end_profiling()) as file:
        events = json.load(file)
    providers = {e["args"].get("provider") for e in events if e.get("args", {}).get("op_name") == op}
    assert providers == {"CUDAExecutionProvider"}, providers
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("int_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("layout", ["padded", "concatenated", "unbatched"])
def test_cuda_provider_matches_torch(cuda_provider, rng, dtype, int_dtype, reduction, layout):
    p = make_problem(rng, T=30, N=1 if layout == "unbatched" else 5, C=7, S=6, dtype=dtype, blank=1)
    p.input_lengths[-1] = 1  # infeasible unless its target is empty: +inf, 0 under zero_infinity
    lp, targets, il, tl = p.args(layout)
    attrs = dict(blank=1, reduction=reduction, zero_infinity=bool(rng.integers(2)))
    feeds = feeds_of(lp, targets, il, tl, int_dtype)
    loss_shape = np.shape(deploy_ctc.ctc_loss(lp, targets, il, tl, **attrs))
    d_loss = rng.uniform(0.5, 2.0, loss_shape).astype(dtype)
    (loss,) = run_on_cuda(cuda_provider, "CTCLoss", feeds, **attrs)
    (grad,) = run_on_cuda(cuda_provider, "CTCLossGrad", {"d_loss": d_loss, **feeds}, **attrs)
    want_loss, want_grad = torch_reference(lp, targets, il, tl, **attrs, grad_output=d_loss)
    tol = FLOAT32_COMPUTE if dtype == np.float32 else None  # the kernels compute in the input's float type
    assert loss.dtype == dtype and grad.dtype == dtype
    assert_close(loss, want_loss, dtype, "loss", tol)
    assert_close(grad, want_grad, dtype, "grad", tol)  # every element: rows beyond input_lengths are 0


def test_cuda_provider_reports_invalid_input(cuda_provider, rng):
    feeds = make_problem(rng, T=10, N=2, C=5, S=3, blank=0).feeds()
    feeds["input_lengths"][0] = 11
    with pytest.raises(Exception, match=r"input_lengths\[0\] = 11 exceeds T=10"):
        run_on_cuda(cuda_provider, "CTCLoss", feeds)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("long_targets", [False, True], ids=["rows-in-shared", "rows-in-global"])
def test_cuda_provider_alignment_matches_the_python_api(cuda_provider, rng, dtype, long_targets):
    """Alignments and scores equal to deploy_ctc.forced_align's (CPU): delta is float64 on every backend, with the
    same comparisons, so ties resolve alike; exact ties are planted."""
    T, N, C, S = (3200, 3, 6, 1600) if long_targets else (30, 40, 6, 7)  # 2 (2S + 1) doubles above 48 KiB
    lp = (-rng.choice([0.5, 1.0, 2.0], size=(T, N, C))).astype(dtype)
    targets = rng.choice([0, 1, 3, 4, 5], size=(N, S))
    il = rng.integers(0, T + 1, size=N)
    tl = rng.integers(0, S + 1, size=N)
    il[0], tl[0] = T, S  # the longest target is used
    feeds = feeds_of(lp, targets, il, tl, np.int64)
    alignment, scores = run_on_cuda(cuda_provider, "CTCAlign", feeds, blank=2)
    want_alignment, want_scores = deploy_ctc.forced_align(lp, targets, il, tl, blank=2)
    np.testing.assert_array_equal(alignment, want_alignment)
    np.testing.assert_array_equal(scores, want_scores)
