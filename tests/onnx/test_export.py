"""deploy_ctc.onnx.export with both torch exporters: dynamic shapes, onnxruntime round trips, no leaks."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import deploy_ctc.onnx as dco  # noqa: E402
from tests.onnx.helpers import PORTABLE, session  # noqa: E402
from tests.utils.oracles import assert_close, random_targets  # noqa: E402

NAMES = ["features", "targets", "input_lengths", "target_lengths"]


class TinyCTC(torch.nn.Module):
    """Linear + log_softmax over (T, N, 6) features, then nn.CTCLoss or F.ctc_loss."""

    def __init__(self, reduction="mean", blank=0, use_module=False, zero_infinity=False):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(6, 5)
        self.loss = (torch.nn.CTCLoss(blank=blank, reduction=reduction, zero_infinity=zero_infinity)
                     if use_module else None)
        self.reduction, self.blank, self.zero_infinity = reduction, blank, zero_infinity

    def forward(self, features, targets, input_lengths, target_lengths):
        log_probs = self.linear(features).log_softmax(-1)
        if self.loss is not None:
            return self.loss(log_probs, targets, input_lengths, target_lengths)
        return torch.nn.functional.ctc_loss(log_probs, targets, input_lengths, target_lengths,
                                            blank=self.blank, reduction=self.reduction,
                                            zero_infinity=self.zero_infinity)


def _batch(rng, T, N, S, blank=0):
    tl = rng.integers(0, S + 1, N)
    tl[0] = S
    il = rng.integers(np.minimum(2 * tl + 1, T), T + 1)
    il[0] = T
    return [rng.standard_normal((T, N, 6)).astype(np.float32), random_targets(rng, tl, 5, blank=blank, S=S),
            il.astype(np.int64), tl.astype(np.int64)]


def _export(module, rng, tmp_path, dynamo, blank=0, **kwargs):
    example = [torch.from_numpy(a) for a in _batch(rng, 10, 3, 4, blank)]
    if dynamo:
        t, n, s = torch.export.Dim("T"), torch.export.Dim("N"), torch.export.Dim("S")
        kwargs.setdefault("dynamic_shapes", ({0: t, 1: n}, {0: n, 1: s}, {0: n}, {0: n}))
    else:
        kwargs.setdefault("dynamic_axes", {"features": {0: "T", 1: "N"}, "targets": {0: "N", 1: "S"},
                                           "input_lengths": {0: "N"}, "target_lengths": {0: "N"}})
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation / export chatter
        proto = dco.export(module, tuple(example), path, dynamo=dynamo, input_names=NAMES,
                           output_names=["loss"], **kwargs)
    assert path.exists()
    assert [n.op_type for n in proto.graph.node if n.domain == "deploy_ctc"] == ["CTCLoss"]
    return proto


def _check_runs(module, proto, rng, native=False, blank=0):
    """Run at two batch shapes different from the export example and compare with torch eager."""
    sess = session(proto, native=native)
    for T, N, S in [(13, 4, 5), (7, 2, 2)]:
        batch = _batch(rng, T, N, S, blank)
        got = sess.run(None, dict(zip(NAMES, batch)))[0]
        with torch.no_grad():
            want = module(*[torch.from_numpy(a) for a in batch]).numpy()
        assert_close(got, want.astype(np.float64), np.float32, f"loss at T={T} N={N} S={S}",
                     PORTABLE[np.dtype(np.float32)])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_export_runs_in_plain_onnxruntime(rng, tmp_path, dynamo):
    module = TinyCTC("mean")
    proto = _export(module, rng, tmp_path, dynamo)
    dco.register_schemas()
    onnx.checker.check_model(proto, full_check=True)
    assert [f.name for f in proto.functions] == ["CTCLoss"]
    _check_runs(module, proto, rng)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_export_without_bodies_runs_with_native_library(rng, tmp_path, dynamo):
    module = TinyCTC("none", blank=4, use_module=True, zero_infinity=True)
    proto = _export(module, rng, tmp_path, dynamo, embed_functions=False)
    assert len(proto.functions) == 0
    node = next(n for n in proto.graph.node if n.domain == "deploy_ctc")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == {
        "blank": 4, "reduction": b"none", "zero_infinity": 1}
    _check_runs(module, proto, rng, native=True, blank=4)


def test_nothing_leaks_after_export(rng, tmp_path):
    """Both registrations are scoped: torch fails on ctc_loss exactly as before the call."""
    module = TinyCTC()
    example = tuple(torch.from_numpy(a) for a in _batch(rng, 10, 3, 4))

    def torch_behaviour():
        outcomes = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for attempt in (lambda: torch.export.export(module, example),
                            lambda: torch.onnx.export(module, example, str(tmp_path / "plain.onnx"),
                                                      dynamo=False)):
                try:
                    attempt()
                    outcomes.append("ok")
                except Exception as exc:  # noqa: BLE001 -- comparing what torch raises
                    outcomes.append(type(exc).__name__)
        return outcomes

    before = torch_behaviour()
    assert "ok" not in before
    _export(module, rng, tmp_path, dynamo=True)
    _export(module, rng, tmp_path, dynamo=False)
    assert torch_behaviour() == before


def test_low_opset_with_bodies_is_refused(rng, tmp_path):
    with pytest.raises(ValueError, match="opset_version must be >= 18"):
        _export(TinyCTC(), rng, tmp_path, dynamo=False, opset_version=17)


class TupleLengths(torch.nn.Module):
    """ctc_loss with lengths given as Python tuples (the aten::ctc_loss.IntList overload)."""

    def __init__(self):
        super().__init__()
        self.inner = TinyCTC("sum")

    def forward(self, features, targets):
        log_probs = self.inner.linear(features).log_softmax(-1)
        return torch.nn.functional.ctc_loss(log_probs, targets, (10, 8, 6), (4, 2, 3), reduction="sum")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_int_list_lengths(rng, tmp_path, dynamo):
    module = TupleLengths()
    features = _batch(rng, 10, 3, 4)[0]
    targets = random_targets(rng, [4, 2, 3], 5, S=4)  # the module's fixed target lengths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = dco.export(module, (torch.from_numpy(features), torch.from_numpy(targets)), None, dynamo=dynamo,
                           input_names=["features", "targets"], output_names=["loss"])
    got = session(proto).run(None, {"features": features, "targets": targets})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(features), torch.from_numpy(targets)).numpy()
    assert_close(got, want.astype(np.float64), np.float32, "loss", PORTABLE[np.dtype(np.float32)])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_export_of_deploy_ctc_torch_loss(rng, tmp_path, dynamo):
    """A module using deploy_ctc.torch.CTCLoss (the deploy_ctc::ctc_loss torch op) exports to one CTCLoss node
    that computes torch.nn.CTCLoss's loss."""
    import deploy_ctc.torch

    reference = TinyCTC("none", blank=4, use_module=True, zero_infinity=True)
    module = TinyCTC("none", blank=4, use_module=True, zero_infinity=True)  # same seeded weights
    module.loss = deploy_ctc.torch.CTCLoss(blank=4, reduction="none", zero_infinity=True)
    proto = _export(module, rng, tmp_path, dynamo, blank=4)  # deploy_ctc validates the traced example
    node = next(n for n in proto.graph.node if n.domain == "deploy_ctc")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == {
        "blank": 4, "reduction": b"none", "zero_infinity": 1}
    _check_runs(reference, proto, rng, blank=4)
