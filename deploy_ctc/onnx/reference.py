"""onnx.reference implementations of deploy_ctc::CTCLoss / CTCLossGrad / CTCAlign (the executable spec).

``onnx.reference.ReferenceEvaluator(model, new_ops=deploy_ctc.onnx.reference_ops())`` runs models that use
the ops; the classes call deploy_ctc's Python API, so errors are raised as the API raises them.
"""

from __future__ import annotations

import numpy as np

from deploy_ctc.onnx._deps import require_onnx
from deploy_ctc.onnx.attributes import check_node_attributes
from deploy_ctc.onnx.schemas import DOMAIN, make_schemas


def reference_ops() -> list:
    """[CTCLoss, CTCLossGrad, CTCAlign]: ``onnx.reference.op_run.OpRun`` subclasses for ``new_ops=``.

    Each class is named exactly as its op, has ``op_domain = "deploy_ctc"`` and carries its OpSchema so
    the evaluator fills in attribute defaults.
    """
    require_onnx()
    from onnx.reference.op_run import OpRun

    import deploy_ctc

    loss_schema, grad_schema, align_schema = make_schemas()

    class CTCLoss(OpRun):
        op_domain = DOMAIN
        op_schema = loss_schema

        def _run(self, log_probs, targets, input_lengths, target_lengths,
                 blank=None, reduction=None, zero_infinity=None):
            blank, reduction, zero_infinity = check_node_attributes(blank, reduction, zero_infinity)
            loss = deploy_ctc.ctc_loss(log_probs, targets, input_lengths, target_lengths,
                                       blank=blank, reduction=reduction, zero_infinity=zero_infinity)
            return (np.asarray(loss, dtype=log_probs.dtype),)

    class CTCLossGrad(OpRun):
        op_domain = DOMAIN
        op_schema = grad_schema

        def _run(self, d_loss, log_probs, targets, input_lengths, target_lengths,
                 blank=None, reduction=None, zero_infinity=None):
            blank, reduction, zero_infinity = check_node_attributes(blank, reduction, zero_infinity)
            _, grad = deploy_ctc.ctc_loss_and_grad(log_probs, targets, input_lengths, target_lengths,
                                                   blank=blank, reduction=reduction,
                                                   zero_infinity=zero_infinity, grad_output=d_loss)
            return (np.asarray(grad, dtype=log_probs.dtype),)

    class CTCAlign(OpRun):
        op_domain = DOMAIN
        op_schema = align_schema

        def _run(self, log_probs, targets, input_lengths, target_lengths, blank=None):
            return deploy_ctc.forced_align(log_probs, targets, input_lengths, target_lengths, blank=blank)

    return [CTCLoss, CTCLossGrad, CTCAlign]
