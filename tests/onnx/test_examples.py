"""export_examples/serve_scores.py: the batch scorer against torch eager on batches of varying T / N."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from deploy_ctc.demo import AcousticModel, AcousticModelWithLoss, export_with_loss, make_batch  # noqa: E402
from tests.onnx.helpers import native_library_or_skip  # noqa: E402
from tests.utils.oracles import Tolerance, assert_close  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "export_examples"
# Conv + LSTM in float32, evaluated by two runtimes; losses are ~10-100.
MODEL_PARITY = Tolerance(1e-5, 1e-4, "float32 network run by onnxruntime vs torch eager")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("native", [True, False])
def test_batch_scorer_matches_torch(tmp_path, native):
    serve = _load("serve_scores")
    torch.manual_seed(0)
    module = AcousticModelWithLoss(AcousticModel(hidden=16), reduction="none").eval()
    path = str(tmp_path / "scores.onnx")
    export_with_loss(module, make_batch(3, 64, seed=1), path, dynamo=False)
    if native:
        native_library_or_skip()
    scorer = serve.BatchScorer(path, native=native)
    for n, frames in [(5, 90), (1, 33)]:
        batch = make_batch(n, frames, seed=n)
        with torch.no_grad():
            want = module(*[torch.from_numpy(v) for v in batch.values()]).numpy()
        got = scorer.score(batch)
        assert got.shape == (n,)
        assert_close(got, want.astype(np.float64), np.float32, f"losses N={n} T={frames}", MODEL_PARITY)
