"""The ``deploy-ctc`` console script: ``check`` reports versions and backends and passes its self-test."""

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


def test_module_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "deploy_ctc.cli", "check"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_help_lists_commands(capsys):
    code, out = run_main(["--help"], capsys)
    assert code == 0
    assert "check" in out and "bench" in out


def test_unknown_command_fails(capsys):
    code, _ = run_main(["no-such-command"], capsys)
    assert code != 0


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
