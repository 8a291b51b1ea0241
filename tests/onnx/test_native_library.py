"""deploy_ctc's native ONNX Runtime library (kernels/ort_ops.cpp) against the Python API and torch float64.

The library calls the same engine as deploy_ctc.ctc_loss, so its results must be bit-identical to the direct call
(which tests/test_api.py holds to torch); one test also compares with torch directly. Invalid inputs must fail the
run with an onnxruntime exception carrying the Python API's message, and the process must go on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import deploy_ctc  # noqa: E402
import deploy_ctc.onnx as dco  # noqa: E402
from deploy_ctc.onnx import native_library  # noqa: E402
from tests.onnx.helpers import make_problem, native_library_or_skip, node_model  # noqa: E402
from tests.utils.oracles import assert_close, concatenate_targets, non_finite_batch, torch_reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def library():
    return native_library_or_skip()


def run(op: str, feeds: dict, **attrs):
    session = ort.InferenceSession(node_model(op, feeds, **attrs).SerializeToString(), dco.session_options(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def loss_and_grad(feeds: dict, d_loss=None, **attrs):
    """The library's loss and gradient for ``feeds`` (d_loss defaults to ones of the loss's shape)."""
    loss = run("CTCLoss", feeds, **attrs)
    d_loss = np.ones_like(loss) if d_loss is None else d_loss
    return loss, run("CTCLossGrad", {"d_loss": d_loss, **feeds}, **attrs)


def feeds_of(lp, targets, il, tl, int_types=(np.int64, np.int64, np.int64)) -> dict:
    return {"log_probs": lp, "targets": np.asarray(targets, int_types[0]),
            "input_lengths": np.asarray(il, int_types[1]), "target_lengths": np.asarray(tl, int_types[2])}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("int_types", [(np.int64,) * 3, (np.int32,) * 3, (np.int32, np.int64, np.int32)],
                         ids=["int64", "int32", "mixed"])
@pytest.mark.parametrize("layout", ["padded", "concatenated", "unbatched"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bit_identical_to_the_python_api(rng, dtype, int_types, layout, reduction):
    p = make_problem(rng, T=25, N=1 if layout == "unbatched" else 5, C=7, S=6, dtype=dtype, blank=3)
    p.input_lengths[-1] = 1  # infeasible unless its target is empty: +inf, then 0 under zero_infinity
    lp, targets, il, tl = p.args(layout)
    attrs = dict(blank=3, reduction=reduction, zero_infinity=int(rng.integers(2)))
    feeds = feeds_of(lp, targets, il, tl, int_types)
    d_loss = rng.uniform(0.5, 2.0, np.shape(deploy_ctc.ctc_loss(lp, targets, il, tl, **attrs))).astype(dtype)
    loss, grad = loss_and_grad(feeds, d_loss, **attrs)
    # CTCLoss runs the engine's loss-only pass, as ctc_loss does; CTCLossGrad its forward and backward passes (the
    # two losses agree to rounding, not necessarily to the bit).
    want_loss = deploy_ctc.ctc_loss(lp, targets, il, tl, **attrs)
    _, want_grad = deploy_ctc.ctc_loss_and_grad(lp, targets, il, tl, **attrs, grad_output=d_loss)
    assert loss.dtype == dtype and grad.dtype == dtype
    np.testing.assert_array_equal(loss, want_loss)
    np.testing.assert_array_equal(grad, want_grad)


def test_matches_torch_float64(rng):
    p = make_problem(rng, T=40, N=6, C=9, S=8, dtype=np.float64, blank=0)
    loss, grad = loss_and_grad(feeds_of(*p.args()), reduction="none")
    want_loss, want_grad = torch_reference(*p.args(), reduction="none", grad_output=np.ones(6))
    assert_close(loss, want_loss, np.float64, "loss")
    assert_close(grad, want_grad, np.float64, "grad")


def test_attribute_defaults_are_the_schemas(rng):
    """A node without attributes runs as blank=0, reduction='mean', zero_infinity=0."""
    p = make_problem(rng, T=20, N=4, C=5, S=4)
    p.input_lengths[0] = 1  # infeasible: mean is +inf unless zero_infinity
    loss, grad = loss_and_grad(feeds_of(*p.args()))
    want_loss, (_, want_grad) = deploy_ctc.ctc_loss(*p.args()), deploy_ctc.ctc_loss_and_grad(*p.args())
    assert np.isinf(loss)
    np.testing.assert_array_equal(loss, want_loss)
    np.testing.assert_array_equal(grad, want_grad)


def test_large_batch_on_intra_op_threads(rng):
    """A batch big enough to be dealt to several threads: every sample and gradient row still exact."""
    p = make_problem(rng, T=200, N=16, C=40, S=20)
    feeds = feeds_of(*p.args())
    model = node_model("CTCLossGrad", {"d_loss": np.float32(1.0), **feeds}, reduction="sum")
    so = dco.session_options()
    so.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    grad = session.run(None, {"d_loss": np.array(1.0, np.float32), **feeds})[0]
    _, want = deploy_ctc.ctc_loss_and_grad(*p.args(), reduction="sum")
    np.testing.assert_array_equal(grad, want)


def test_nan_and_empty_samples_as_the_python_api(rng):
    p = make_problem(rng, T=12, N=4, C=5, S=3, dtype=np.float64, target_lengths=[3, 0, 2, 2],
                     input_lengths=[12, 0, 12, 12])
    p.log_probs[3, 2, :] = np.nan  # sample 2: NaN loss and NaN gradient rows
    p.log_probs[5:, 3, :] = np.nan  # sample 3: NaN beyond its frames, which are never read
    p.input_lengths[3] = 5
    p.log_probs[0, 0, 4] = np.nan  # sample 0: NaN in a class outside its target: only that gradient cell
    p.targets[0] = [1, 2, 3]
    for attrs in (dict(reduction="none"), dict(reduction="none", zero_infinity=1)):
        loss, grad = loss_and_grad(feeds_of(*p.args()), **attrs)
        want_loss = deploy_ctc.ctc_loss(*p.args(), **attrs)  # CTCLoss is the loss-only pass, as ctc_loss
        _, want_grad = deploy_ctc.ctc_loss_and_grad(*p.args(), **attrs)
        np.testing.assert_array_equal(loss, want_loss)
        np.testing.assert_array_equal(grad, want_grad)
    assert np.isnan(loss[2]) and loss[1] == 0 and np.isfinite(loss[3]) and np.isfinite(loss[0])


def test_inputs_are_not_modified(rng):
    p = make_problem(rng, T=15, N=3, C=6, S=4)
    feeds = feeds_of(*p.args())
    before = {name: value.copy() for name, value in feeds.items()}
    loss_and_grad(feeds)
    for name, value in feeds.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def _valid():
    rng = np.random.default_rng(0)
    p = make_problem(rng, T=10, N=3, C=5, S=4, target_lengths=[4, 2, 3], input_lengths=[10, 9, 8])
    return feeds_of(*p.args())


def _set(name, value):
    return lambda f: {**f, name: value}


def _entry(name, index, value):
    def change(f):
        array = f[name].copy()
        array[index] = value
        return {**f, name: array}
    return change


INVALID = {
    "target outside C": _entry("targets", (1, 0), 7),
    "target equals blank": _entry("targets", (2, 1), 0),
    "negative target": _entry("targets", (0, 3), -1),
    "negative input length": _entry("input_lengths", 1, -2),
    "negative target length": _entry("target_lengths", 2, -1),
    "input length above T": _entry("input_lengths", 0, 11),
    "target length above S": _entry("target_lengths", 0, 5),
    "lengths count": _set("input_lengths", np.array([10, 9], np.int64)),
    "lengths in another shape": _set("target_lengths", np.array([[4, 2]], np.int64)),
    "float lengths": _set("input_lengths", np.array([10, 9, 8], np.float32)),
    "float targets": lambda f: {**f, "targets": f["targets"].astype(np.float32)},
    "scalar targets": _set("targets", np.array(1, np.int64)),
    "3-D targets": lambda f: {**f, "targets": f["targets"][None]},
    "targets rows": lambda f: {**f, "targets": f["targets"][:2]},
    "concatenated sum": lambda f: {**f, "targets": np.ones(8, np.int64)},
    "concatenated value": lambda f: {**f, "targets": np.r_[np.ones(8, np.int64), 6]},
    "concatenated lengths whose int64 sum wraps": lambda f: {
        **f, "targets": np.array([1, 2, 3, 4]), "target_lengths": np.array([2**63 - 1, 2**63 - 1, 6])},
    "4-D log_probs": lambda f: {**f, "log_probs": f["log_probs"][None]},
    "1-D log_probs": lambda f: {**f, "log_probs": f["log_probs"][:, 0, 0].copy()},
    "empty log_probs": lambda f: {**f, "log_probs": f["log_probs"][:0]},
    "unbatched lengths": lambda f: {**f, "log_probs": f["log_probs"][:, 0].copy(), "targets": f["targets"][0]},
    "unbatched 2-D targets": lambda f: {**f, "log_probs": f["log_probs"][:, 0].copy(), "input_lengths": f[
        "input_lengths"][:1], "target_lengths": f["target_lengths"][:1]},
}


@pytest.mark.parametrize("case", sorted(INVALID))
@pytest.mark.parametrize("op", ["CTCLoss", "CTCLossGrad"])
def test_invalid_input_raises_the_api_message(case, op):
    feeds = INVALID[case](_valid())
    with pytest.raises((ValueError, TypeError)) as direct:
        deploy_ctc.ctc_loss(*feeds.values())
    if op == "CTCLossGrad":
        feeds = {"d_loss": np.array(1.0, feeds["log_probs"].dtype), **feeds}
    with pytest.raises(Exception) as raised:
        run(op, feeds)
    assert f"deploy_ctc::{op}: {direct.value}" in str(raised.value)
    # The process goes on: the same session shape runs a valid batch.
    valid = _valid()
    np.testing.assert_array_equal(run("CTCLoss", valid), deploy_ctc.ctc_loss(*valid.values()))


@pytest.mark.parametrize("blank", [-1, 5])
def test_blank_outside_classes_raises(blank):
    feeds = _valid()
    with pytest.raises(Exception, match=rf"deploy_ctc::CTCLoss: blank={blank} must be in \[0, C=5\)"):
        run("CTCLoss", feeds, blank=blank)


@pytest.mark.parametrize("d_loss_shape, reduction", [((2,), "mean"), ((2,), "none"), ((3, 1), "none")])
def test_d_loss_of_the_wrong_shape_raises(d_loss_shape, reduction):
    feeds = _valid()
    with pytest.raises(ValueError) as direct:
        deploy_ctc.ctc_loss_and_grad(*feeds.values(), reduction=reduction, grad_output=np.ones(d_loss_shape))
    message = str(direct.value).replace("grad_output", "d_loss")
    with pytest.raises(Exception) as raised:
        run("CTCLossGrad", {"d_loss": np.ones(d_loss_shape, np.float32), **feeds}, reduction=reduction)
    assert message in str(raised.value)


@pytest.mark.parametrize("name, value, message", [
    ("reduction", "average", "reduction must be one of 'none', 'mean', 'sum', got 'average'"),
    ("zero_infinity", 5, "zero_infinity must be a bool (or 0/1), got 5"),
    ("blank", 1.5, "blank must be an integer, got an attribute of another type"),
    ("reduction", 2, "reduction must be a string, got an attribute of another type"),
])
def test_bad_attribute_fails_at_session_creation(name, value, message):
    model = node_model("CTCLoss", _valid(), **{name: value})
    with pytest.raises(Exception) as raised:
        ort.InferenceSession(model.SerializeToString(), dco.session_options(), providers=["CPUExecutionProvider"])
    assert message in str(raised.value)


def test_session_options_registers_once(rng):
    so = ort.SessionOptions()
    assert dco.session_options(so) is so and dco.session_options(so) is so  # twice would fail at session creation
    feeds = _valid()
    session = ort.InferenceSession(node_model("CTCLoss", feeds).SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds)[0], deploy_ctc.ctc_loss(*feeds.values()))


def test_only_register_custom_ops_is_exported(library):
    import ctypes

    lib = ctypes.CDLL(library)
    assert hasattr(lib, "RegisterCustomOps")
    assert not hasattr(lib, "deploy_ctc_cpu_float")  # the bundled engine stays private
    readelf = subprocess.run(["readelf", "-d", library], capture_output=True, text=True)
    if readelf.returncode == 0:
        assert "onnxruntime" not in readelf.stdout  # no libonnxruntime linked: the host provides the API


def test_missing_headers_fall_back_to_the_portable_body(monkeypatch, tmp_path, rng):
    monkeypatch.setenv(native_library.INCLUDE_ENV, str(tmp_path))
    monkeypatch.setattr(native_library, "_paths", {})
    monkeypatch.setattr(native_library, "_failures", {})
    monkeypatch.setattr(native_library, "SYSTEM_INCLUDE", tmp_path / "none")
    from deploy_ctc.onnx import runtime

    monkeypatch.setattr(runtime, "_warned", set())
    with pytest.raises(native_library.NativeUnavailable, match=native_library.INCLUDE_ENV):
        dco.library_path()
    with pytest.warns(RuntimeWarning, match="portable function bodies"):
        so = dco.session_options()
    p = make_problem(rng, T=10, N=2, C=4, S=3)
    model = dco.ctc_loss_model()
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert np.isfinite(session.run(None, p.feeds())[0])


def _child(code: str, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_concurrent_first_use_from_threads():
    """Threads of a fresh process calling session_options() and running sessions at once: one registration each,
    no crash, every result exact."""
    child = _child("""
        import threading
        import numpy as np
        import onnxruntime as ort
        import deploy_ctc.onnx as dco
        from tests.onnx.helpers import make_problem

        p = make_problem(np.random.default_rng(0), T=30, N=4, C=6, S=5)
        model = dco.ctc_loss_model(embed_functions=False, reduction="none")
        model.ir_version = 10
        model = model.SerializeToString()
        barrier, results, errors = threading.Barrier(6), [], []

        def work():
            try:
                barrier.wait()
                session = ort.InferenceSession(model, dco.session_options(), providers=["CPUExecutionProvider"])
                results.extend(session.run(None, p.feeds())[0].tobytes() for _ in range(10))
            except Exception as error:
                errors.append(repr(error))

        threads = [threading.Thread(target=work) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        import deploy_ctc
        want = deploy_ctc.ctc_loss(*p.args(), reduction="none").tobytes()
        print(len(results), sum(r == want for r in results), errors)
    """)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert out.split()[:2] == ["60", "60"] and out.strip().endswith("[]"), out


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_during_the_first_build_does_not_hang(tmp_path):
    """A stub compiler builds (slowly) a library exporting RegisterCustomOps, next to an empty header folder."""
    from tests.backends.cpu.test_native_build import FORK_DURING_BUILD, stub_environment

    include = tmp_path / "include"
    include.mkdir()
    (include / native_library.HEADER).write_text("")
    environment = stub_environment(tmp_path, tmp_path / "cache", names=[native_library.SYMBOL],
                                   **{native_library.INCLUDE_ENV: str(include)})
    script = FORK_DURING_BUILD.format(module="deploy_ctc.onnx.native_library")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "builds.log")],
                            capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    library = next((tmp_path / "cache").glob("deploy_ctc_ort-*.so"))
    assert f"child: native library {library}" in result.stdout, result.stdout
    assert f"parent: native library {library} status 0" in result.stdout, result.stdout
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1  # the child loaded the parent's build


def test_ctrl_c_during_runs_does_not_abort():
    """SIGINT while a session runs the op: KeyboardInterrupt reaches Python after the run; no abort (rc 134)."""
    child = _child("""
        import numpy as np
        import onnxruntime as ort
        import deploy_ctc.onnx as dco
        from tests.onnx.helpers import grad_model, make_problem

        p = make_problem(np.random.default_rng(0), T=300, N=16, C=200, S=40)
        model = grad_model()
        model.ir_version = 10
        session = ort.InferenceSession(model.SerializeToString(), dco.session_options(),
                                       providers=["CPUExecutionProvider"])
        feeds = {"d_loss": np.array(1.0, np.float32), **p.feeds()}
        session.run(None, feeds)
        try:
            print("running", flush=True)
            while True:
                session.run(None, feeds)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            raise SystemExit(3)
    """)
    try:
        assert child.stdout.readline().strip() == "running", child.stderr.read()
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 3, (child.returncode, err)
    assert "interrupted" in out


def test_lengths_of_any_shape_holding_n_values_are_accepted(rng):
    """As torch and the Python API: (1, N) lengths are N lengths."""
    p = make_problem(rng, T=12, N=3, C=5, S=4)
    feeds = feeds_of(*p.args())
    feeds["target_lengths"] = feeds["target_lengths"][None]
    np.testing.assert_array_equal(run("CTCLoss", feeds), deploy_ctc.ctc_loss(*p.args()))


def test_every_gradient_element_is_written_when_the_arena_is_reused(rng):
    """The output comes from ONNX Runtime's arena, uninitialised: a run after one that left NaN everywhere must
    still give exact zeros on padding rows and exact values elsewhere."""
    T, N, C = 20, 4, 6
    poison = make_problem(rng, T=T, N=N, C=C, S=3, input_lengths=[T] * N)
    poison.log_probs[:] = np.nan
    p = make_problem(rng, T=T, N=N, C=C, S=3, input_lengths=[T, 5, 0, 12], target_lengths=[3, 2, 0, 3])
    grads = []
    feeds = feeds_of(*p.args())
    model = node_model("CTCLossGrad", {"d_loss": np.float32(1.0), **feeds})
    session = ort.InferenceSession(model.SerializeToString(), dco.session_options(), providers=["CPUExecutionProvider"])
    for problem in (poison, p):
        grads.append(session.run(None, {"d_loss": np.array(1.0, np.float32), **feeds_of(*problem.args())})[0])
    assert np.isnan(grads[0]).all()
    _, want = deploy_ctc.ctc_loss_and_grad(*p.args())
    np.testing.assert_array_equal(grads[1], want)
    assert (grads[1][5:, 1] == 0).all() and (grads[1][:, 2] == 0).all()


@pytest.mark.parametrize("zero_infinity", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_non_finite_losses_follow_torch(rng, reduction, zero_infinity):
    """torch's rules for inf and NaN losses (tests/utils/oracles.py::non_finite_batch) through the library."""
    lp, targets, il, tl = non_finite_batch(rng, with_nan=True, unused_class_nan=True)
    attrs = dict(reduction=reduction, zero_infinity=int(zero_infinity))
    feeds = feeds_of(lp, targets, il, tl)
    loss = run("CTCLoss", feeds, **attrs)
    d_loss = rng.uniform(0.5, 2.0, loss.shape)
    grad = run("CTCLossGrad", {"d_loss": d_loss, **feeds}, **attrs)
    want_loss, want_grad = torch_reference(lp, targets, il, tl, grad_output=d_loss, reduction=reduction,
                                           zero_infinity=zero_infinity)
    assert_close(loss, want_loss, np.float64, "loss")
    assert_close(grad, want_grad, np.float64, "grad")


# ----------------------------------------------------------------------------------------------------------
# CTCAlign
# ----------------------------------------------------------------------------------------------------------
def align(feeds: dict, **attrs):
    """The library's (alignment, scores) for ``feeds``."""
    session = ort.InferenceSession(node_model("CTCAlign", feeds, **attrs).SerializeToString(), dco.session_options(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["padded", "concatenated", "unbatched"])
def test_align_bit_identical_to_the_python_api(rng, dtype, layout):
    T, N, C = 30, 40, 6  # large enough for the intra-op threads
    lp = (-rng.choice([0.5, 1.0, 2.0], size=(T, N, C))).astype(dtype)  # exact ties
    lp[3, 1, 1] = np.nan
    targets = rng.choice([0, 1, 3, 4, 5], size=(N, 7))
    il, tl = rng.integers(0, T + 1, size=N), rng.integers(0, 8, size=N)
    if layout == "concatenated":
        targets = concatenate_targets(targets, tl)
    elif layout == "unbatched":
        lp, targets, il, tl = lp[:, 0].copy(), targets[0, : tl[0]], il[:1].reshape(()), tl[:1].reshape(())
    feeds = feeds_of(lp, targets, il, tl, (np.int32, np.int64, np.int32))
    alignment, scores = align(feeds, blank=2)
    expected = deploy_ctc.forced_align(lp, targets, il, tl, blank=2)
    assert alignment.dtype == np.int64 and scores.dtype == dtype and alignment.shape == expected[0].shape
    np.testing.assert_array_equal(alignment, expected[0])
    np.testing.assert_array_equal(scores, expected[1])


@pytest.mark.parametrize("case", ["target equals blank", "input length above T", "concatenated sum", "float targets"])
def test_align_invalid_input_raises_the_api_message(case):
    feeds = INVALID[case](_valid())
    with pytest.raises((ValueError, TypeError)) as direct:
        deploy_ctc.forced_align(*feeds.values())
    with pytest.raises(Exception) as raised:
        align(feeds)
    assert f"deploy_ctc::CTCAlign: {direct.value}" in str(raised.value)
