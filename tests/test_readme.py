"""The README as a user guide that cannot rot: every ``python`` block runs as written, on its own; the install and
test commands are the ones CI runs; the benchmark tables are the recorded results.

Rules for README code blocks (``python`` blocks run here; ``bash`` and plain blocks are not run):

- each block is self-contained (imports and data included) and runs in a fresh namespace, in a temporary working
  directory;
- a block needing an optional package or a GPU says so on the line just above its fence, e.g.
  ``<!-- readme-test: requires=torch,onnx -->``; the names are those of :data:`REQUIREMENTS`. Without them
  installed the block is skipped with the reason; a block importing an optional package it does not declare fails
  :func:`test_blocks_declare_what_they_import`. ``onnxruntime.training`` blocks run in the training venv
  (``.ci/training.sh`` runs this file there).
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.utils.gpu import gpu_count

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"

#: What a block may require, and how to get it.
REQUIREMENTS = {
    "torch": "pip install 'deploy_ctc[test]'",
    "cupy": "pip install 'deploy_ctc[cuda]'",
    "gpu": "a CUDA GPU",
    "onnx": "pip install 'deploy_ctc[onnx]'",
    "onnxruntime": "pip install 'deploy_ctc[onnx]' (onnxruntime >= 1.20, not the training build)",
    "onnxscript": "pip install 'deploy_ctc[onnx]'",
    "onnxruntime.training": "the [train] extra's own venv (bash .ci/training.sh)",
}
#: Modules whose import implies a requirement: (import prefix, requirements it implies).
IMPLIED = [("deploy_ctc.torch", {"torch"}), ("deploy_ctc.onnx", {"onnx", "onnxruntime"}),
           ("deploy_ctc.training", {"onnxruntime.training"}), ("torch", {"torch"}), ("cupy", {"cupy"}),
           ("onnxruntime", {"onnxruntime"}),
           ("onnxscript", {"onnxscript"}), ("onnx", {"onnx"})]
MARKER = re.compile(r"<!-- readme-test: requires=([\w.,]+) -->")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    heading: str
    requires: tuple
    code: str

    @property
    def id(self) -> str:
        return f"L{self.line}-" + re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")


def python_blocks() -> list:
    """Every ```python block of the README with the heading above it and its declared requirements."""
    lines = README.read_text().splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            end = lines.index("```", i + 1)
            requires = tuple(marker.group(1).split(",")) if marker else ()
            blocks.append(Block(i + 1, heading, requires, "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks()


def _missing(requirement: str) -> bool:
    if requirement == "gpu":
        return gpu_count() == 0
    try:
        module = importlib.import_module(requirement)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return True
    # onnxruntime-training 1.19.2 provides an `onnxruntime` module too, older than the [onnx] extra's (>= 1.20).
    return requirement == "onnxruntime" and _version(module.__version__) < (1, 20)


def _version(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_blocks_declare_what_they_import(block):
    unknown = set(block.requires) - set(REQUIREMENTS)
    assert not unknown, f"README.md:{block.line}: unknown requirement(s) {sorted(unknown)}; known: {list(REQUIREMENTS)}"
    imported = re.findall(r"^\s*import\s+([\w.]+)", block.code, re.M)
    for package, names in re.findall(r"^\s*from\s+([\w.]+)\s+import\s+([\w, ]+)", block.code, re.M):
        imported += [package] + [f"{package}.{name.strip()}" for name in names.split(",")]
    needed = set()
    for module in imported:
        for prefix, implied in IMPLIED:
            if module == prefix or module.startswith(prefix + "."):
                needed |= implied
                break
    undeclared = needed - set(block.requires)
    assert not undeclared, (f"README.md:{block.line} imports what needs {sorted(undeclared)}: add "
                            f"<!-- readme-test: requires={','.join(sorted(needed | set(block.requires)))} -->")


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_block_runs_on_its_own(block, tmp_path, monkeypatch):
    for requirement in block.requires:
        if _missing(requirement):
            pytest.skip(f"README.md:{block.line} needs {requirement}: {REQUIREMENTS[requirement]}")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})  # noqa: S102


def test_numpy_usage_example_matches_torch():
    torch = pytest.importorskip("torch")
    namespace = {}
    exec(BLOCKS[0].code, namespace)  # noqa: S102 - our own documentation
    # The last example: unbatched (T, C) input with 0-d lengths, reduction="mean".
    lp, targets = namespace["log_probs"], namespace["targets"]
    T, length = namespace["T"], int(namespace["target_length"])
    expected = torch.nn.functional.ctc_loss(torch.from_numpy(lp), torch.from_numpy(targets), torch.tensor(T),
                                            torch.tensor(length))
    assert np.isclose(float(namespace["loss"]), float(expected), rtol=1e-10)


def _bash_blocks() -> list:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)


def test_ci_runs_the_readme_install_and_test_commands():
    """.ci/run installs what the README's install command installs, runs its command and the test command."""
    ci = (REPO / ".ci" / "run").read_text()
    install = next(block for block in _bash_blocks() if "pip install" in block)
    spec = re.search(r'pip install ("[^"]+")', install).group(1)
    assert re.search(r"pip install .*" + re.escape(spec), ci), f".ci/run does not install {spec}"
    command = install.strip().rsplit("&&", 1)[1].strip()
    assert command in ci, f".ci/run does not run the README's {command!r}"
    test_command = next(block for block in _bash_blocks() if "pytest" in block).strip()
    assert test_command in ci.splitlines(), f".ci/run does not run the README's {test_command!r}"


def _cpu_table(report: dict) -> tuple:
    """``(rows, summary)``: the data rows and the closing summary line of benchmarks/bench_cpu.py's own Markdown
    table of ``report``."""
    from benchmarks import bench_cpu

    lines = bench_cpu.format_table(report).splitlines()
    return [line for line in lines if line.startswith("| (") and line[3].isdigit()], lines[-1]


def _onnx_rows(report: dict) -> list:
    return [f"| {tuple(r['shape_TNCS'])} | {r['direct_ms']:.2f} | {r['native_ms']:.2f} | "
            f"{r['native_over_direct']:.2f} | {r['direct_grad_ms']:.2f} | {r['native_grad_ms']:.2f} | "
            f"{r['native_grad_over_direct']:.2f} | {r['portable_ms']:.2f} | {r['torch_forward_ms']:.2f} | "
            f"{r['portable_over_torch']:.2f} |" for r in report["results"]]


def test_benchmark_tables_are_the_recorded_results():
    """The README's measured figures are those of benchmarks/results/*.json, as the scripts print them."""
    text = README.read_text()
    rows = []
    for name in ("bench_cpu.json", "bench_cpu_extra.json", "bench_cpu_peaky.json"):
        table, summary = _cpu_table(json.loads((RESULTS / name).read_text()))
        assert summary in text, f"{name}'s summary is not in README.md: {summary}"
        rows += table
    onnx = json.loads((RESULTS / "bench_onnx.json").read_text())
    rows += _onnx_rows(onnx)
    positions = [text.find(row) for row in rows]
    assert -1 not in positions, f"not in README.md: {rows[positions.index(-1)]}"
    assert positions == sorted(positions)
    host = ", ".join(f"{r['cpp_host_over_python']:.2f}" for r in onnx["results"])
    assert f"took {host}x the Python session's time" in " ".join(text.split())


def test_alignment_table_is_the_recorded_result():
    """The forced-alignment table and ratios are those of benchmarks/results/bench_align.json."""
    text = README.read_text()
    report = json.loads((RESULTS / "bench_align.json").read_text())
    for row in report["shapes"]:
        shape, m = row["shape"], row["median_s"]
        line = (f"| ({shape['T']}, {shape['N']}, {shape['C']}, {shape['S']}) | {m['native'] * 1e3:.2f} | "
                f"{m['numpy'] * 1e3:.1f} | {m['numpy_loop'] * 1e3:.1f} | {m['loss_forward'] * 1e3:.2f} | "
                f"{row['numpy_loop_over_native']:.1f}x | {row['native_over_loss_forward']:.2f} |")
        assert line in text, f"not in README.md: {line}"
        assert row["alignments_equal_to_native"] == {"numpy": True, "numpy_loop": True}
    first, second = report["shapes"]
    assert (f"The native engine is {first['numpy_loop_over_native']:.1f}x and {second['numpy_loop_over_native']:.1f}x "
            f"faster than the per-sample loop and takes {first['native_over_loss_forward']:.2f}x and "
            f"{second['native_over_loss_forward']:.2f}x the time" in " ".join(text.split()))
