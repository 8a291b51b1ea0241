"""Lazy imports of the optional ONNX packages, with an ImportError naming the extra to install."""

from __future__ import annotations

import importlib

_HINT = "pip install deploy_ctc[onnx]"


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"deploy_ctc.onnx needs {module!r}: {_HINT}") from exc


def require_onnx():
    """The ``onnx`` module (with ``onnx.defs``, ``onnx.helper`` loaded)."""
    onnx = _require("onnx")
    importlib.import_module("onnx.defs")
    importlib.import_module("onnx.helper")
    return onnx


def require_onnxruntime():
    """The ``onnxruntime`` module."""
    return _require("onnxruntime")


def require_torch():
    """The ``torch`` module."""
    return _require("torch")
