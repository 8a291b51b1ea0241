"""onnx.reference OpRun classes: ReferenceEvaluator(model, new_ops=reference_ops())."""

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx.reference import ReferenceEvaluator  # noqa: E402

import deploy_ctc.onnx as dco  # noqa: E402
from deploy_ctc.onnx.append import ctc_loss_model  # noqa: E402
from tests.onnx.helpers import grad_model, make_problem  # noqa: E402
from tests.utils.oracles import assert_close, torch_reference  # noqa: E402


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_grad(rng, reduction):
    problem = make_problem(rng, T=12, N=3, C=5, S=4, dtype=np.float64, blank=4)
    attrs = dict(blank=4, reduction=reduction)
    loss = ReferenceEvaluator(ctc_loss_model("float64", embed_functions=False, **attrs),
                              new_ops=dco.reference_ops()).run(None, problem.feeds())[0]
    d_loss = np.full(loss.shape, 0.7)
    grad = ReferenceEvaluator(grad_model("float64", **attrs), new_ops=dco.reference_ops()).run(
        None, {"d_loss": d_loss, **problem.feeds()})[0]
    want_loss, want_grad = torch_reference(*problem.args(), grad_output=d_loss, **attrs)
    assert_close(loss, want_loss, np.float64, "loss")
    assert_close(grad, want_grad, np.float64, "grad")


def test_defaults_come_from_the_schema(rng):
    """A node without attributes gets blank=0, reduction='mean', zero_infinity=0."""
    problem = make_problem(rng, T=12, N=3, C=5, S=4, dtype=np.float64)
    model = ctc_loss_model("float64", embed_functions=False)
    del model.graph.node[0].attribute[:]
    got = ReferenceEvaluator(model, new_ops=dco.reference_ops()).run(None, problem.feeds())[0]
    assert_close(got, torch_reference(*problem.args())[0], np.float64, "loss")


def test_bad_attribute_raises_api_error(rng):
    problem = make_problem(rng, T=6, N=1, C=3, S=1)
    model = ctc_loss_model(embed_functions=False)
    model.graph.node[0].attribute[1].CopyFrom(onnx.helper.make_attribute("reduction", "avg"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ReferenceEvaluator(model, new_ops=dco.reference_ops()).run(None, problem.feeds())
