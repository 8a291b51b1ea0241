"""benchmarks/bench_cpu.py: the report it writes (a tiny shape, so it runs in seconds)."""

import io
import json

import pytest

from benchmarks import bench_cpu as benchmark


def test_report_and_table(tmp_path):
    pytest.importorskip("torch")
    stream = io.StringIO()
    report = benchmark.run(shapes=[(20, 3, 5, 4)], repeats=2, memory=True, stream=stream)
    row = report["rows"][0]
    assert row["shape"] == [20, 3, 5, 4]
    for name in benchmark.IMPLEMENTATIONS:
        assert row[f"{name}_ms"] > 0 and row[f"{name}_peak_mb"] >= 0
    assert row["speedup"] == pytest.approx(row["torch_ms"] / row["deploy_ctc_ms"])
    assert row["numpy_backend_speedup"] == pytest.approx(row["torch_ms"] / row["numpy_backend_ms"])
    assert report["deploy_ctc_backend"] in ("native", "numpy")
    assert "done" in stream.getvalue()  # the progress display
    table = benchmark.format_table(report)
    assert "| (20, 3, 5, 4) |" in table and report["machine"]["cpu"] in table
    json.dumps(report)  # what `--output` writes must serialise


def test_main_rejects_a_bad_repeat_count(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err
