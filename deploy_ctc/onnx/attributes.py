"""Node attributes of deploy_ctc::CTCLoss / CTCLossGrad, checked with the Python API's messages."""

from __future__ import annotations


def check_node_attributes(blank, reduction, zero_infinity) -> tuple[int, str, bool]:
    """Validate ONNX attribute values; returns (blank: int, reduction: str, zero_infinity: bool).

    ONNX stores ``zero_infinity`` as an int (0/1) and strings may arrive as bytes; both go to
    ``deploy_ctc.validation.check_options``, so the messages are the Python API's.

    Raises:
        ValueError / TypeError: as ``deploy_ctc.ctc_loss`` for the same option values.
    """
    from deploy_ctc.validation import check_options

    if isinstance(reduction, bytes):
        reduction = reduction.decode("utf-8", "replace")
    return check_options(blank, reduction, zero_infinity)


def node_attributes(blank=0, reduction="mean", zero_infinity=False) -> dict:
    """Checked attribute values as written on a node: every attribute explicit (a reader needs no schema defaults)."""
    blank, reduction, zero_infinity = check_node_attributes(blank, reduction, zero_infinity)
    return {"blank": blank, "reduction": reduction, "zero_infinity": int(zero_infinity)}
