"""deploy_ctc for ONNX: the deploy_ctc::CTCLoss / CTCLossGrad / CTCAlign ops and everything to run and export them.

- :func:`register_schemas` -- OpSchemas so onnx.checker / shape inference validate models using the ops.
- :func:`session_options` -- onnxruntime SessionOptions running the ops with deploy_ctc's native library.
- :func:`library_path` -- that custom-op library (built on first use), for any ONNX Runtime host.
- :func:`reference_ops` -- onnx.reference OpRun classes for ``ReferenceEvaluator(new_ops=...)``.
- :func:`export` -- torch.onnx.export for modules that call ``F.ctc_loss`` / ``nn.CTCLoss``.
- :func:`append_ctc_loss` -- add the loss to an already exported ONNX model.
- :func:`append_forced_align` -- add the forced alignment (deploy_ctc::CTCAlign) to an ONNX model.

Nodes carry a portable model-local function body (standard ONNX ops) by default, so plain
onnxruntime runs them without the library.  Every module imports onnx / onnxruntime / torch lazily;
using them needs ``pip install deploy_ctc[onnx]``.
"""

from deploy_ctc.onnx import schemas
from deploy_ctc.onnx.append import append_ctc_loss, append_forced_align, ctc_loss_model, forced_align_model
from deploy_ctc.onnx.export import export
from deploy_ctc.onnx.native_library import library_path
from deploy_ctc.onnx.reference import reference_ops
from deploy_ctc.onnx.runtime import session_options
from deploy_ctc.onnx.schemas import DOMAIN, register_schemas

__all__ = [
    "DOMAIN",
    "append_ctc_loss",
    "append_forced_align",
    "ctc_loss_model",
    "export",
    "forced_align_model",
    "library_path",
    "reference_ops",
    "register_schemas",
    "schemas",
    "session_options",
]

