"""The installed distribution ships what the package needs at run time (the CUDA and C++ sources above all)."""

import importlib.metadata
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _distribution_files():
    try:
        files = importlib.metadata.files("deploy_ctc")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("deploy_ctc is not installed as a distribution (running from the source tree only)")
    if files is None or not any(str(f).startswith("deploy_ctc/") for f in files):
        pytest.skip("deploy_ctc is installed in editable mode: no wheel contents to inspect")
    return {str(f) for f in files}


def test_wheel_ships_every_kernel_source():
    files = _distribution_files()
    sources = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h"))
    assert "ctc.cu" in sources and "ctc_cpu.cpp" in sources, sources
    missing = [name for name in sources if f"deploy_ctc/kernels/{name}" not in files]
    assert not missing, f"kernel sources missing from the installed package: {missing}"


def test_wheel_ships_the_typed_marker():
    assert (ROOT / "deploy_ctc" / "py.typed").is_file()
    assert "deploy_ctc/py.typed" in _distribution_files()


def test_console_script_is_installed():
    _distribution_files()
    entry_points = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "deploy-ctc" and ep.value == "deploy_ctc.cli:main" for ep in entry_points)
