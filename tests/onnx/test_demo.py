"""``deploy-ctc demo`` (deploy_ctc.demo.run) end to end on a small synthetic batch, with the TorchScript exporter
and a named output (tests/test_cli.py runs the default: the dynamo exporter and a temporary file)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from deploy_ctc import demo  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_demo_writes_model_and_reports_parity(tmp_path, capsys):
    out = tmp_path / "demo.onnx"
    assert demo.run(output=out, batch=3, frames=40, exporter="torchscript", repeats=1) == 0
    text = capsys.readouterr().out
    assert "parity: OK" in text and "onnxruntime + deploy_ctc library" in text
    assert f"model written to {out}" in text
    model = onnx.load(str(out))
    assert [f.name for f in model.functions] == ["CTCLoss"]


def test_make_batch_targets_fit_their_inputs():
    batch = demo.make_batch(16, 120, seed=3)
    assert batch["features"].shape == (16, 120, demo.N_MELS) and batch["feature_lengths"].max() == 120
    out_lengths = (batch["feature_lengths"] + 1) // 2
    assert (2 * batch["target_lengths"] + 1 <= out_lengths).all()  # feasible even with repeats
    assert (batch["targets"] >= 1).all() and (batch["targets"] < demo.N_CLASSES).all()
