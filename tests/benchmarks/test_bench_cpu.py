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
        assert row[f"{name}_ms"] > 0
    for name in benchmark.MEMORY_IMPLEMENTATIONS:
        assert row[f"{name}_peak_mb"] >= 0
    assert row["speedup"] == pytest.approx(row["torch_ms"] / row["deploy_ctc_ms"])
    assert row["numpy_backend_speedup"] == pytest.approx(row["torch_ms"] / row["numpy_backend_ms"])
    assert row["loss_speedup"] == pytest.approx(row["torch_loss_ms"] / row["deploy_ctc_loss_ms"])
    assert row["loss_over_loss_and_grad"] == pytest.approx(row["deploy_ctc_loss_ms"] / row["deploy_ctc_ms"])
    assert report["loss_geomean_speedup"] == pytest.approx(row["loss_speedup"])
    assert report["deploy_ctc_backend"] in ("native", "numpy")
    assert "done" in stream.getvalue()  # the progress display
    table = benchmark.format_table(report)
    assert "| (20, 3, 5, 4) |" in table and report["machine"]["cpu"] in table
    json.dumps(report)  # what `--output` writes must serialise


def test_geometric_means_are_over_the_main_shapes_only():
    pytest.importorskip("torch")
    report = benchmark.run(shapes=[(50, 16, 20, 30), (20, 3, 5, 4)], repeats=1, memory=False, stream=io.StringIO(),
                           numpy_backend=False)
    main, extra = report["rows"]
    assert report["geomean_shapes"] == [[50, 16, 20, 30]] and (50, 16, 20, 30) in benchmark.SHAPES
    assert report["geomean_speedup"] == pytest.approx(main["speedup"])
    assert report["loss_min_speedup"] == min(main["loss_speedup"], extra["loss_speedup"])
    assert "numpy_backend_ms" not in main and "NumPy" not in benchmark.format_table(report)


def test_extra_only_times_just_the_extra_shapes(monkeypatch, tmp_path, capsys):
    pytest.importorskip("torch")
    monkeypatch.setattr(benchmark, "EXTRA_SHAPES", [(12, 2, 5, 3)])
    output = tmp_path / "extra.json"
    assert benchmark.main(["--extra-only", "--no-memory", "--no-numpy", "--repeats", "1", "--output",
                           str(output)]) == 0
    report = json.loads(output.read_text())
    assert [row["shape"] for row in report["rows"]] == [[12, 2, 5, 3]] == report["geomean_shapes"]
