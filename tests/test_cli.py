"""The ``deploy-ctc`` console script: ``check`` reports versions and backends and passes its self-test."""

import importlib
import os
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


def test_check_runs_the_torch_parity_test_when_torch_is_installed(capsys):
    torch = pytest.importorskip("torch")
    _, out = run_main(["check"], capsys)
    assert torch.__version__.split("+")[0] in out


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
