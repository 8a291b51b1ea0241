"""The installed distribution ships what the package needs at run time (the CUDA and C++ sources above all)."""

import importlib.metadata
import pathlib

import pytest

from tests.utils import require

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
    import deploy_ctc

    assert "deploy_ctc/py.typed" in _distribution_files()
    assert (pathlib.Path(deploy_ctc.__file__).parent / "py.typed").is_file()  # the package the tests import


def test_console_script_is_installed():
    _distribution_files()
    entry_points = importlib.metadata.entry_points(group="console_scripts")
    assert any(ep.name == "deploy-ctc" and ep.value == "deploy_ctc.cli:main" for ep in entry_points)


def test_the_suite_runs_on_the_installed_package():
    """Where DEPLOY_CTC_REQUIRE lists ``installed`` (``.ci/run``, which runs a copy of the tests outside the
    checkout), deploy_ctc and the kernels it compiles come from the installed distribution, not a source tree."""
    if "installed" not in require.required():
        pytest.skip("checks the installed package where DEPLOY_CTC_REQUIRE lists installed (.ci/run)")
    _distribution_files()
    import deploy_ctc
    from deploy_ctc._backends.cuda import loader
    from deploy_ctc._backends.kernel_sources import kernel_sources_dir

    installed = pathlib.Path(importlib.metadata.distribution("deploy_ctc").locate_file("deploy_ctc")).resolve()
    assert pathlib.Path(deploy_ctc.__file__).resolve().parent == installed, deploy_ctc.__file__
    assert kernel_sources_dir() == installed / "kernels"
    assert loader.source() == (installed / "kernels" / loader.SOURCE).read_text()
    assert not (ROOT / "deploy_ctc").exists(), f"the tests run from a checkout ({ROOT}), which shadows the package"
