"""deploy_ctc._backends.cpu.constants: the numerical constants Python reads from kernels/ctc_constants.h are the
values the C++ compiler sees (a program compiled from the header prints them exactly, as hexadecimal floats)."""

import subprocess

import pytest

from deploy_ctc._backends.cpu import constants, pure_numpy
from deploy_ctc._backends.kernel_sources import kernel_sources_dir
from deploy_ctc._backends.native_cache import NativeUnavailable, find_compiler

PROGRAM = r"""
#include <cstdio>
#include "ctc_constants.h"
int main() {
  std::printf("kConsistencyTol %a\nkTinyMass %a\nkFlushLog %a\n", dctc::kConsistencyTol, dctc::kTinyMass,
              dctc::kFlushLog);
}
"""


def test_python_reads_what_the_compiler_sees(tmp_path):
    try:
        compiler = find_compiler()
    except NativeUnavailable as error:
        pytest.skip(str(error))
    source, program = tmp_path / "print_constants.cpp", tmp_path / "print_constants"
    source.write_text(PROGRAM)
    subprocess.run([compiler, "-std=c++17", f"-I{kernel_sources_dir()}", str(source), "-o", str(program)],
                   check=True, capture_output=True, timeout=120)
    printed = subprocess.run([str(program)], check=True, capture_output=True, text=True).stdout.split()
    compiled = {name: float.fromhex(value) for name, value in zip(printed[::2], printed[1::2])}
    assert compiled == constants.read_header()
    assert set(compiled) == {"kConsistencyTol", "kTinyMass", "kFlushLog"}


def test_the_backends_use_the_shared_values():
    assert pure_numpy._CONSISTENCY_TOL == constants.CONSISTENCY_TOL == 1e-9
    assert pure_numpy._LOG_Z_FLOOR == pytest.approx(-938 * 0.6931471805599453)  # log(2^-938)
    assert pure_numpy._FLUSH_LOG == constants.FLUSH_LOG == -700.0


def test_a_literal_python_cannot_read_is_refused(tmp_path):
    header = tmp_path / "ctc_constants.h"
    header.write_text("constexpr double kBroken = 1.0f / 3;\n")
    with pytest.raises(ValueError, match="kBroken = '1.0f / 3' is not a floating literal"):
        constants.read_header(header)
