"""Export the acoustic model together with its CTC loss and evaluate the loss in onnxruntime.

    python export_examples/export_acoustic.py --output acoustic.onnx [--exporter torchscript]

Exactly ``deploy-ctc demo``: one ``deploy_ctc.onnx.export`` call (dynamic N, T, S) writes a model whose
``deploy_ctc::CTCLoss`` node carries its portable body; the loss is then evaluated with plain onnxruntime
and with deploy_ctc's native library and compared with torch eager.  See deploy_ctc/demo.py for the steps.
"""

import sys

from deploy_ctc.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
