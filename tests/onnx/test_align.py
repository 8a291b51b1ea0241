"""deploy_ctc::CTCAlign: the portable body in plain onnxruntime against brute force and deploy_ctc.forced_align,
its schema, its onnx.reference twin, and append_forced_align."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import deploy_ctc  # noqa: E402
import deploy_ctc.onnx as dco  # noqa: E402
from tests.onnx.helpers import make_problem, session  # noqa: E402
from tests.utils.oracles import brute_force_alignment, log_softmax  # noqa: E402


def _run(model, lp, targets, il, tl):
    feeds = {"log_probs": lp, "targets": np.asarray(targets, dtype=np.int64),
             "input_lengths": np.asarray(il, dtype=np.int64), "target_lengths": np.asarray(tl, dtype=np.int64)}
    return session(model).run(["alignment", "scores"], feeds)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("blank", [0, 2])
def test_portable_body_matches_brute_force_with_ties(rng, dtype, blank):
    T, N, C = 6, 8, 4
    lp = -rng.choice([0.5, 1.0, 2.0], size=(T, N, C)).astype(dtype)  # exact sums: many ties
    lp[2, 1, 1] = np.nan
    labels = [c for c in range(C) if c != blank]
    targets = rng.choice(labels, size=(N, 3))
    targets[::3, 1] = targets[::3, 0]
    il = np.array([6, 6, 5, 0, 6, 3, 6, 2])
    tl = np.array([3, 2, 1, 1, 0, 2, 3, 2])
    alignment, scores = _run(dco.forced_align_model(dtype, blank=blank), lp, targets, il, tl)
    assert alignment.dtype == np.int64 and scores.dtype == dtype
    for n in range(N):
        path, _ = brute_force_alignment(lp[: il[n], n], targets[n, : tl[n]], blank)
        if path is None:
            np.testing.assert_array_equal(alignment[:, n], blank)
            np.testing.assert_array_equal(scores[: il[n], n], -np.inf)
        else:
            np.testing.assert_array_equal(alignment[: il[n], n], path)
            np.testing.assert_array_equal(scores[: il[n], n], lp[np.arange(il[n]), n, path])
        np.testing.assert_array_equal(alignment[il[n]:, n], blank)
        np.testing.assert_array_equal(scores[il[n]:, n], 0.0)


def test_portable_body_matches_the_python_api(rng):
    p = make_problem(rng, T=40, N=5, C=9, S=12, dtype=np.float32, repeat_prob=0.4)
    alignment, scores = _run(dco.forced_align_model("float32"), *p.args())
    expected = deploy_ctc.forced_align(*p.args())
    np.testing.assert_array_equal(alignment, expected[0])
    np.testing.assert_array_equal(scores, expected[1])


def test_reference_op_and_schema(rng):
    dco.register_schemas()
    model = dco.forced_align_model("float64", blank=1, embed_functions=False)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {o.name: o.type.tensor_type.elem_type for o in inferred.graph.output}
    assert types == {"alignment": onnx.TensorProto.INT64, "scores": onnx.TensorProto.DOUBLE}
    from onnx.reference import ReferenceEvaluator

    lp = log_softmax(rng.normal(size=(7, 2, 4)))
    feeds = {"log_probs": lp, "targets": np.array([[2, 3], [0, 0]]), "input_lengths": np.array([7, 5]),
             "target_lengths": np.array([2, 1])}
    got = ReferenceEvaluator(model, new_ops=dco.reference_ops()).run(None, feeds)
    expected = deploy_ctc.forced_align(*feeds.values(), blank=1)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_append_to_a_model_emitting_logits(rng):
    from onnx import helper

    graph = helper.make_graph([helper.make_node("LogSoftmax", ["logits"], ["lp"], axis=2)], "acoustic",
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["T", "N", 6])],
                              [helper.make_tensor_value_info("lp", onnx.TensorProto.FLOAT, ["T", "N", 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    served = dco.append_forced_align(model, "lp")
    assert [o.name for o in served.graph.output] == ["lp", "alignment", "scores"]
    logits = rng.normal(size=(12, 3, 6)).astype(np.float32)
    feeds = {"logits": logits, "targets": np.array([[1, 2, 3], [4, 4, 0], [5, 0, 0]]),
             "input_lengths": np.array([12, 9, 11]), "target_lengths": np.array([3, 2, 1])}
    lp, alignment, scores = session(served).run(None, feeds)
    expected = deploy_ctc.forced_align(lp, *list(feeds.values())[1:])
    np.testing.assert_array_equal(alignment, expected[0])
    np.testing.assert_array_equal(scores, expected[1])
    with pytest.raises(ValueError, match="alignment_name 'lp' is already a value"):
        dco.append_forced_align(model, "lp", alignment_name="lp")
    with pytest.raises(TypeError, match="blank must be an integer, got True"):
        dco.append_forced_align(model, "lp", blank=True)
