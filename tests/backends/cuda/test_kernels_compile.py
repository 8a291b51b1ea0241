"""Every kernel instantiation compiles for sm_80 and sm_90 with NVRTC, without errors, warnings or spills.

No GPU is needed: NVRTC (the ``nvidia-cuda-nvrtc`` wheel of the ``cuda-build`` extra, reached through CuPy's
bindings) compiles straight to a cubin with the same source, options and name expressions the runtime uses.
ptxas' verbose report is parsed for registers, stack frames and local-memory spills; the register counts are
printed (``pytest -s`` or ``-rA``) so a regression is visible in CI logs.
"""

import re

import pytest

from deploy_ctc._backends.cuda import cupy_kernels
from deploy_ctc._backends.cuda import loader

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc",
                            reason="CuPy's NVRTC bindings (pip install deploy_ctc[cuda-build])")

ARCHS = ("sm_80", "sm_90")
#: Largest block the launch code uses for each kernel; registers * threads must fit the 64K register file.
MAX_THREADS = {"ctc_lattice": cupy_kernels.LATTICE_MAX_THREADS, "ctc_label_links": cupy_kernels.LINKS_THREADS,
               "ctc_grad": cupy_kernels.GRAD_MAX_THREADS, "ctc_align": cupy_kernels.LATTICE_MAX_THREADS}
#: Kernels that compute in double on purpose: the alignment's Viterbi adds in double on every backend, so that ties
#: are decided on the same values everywhere.
DOUBLE_BY_DESIGN = ("ctc_align",)
REGISTER_FILE = 65536
_FUNCTION = re.compile(r"Function properties for (\S+)\s*\n\S+\s+\.\s+(\d+) bytes stack frame, "
                       r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Compiling entry function '(\S+)'.*?Used (\d+) registers", re.S)


def _program():
    """A new NVRTC program of the kernel source; skips where libnvrtc cannot be loaded (the skip fails the run where
    DEPLOY_CTC_REQUIRE lists nvrtc, as CI's does: tests/conftest.py)."""
    try:
        return nvrtc.createProgram(loader.source(), loader.SOURCE, [], [])
    except Exception as error:  # the bindings import even when libnvrtc itself is missing
        pytest.skip(f"NVRTC is not loadable ({error}); pip install deploy_ctc[cuda-build]")


def _compile(arch):
    """(lowered name of each name expression, ptxas log) of one NVRTC compilation."""
    program = _program()
    for name in loader.NAME_EXPRESSIONS:
        nvrtc.addNameExpression(program, name)
    options = [*loader.compile_options(), f"--gpu-architecture={arch}", "--ptxas-options=-v"]
    try:
        nvrtc.compileProgram(program, options)
    except nvrtc.NVRTCError as error:
        pytest.fail(f"{arch}: {error}\n{nvrtc.getProgramLog(program)}")
    assert nvrtc.getCUBIN(program), f"{arch}: empty cubin"
    lowered = {name: nvrtc.getLoweredName(program, name) for name in loader.NAME_EXPRESSIONS}
    return lowered, nvrtc.getProgramLog(program).rstrip("\x00")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_instantiation_compiles_without_spills(arch):
    lowered, log = _compile(arch)
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, f"{arch}: compiler warnings:\n{log}"
    properties = {m[0]: tuple(map(int, m[1:])) for m in _FUNCTION.findall(log)}
    registers = {m[0]: int(m[1]) for m in _REGISTERS.findall(log)}
    for name, symbol in lowered.items():
        assert symbol in properties, f"{arch}: no ptxas report for {name} ({symbol}):\n{log}"
        stack, spill_stores, spill_loads = properties[symbol]
        assert (spill_stores, spill_loads) == (0, 0), f"{arch}: {name} spills to local memory:\n{log}"
        assert stack == 0, f"{arch}: {name} uses a {stack}-byte stack frame (local memory):\n{log}"
        threads = MAX_THREADS[name.split("<")[0]]
        per_thread = -(-registers[symbol] // 8) * 8  # allocated per thread in units of 8
        assert per_thread * threads <= REGISTER_FILE, \
            f"{arch}: {name} uses {registers[symbol]} registers, too many for blocks of {threads} threads"
        print(f"{arch} {name}: {registers[symbol]} registers")


def test_every_kernel_of_the_source_has_name_expressions():
    """A kernel added to ctc.cu but not to the loader's lists would never be compiled or tested."""
    kernels = set(re.findall(r"__global__\s+void\s+(\w+)", loader.source()))
    listed = {name.split("<")[0] for name in loader.NAME_EXPRESSIONS}
    assert kernels == listed, f"kernels in {loader.SOURCE}: {sorted(kernels)}, listed: {sorted(listed)}"


def test_float_kernels_do_no_double_arithmetic():
    """float instantiations must stay in float: a stray double literal or overload would halve their speed.
    The one double value they touch is grad_scale, which is loaded and converted once per row. (Except
    DOUBLE_BY_DESIGN.)"""
    program = _program()
    floats = [name for name in loader.NAME_EXPRESSIONS
              if name.endswith("<float>") and name.split("<")[0] not in DOUBLE_BY_DESIGN]
    for name in floats:
        nvrtc.addNameExpression(program, name)
    nvrtc.compileProgram(program, [*loader.compile_options(), "--gpu-architecture=compute_90"])
    ptx = nvrtc.getPTX(program).decode()
    for name in floats:
        body = ptx.split(f".entry {nvrtc.getLoweredName(program, name)}(")[1].split(".entry ")[0]
        arithmetic = sorted(set(re.findall(r"\b(?:add|sub|mul|fma|div|ex2|lg2|max|min|neg|abs)\.\w*\.?f64", body)))
        assert not arithmetic, f"{name} does double arithmetic: {arithmetic}"
