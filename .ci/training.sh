#!/usr/bin/env bash
# On-device fine-tuning checks, in their own environment.
#
# onnxruntime-training-cpu 1.19.2 (the package's last release) provides the `onnxruntime` module itself, so
# it cannot share a venv with the onnxruntime package the rest of the suite uses. This script builds that
# venv from nothing but the machine image (Python 3.11 and the package registries), installs the project
# into it, runs tests/training, the README's code blocks, the native ONNX Runtime library's tests (1.19.2 is the
# oldest onnxruntime the library supports) and the fine-tuning example. Called by .ci/run as `bash .ci/training.sh`.
#
# Environment: TRAIN_VENV (default .venv-train, recreated each run), PYTHON (default python3.11).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TRAIN_VENV:-.venv-train}"
python="${PYTHON:-python3.11}"

echo "== training venv: $venv ($("$python" --version))"
"$python" -m venv --clear "$venv"
# The train extra pins onnxruntime-training-cpu; `import onnxruntime.training` also needs torch (the CPU
# wheel: plain `torch` pulls a CUDA build); tests/conftest.py needs hypothesis. No other extra: one that brought
# the onnxruntime package would overwrite the training build's `onnxruntime` module. The native custom-op
# library builds from $DEPLOY_CTC_ORT_INCLUDE (.ci/run exports it; see .ci/ort_headers.sh).
pip_log="$(mktemp)"
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[train]" \
    "onnxruntime-training-cpu==1.19.2" "torch==2.13.0" pytest hypothesis \
    >"$pip_log" 2>&1; then
    cat "$pip_log"
    exit 1
fi
rm -f "$pip_log"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import sys

import onnxruntime
import onnxruntime.training  # noqa: F401 -- fails here, not in the tests, if torch is missing

if onnxruntime.__version__ != "1.19.2":
    sys.exit(f"the onnxruntime module is {onnxruntime.__version__}, not the 1.19.2 training build")
names = ["onnxruntime-training-cpu", "onnx", "torch", "numpy"]
print("  " + ", ".join(f"{name} {md.version(name)}" for name in names))
PY

echo "== tests/training, the README's blocks that need onnxruntime-training, the native library in ORT 1.19.2"
"$venv/bin/python" -m pytest tests/training tests/test_readme.py tests/onnx/test_native_library.py -q \
    -p no:cacheprovider

echo "== export_examples/finetune_ort.py (native custom-op library)"
"$venv/bin/python" export_examples/finetune_ort.py
echo "== export_examples/finetune_ort.py --portable (ONNX function bodies, no custom-op library)"
"$venv/bin/python" export_examples/finetune_ort.py --portable
