"""deploy_ctc._backends.cpu: the choice between the native engine and pure NumPy for NumPy arrays."""

import warnings

import numpy as np
import pytest

import deploy_ctc
from deploy_ctc._backends import cpu as cpu_backends
from deploy_ctc._backends.cpu import native_build
from deploy_ctc._backends.cpu import native
from deploy_ctc._backends.cpu import pure_numpy
from tests.utils.compiler import needs_compiler
from tests.utils import oracles


@pytest.fixture
def native_unavailable(monkeypatch):
    """Make the native engine unavailable (as without a compiler) for this test only."""
    monkeypatch.setattr(native_build, "_library", None)
    monkeypatch.setattr(native_build, "_failure", native_build.NativeUnavailable("no C++ compiler found (test)"))
    monkeypatch.setattr(cpu_backends, "_warned", False)


def small_batch():
    lp = np.log(np.random.default_rng(3).dirichlet(np.ones(4), size=(6, 2)))
    return lp, np.array([[1, 2], [3, 0]]), [6, 5], [2, 1]


@needs_compiler
def test_native_is_the_default_where_a_compiler_exists(monkeypatch):
    """CI has a compiler: the native engine must be what users get there, not a silent fallback."""
    monkeypatch.delenv(cpu_backends.ENV, raising=False)
    assert cpu_backends.current() is native
    assert cpu_backends.name() == "native"


def test_environment_variable_selects_numpy(monkeypatch):
    monkeypatch.setenv(cpu_backends.ENV, "numpy")
    assert cpu_backends.current() is pure_numpy


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_backends.ENV, "fortran")
    with pytest.raises(ValueError, match="DEPLOY_CTC_CPU_BACKEND must be one of auto, native, numpy, got 'fortran'"):
        deploy_ctc.ctc_loss(*small_batch())


def test_using_overrides_the_environment_on_this_thread(monkeypatch):
    monkeypatch.setenv(cpu_backends.ENV, "auto")
    with cpu_backends.using("numpy"):
        assert cpu_backends.current() is pure_numpy
        with pytest.raises(ValueError, match="choice must be one of"):
            with cpu_backends.using("gpu"):
                pass
        assert cpu_backends.current() is pure_numpy
    assert cpu_backends.name() in ("native", "numpy")


def test_auto_falls_back_to_numpy_with_one_warning(native_unavailable, monkeypatch):
    monkeypatch.setenv(cpu_backends.ENV, "auto")
    batch = small_batch()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*slower pure-NumPy CPU backend"):
        loss = deploy_ctc.ctc_loss(*batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call stays quiet
        again = deploy_ctc.ctc_loss(*batch)
    assert loss == again
    np.testing.assert_allclose(loss, oracles.torch_reference(*batch)[0], rtol=1e-12)
    assert cpu_backends.name() == "numpy"


def test_native_on_request_fails_loudly_when_unavailable(native_unavailable, monkeypatch):
    monkeypatch.setenv(cpu_backends.ENV, "native")
    with pytest.raises(RuntimeError, match="native CPU backend was asked for, but no C\\+\\+ compiler found"):
        deploy_ctc.ctc_loss(*small_batch())


def test_both_backends_agree(monkeypatch):
    batch = small_batch()
    with cpu_backends.using("numpy"):
        expected = deploy_ctc.ctc_loss_and_grad(*batch, reduction="none")
    if cpu_backends.name() != "native":
        pytest.skip("the native engine is not available here")
    got = deploy_ctc.ctc_loss_and_grad(*batch, reduction="none")
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-13)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-12, atol=1e-15)
