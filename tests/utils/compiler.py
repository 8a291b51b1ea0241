"""Whether this machine has a C++ compiler, for tests that build native code."""

import pytest

from deploy_ctc._backends import native_cache


def has_compiler() -> bool:
    """True when ``$CXX`` or one of c++, g++, clang++ is on PATH."""
    try:
        return bool(native_cache.find_compiler())
    except native_cache.NativeUnavailable:
        return False


#: Skips a test (or, as ``pytestmark``, a module) where no C++ compiler is found.
needs_compiler = pytest.mark.skipif(not has_compiler(), reason="no C++ compiler ($CXX, c++, g++, clang++)")
