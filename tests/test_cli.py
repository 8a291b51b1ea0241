"""The ``deploy-ctc`` command: subcommands, help, version, ``check``'s report and self-test, ``demo``'s behaviour
without its extras and by default, and ``bench`` inside and outside a checkout."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_main(argv, capsys):
    """Exit code and stdout of ``cli.main(argv)``, whether it returns the code or raises SystemExit."""
    cli = importlib.import_module("deploy_ctc.cli")  # imported per test: a missing module fails tests, not collection
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code or 0, capsys.readouterr().out


def test_check_passes(capsys):
    code, out = run_main(["check"], capsys)
    assert code == 0, out
    assert "PASS" in out and "FAIL" not in out
    assert np.__version__ in out  # reports versions


PARITY = re.compile(r"^  (ok  |FAIL) torch parity, (\w+) backend, \(T,N,C,S\)=\((\d+),(\d+),(\d+),(\d+)\) (\w+): "
                    r"max \|diff\| (\S+)$")
FAST = re.compile(r"^  (ok  |FAIL) fast path, (\w+) backend: (\d+) of (\d+) samples$")
PARITY_CASES = {(30, 4, 6, 8, "mean"), (50, 3, 20, 12, "sum"), (9, 5, 4, 6, "none")}


def cpu_backend_names():
    from deploy_ctc._backends import cpu as cpu_backends

    return {"native", "numpy"} if cpu_backends.name() == "native" else {"numpy"}


def parity_lines(out):
    """{(backend, (T, N, C, S, reduction)): (ok, max |diff|)} of check's torch parity lines."""
    found = {}
    for match in filter(None, map(PARITY.match, out.splitlines())):
        status, backend, *shape, reduction, diff = match.groups()
        found[backend, (*map(int, shape), reduction)] = (status == "ok  ", float(diff))
    return found


def test_check_runs_every_torch_parity_case_on_every_cpu_backend(capsys):
    pytest.importorskip("torch")
    code, out = run_main(["check"], capsys)
    assert code == 0, out
    found = parity_lines(out)
    assert set(found) == {(backend, case) for backend in cpu_backend_names() for case in PARITY_CASES}, out
    for key, (ok, diff) in found.items():
        assert ok and diff <= 1e-9, key


def test_check_tests_the_fast_path_of_every_cpu_backend(capsys):
    code, out = run_main(["check"], capsys)
    found = {m.group(2): m.groups() for m in filter(None, map(FAST.match, out.splitlines()))}
    assert set(found) == cpu_backend_names(), out
    for status, _, fast, total in found.values():
        assert status == "ok  " and fast == total == "8"


@pytest.mark.parametrize("wrong", ["numpy", "native"])
def test_check_fails_when_one_backend_is_wrong(capsys, monkeypatch, wrong):
    """A gradient 0.1% off on one backend: that backend's parity lines say FAIL, the other's ok, exit code 1."""
    pytest.importorskip("torch")
    if wrong not in cpu_backend_names():
        pytest.skip("the native engine cannot be built here")
    module = importlib.import_module(f"deploy_ctc._backends.cpu.{'pure_numpy' if wrong == 'numpy' else 'native'}")
    real = module.forward_backward

    def off(problem, grad_scale=None, convention="torch"):
        nll, grad = real(problem, grad_scale, convention)
        return nll, None if grad is None else grad * 1.001

    monkeypatch.setattr(module, "forward_backward", off)
    code, out = run_main(["check"], capsys)
    assert code == 1 and out.splitlines()[-1] == "FAIL"
    found = parity_lines(out)
    assert len(found) == 3 * len(cpu_backend_names())
    for (backend, _), (ok, diff) in found.items():
        assert ok == (backend != wrong) and (diff > 1e-9) == (backend == wrong), (backend, diff)


def test_check_fails_when_the_fast_path_is_broken(capsys, monkeypatch):
    """A fast path whose every result fails its accuracy check still gives torch's numbers (the exact redo), so
    only the fast-path line can catch it."""
    from deploy_ctc._backends.cpu import pure_numpy

    monkeypatch.setattr(pure_numpy, "_CONSISTENCY_TOL", -1.0)
    code, out = run_main(["check"], capsys)
    assert code == 1 and out.splitlines()[-1] == "FAIL"
    assert "  FAIL fast path, numpy backend: 0 of 8 samples" in out.splitlines()
    assert all(ok for ok, _ in parity_lines(out).values())


def _run_python(args, cwd, timeout=300):
    """``python *args`` in ``cwd`` with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.mark.parametrize("module", ["deploy_ctc", "deploy_ctc.cli"])
def test_module_entry_points(tmp_path, module):
    result = _run_python(["-m", module, "check"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_version(capsys):
    import deploy_ctc

    code, out = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"deploy_ctc {deploy_ctc.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["check", "--help"], ["demo", "--help"], ["bench", "--help"]])
def test_help_is_plain_text(argv, capsys):
    code, out = run_main(argv, capsys)
    assert code == 0 and out.startswith("usage: deploy-ctc")
    for markup in ("``", ":func:", ":mod:", "**", "<", "`"):
        assert markup not in out, f"{markup!r} in the help of {argv}"


def test_check_reports_threads_cache_and_why_a_backend_is_unusable(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DEPLOY_CTC_NUM_THREADS", "3")
    monkeypatch.setenv("DEPLOY_CTC_CACHE_DIR", str(tmp_path / "cache"))
    from deploy_ctc._backends.cpu import common

    common.pool_size.cache_clear()
    try:
        _, out = run_main(["check"], capsys)
    finally:
        common.pool_size.cache_clear()
    assert "worker threads: 3 (DEPLOY_CTC_NUM_THREADS" in out
    assert f"build cache: {tmp_path / 'cache'}" in out
    cuda = next(line for line in out.splitlines() if line.strip().startswith("cuda"))
    assert "device(s)" in cuda or ("unusable: " in cuda and len(cuda.split("unusable: ", 1)[1]) > 10), cuda


def test_check_says_why_cupy_is_unusable(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    _, out = run_main(["check"], capsys)
    cuda = next(line for line in out.splitlines() if line.strip().startswith("cuda"))
    assert "unusable: cupy does not import" in cuda and "deploy_ctc[cuda]" in cuda


BLOCK_IMPORTS = ("import sys; sys.modules.update(dict.fromkeys(['torch', 'onnx', 'onnxruntime', 'onnxscript', "
                 "'cupy'])); from deploy_ctc.cli import main; ")


def test_demo_with_only_numpy_names_the_extra_in_one_line(tmp_path):
    result = _run_python(["-c", BLOCK_IMPORTS + "sys.exit(main(['demo']))"], tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0] and "deploy_ctc[onnx]" in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_check_with_only_numpy_passes(tmp_path):
    result = _run_python(["-c", BLOCK_IMPORTS + "sys.exit(main(['check']))"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "deploy_ctc[test]" in result.stdout


def test_demo_by_default_is_quiet_shows_progress_and_writes_nothing_here(tmp_path):
    for name in ("torch", "onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(name)
    result = _run_python(["-m", "deploy_ctc", "demo", "--batch", "2", "--frames", "24", "--repeats", "1"], tmp_path,
                         timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exporting with the dynamo exporter" in result.stdout and "done in" in result.stdout
    assert "parity: OK" in result.stdout and "temporary file" in result.stdout
    # No exporter chatter: torch's warnings, deprecations and log lines (deploy_ctc's own warnings may remain).
    for chatter in ("torchvision", "site-packages/torch", "DeprecationWarning", "UserWarning", "[torch.onnx]"):
        assert chatter not in result.stdout + result.stderr, result.stderr
    assert not list(tmp_path.iterdir())


def test_help_lists_commands(capsys):
    code, out = run_main(["--help"], capsys)
    assert code == 0
    assert "check" in out and "bench" in out


def test_unknown_command_fails(capsys):
    from deploy_ctc import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2
    assert "unknown command 'no-such-command'; the commands are check, demo, bench" in capsys.readouterr().err


def test_no_command_prints_the_usage(capsys):
    from deploy_ctc import cli

    assert cli.main([]) == 2
    assert "check" in capsys.readouterr().err


def test_check_fails_on_a_wrong_loss(capsys, monkeypatch):
    """The self-test can fail: an off-by-one loss must give FAIL and exit code 1."""
    import deploy_ctc

    loss_fn, loss_and_grad_fn = deploy_ctc.ctc_loss, deploy_ctc.ctc_loss_and_grad
    monkeypatch.setattr(deploy_ctc, "ctc_loss", lambda *a, **k: loss_fn(*a, **k) + 1)
    monkeypatch.setattr(deploy_ctc, "ctc_loss_and_grad",
                        lambda *a, **k: tuple(v + 1 for v in loss_and_grad_fn(*a, **k)))
    code, out = run_main(["check"], capsys)
    assert code == 1
    assert "FAIL" in out.splitlines()[-1]


def test_check_without_torch_still_passes(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    code, out = run_main(["check"], capsys)
    assert code == 0 and "PASS" in out
    assert "deploy_ctc[test]" in out  # says how to get the parity test


def test_bench_runs_the_checkout_benchmark(capsys):
    """From a source checkout, ``bench`` is benchmarks/bench_cpu.py under the command's name."""
    from deploy_ctc import cli

    with pytest.raises(SystemExit):
        cli.main(["bench", "--repeats", "0"])
    err = capsys.readouterr().err
    assert "deploy-ctc bench" in err and "--repeats must be at least 1" in err


def test_bench_outside_a_checkout_says_how_to_run_it(capsys, monkeypatch, tmp_path):
    import deploy_ctc
    from deploy_ctc import cli

    monkeypatch.setattr(deploy_ctc, "__file__", str(tmp_path / "site-packages" / "deploy_ctc" / "__init__.py"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench"]) == 2
    assert "python benchmarks/bench_cpu.py" in capsys.readouterr().err


def test_check_says_whether_the_onnxruntime_library_is_available(capsys, monkeypatch, tmp_path):
    pytest.importorskip("onnxruntime")
    from deploy_ctc.onnx import native_library

    monkeypatch.setattr(native_library, "_failures", {})
    monkeypatch.setattr(native_library, "_paths", {})
    monkeypatch.setenv(native_library.INCLUDE_ENV, str(tmp_path))  # no headers there
    monkeypatch.setattr(native_library, "SYSTEM_INCLUDE", tmp_path / "none")
    _, out = run_main(["check"], capsys)
    assert f"native library unavailable (ONNX Runtime's C API header onnxruntime_c_api.h was not found in {tmp_path}" \
        in out and native_library.INCLUDE_ENV in out


def test_ort_library_prints_the_library_path(capsys):
    pytest.importorskip("onnxruntime")
    from deploy_ctc.onnx import native_library

    try:
        path = native_library.library_path()
    except native_library.NativeUnavailable as error:
        pytest.skip(f"the native ONNX Runtime library is unavailable here: {error}")
    code, out = run_main(["ort-library"], capsys)
    assert code == 0 and out.strip() == path


def test_ort_library_portable_build_command(monkeypatch, capsys, tmp_path):
    """The portable copy is built without -march=native, with the export list and no undefined symbols."""
    from deploy_ctc.onnx import native_library

    commands = []
    monkeypatch.setattr(native_library, "include_dir", lambda: tmp_path)
    monkeypatch.setattr(native_library.subprocess, "run", lambda command: commands.append(command) or
                        subprocess.CompletedProcess(command, 0))
    code, _ = run_main(["ort-library", "--portable", "--output", str(tmp_path / "lib" / "x.so")], capsys)
    assert code == 0 and len(commands) == 1
    command = commands[0]
    assert not any(flag.startswith("-march") for flag in command)
    assert "-fvisibility=hidden" in command and "-Wl,-z,defs" in command and f"-I{tmp_path}" in command
    assert any(flag.startswith("-Wl,--version-script=") and flag.endswith("ort_ops.map") for flag in command)
    assert (tmp_path / "lib").is_dir()


def test_ort_library_cuda_portable_build_command(monkeypatch, capsys, tmp_path):
    """--cuda builds with nvcc: device code for sm_80 and sm_90, the CUDA runtime linked statically, the export list,
    no undefined symbols, the CUDA sources; --portable leaves out -march=native."""
    from deploy_ctc.onnx import native_library, native_library_cuda

    commands = []
    monkeypatch.setattr(native_library, "include_dir", lambda: tmp_path)
    monkeypatch.setattr(native_library_cuda, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(native_library_cuda, "toolkit_flags", lambda nvcc: ["-I/opt/cuda/include", "-L/opt/cuda/lib"])
    monkeypatch.setattr(native_library.subprocess, "run", lambda command: commands.append(command) or
                        subprocess.CompletedProcess(command, 0))
    code, _ = run_main(["ort-library", "--cuda", "--portable", "--output", str(tmp_path / "x.so")], capsys)
    assert code == 0 and len(commands) == 1
    command = commands[0]
    assert command[0] == "/opt/cuda/bin/nvcc"
    assert not any("-march" in flag for flag in command)
    text = " ".join(command)
    for part in ("-gencode arch=compute_80,code=sm_80", "-gencode arch=compute_90,code=sm_90", "-cudart static",
                 "-Xlinker -z,defs", "-DDEPLOY_CTC_ORT_CUDA", "-L/opt/cuda/lib", f"-I{tmp_path}"):
        assert part in text
    assert any(flag.startswith("--version-script=") and flag.endswith("ort_ops.map") for flag in command)
    host = command[command.index("-Xcompiler") + 1].split(",")  # the CPU library's host flags, the engine's among them
    assert "-fPIC" in host and all(flag in host for flag in native_library.FLAGS if not flag.startswith(("-std", "-O")))
    assert [Path(flag).name for flag in command if flag.endswith((".cu", ".cpp"))] == \
        ["ort_ops.cpp", "ort_cuda_ops.cpp", "ctc_cpu.cpp", "ctc_align_cpu.cpp", "ctc_launch.cu"]
