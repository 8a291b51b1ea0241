"""export_examples/cpp/ctc_host.cpp: a C++ ONNX Runtime host running an exported model with deploy_ctc's native
library, built against the libonnxruntime inside the onnxruntime wheel, gives the Python session's results."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import deploy_ctc.onnx as dco  # noqa: E402
from deploy_ctc.demo import AcousticModel, AcousticModelWithLoss, export_with_loss, make_batch  # noqa: E402
from deploy_ctc.onnx import native_library  # noqa: E402
from tests.onnx.helpers import grad_model, make_problem, native_library_or_skip  # noqa: E402

SOURCE = Path(__file__).resolve().parents[2] / "export_examples" / "cpp" / "ctc_host.cpp"


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """The host program, built as export_examples/cpp/README.md says."""
    native_library_or_skip()
    runtime = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    if not runtime or not shutil.which("g++"):
        pytest.skip("needs g++ and the onnxruntime wheel's capi/libonnxruntime.so.*")
    folder = tmp_path_factory.mktemp("host")
    # The wheel ships libonnxruntime.so.1.x.y only; the program asks for its soname, libonnxruntime.so.1.
    (folder / "libonnxruntime.so.1").symlink_to(runtime[0])
    program = folder / "ctc_host"
    build = subprocess.run(["g++", "-std=c++17", "-O2", f"-I{native_library.include_dir()}", str(SOURCE), "-o",
                            str(program), str(runtime[0]), f"-Wl,-rpath,{folder}"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return program


def run_host(host, model_path, feeds: dict, tmp_path) -> subprocess.CompletedProcess:
    arguments = []
    for name, value in feeds.items():
        np.save(tmp_path / f"{name}.npy", value)
        arguments.append(f"{name}={tmp_path / f'{name}.npy'}")
    return subprocess.run([str(host), str(model_path), native_library.library_path(), *arguments],
                          capture_output=True, text=True, timeout=120)


def parse(stdout: str) -> dict:
    """{output name: array} from the host's "NAME dtype (shape): values" lines."""
    outputs = {}
    for line in stdout.splitlines():
        if line.startswith("median_ms"):
            continue
        head, values = line.split(":", 1)
        name, dtype, shape = head.split(" ", 2)
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        outputs[name] = np.array(values.split(), dtype=dtype).reshape(dims)
    return outputs


def python_session(model_path, feeds):
    session = ort.InferenceSession(str(model_path), dco.session_options(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def test_exported_acoustic_model_loss_equals_python(host, tmp_path):
    torch.manual_seed(0)
    module = AcousticModelWithLoss(AcousticModel(hidden=16), reduction="none").eval()
    model_path = tmp_path / "model.onnx"
    export_with_loss(module, make_batch(3, 64, seed=1), str(model_path), dynamo=False)
    feeds = make_batch(4, 70, seed=2)
    result = run_host(host, model_path, feeds, tmp_path)
    assert result.returncode == 0, result.stderr
    got = parse(result.stdout)
    want = python_session(model_path, feeds)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with torch.no_grad():  # and the loss is torch's
        expected = module(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    np.testing.assert_allclose(got["loss"], expected, rtol=1e-4)


def test_gradient_model_equals_python(host, tmp_path, rng):
    problem = make_problem(rng, T=30, N=3, C=7, S=5, dtype=np.float64)
    model_path = tmp_path / "grad.onnx"
    model_path.write_bytes(grad_model("float64", reduction="sum").SerializeToString())
    feeds = {"d_loss": np.array(0.5), **problem.feeds()}
    result = run_host(host, model_path, feeds, tmp_path)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(parse(result.stdout)["d_log_probs"], python_session(model_path, feeds)["d_log_probs"])


def test_invalid_input_is_an_error_the_host_reports(host, tmp_path, rng):
    problem = make_problem(rng, T=10, N=2, C=4, S=3, target_lengths=[3, 3])
    problem.targets[1, 2] = 9
    model_path = tmp_path / "loss.onnx"
    model_path.write_bytes(dco.ctc_loss_model(embed_functions=False).SerializeToString())
    result = run_host(host, model_path, problem.feeds(), tmp_path)
    assert result.returncode == 1
    assert "deploy_ctc::CTCLoss: targets[1, 2] = 9 is outside [0, C=4)" in result.stderr
