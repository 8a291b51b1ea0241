"""deploy_ctc.training without onnxruntime-training: an ImportError that says what to install (runs everywhere)."""

import importlib
import sys

import pytest


def test_import_without_onnxruntime_training_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime.training", None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, "deploy_ctc.training", raising=False)
    with pytest.raises(ImportError, match=r"deploy_ctc.training needs onnxruntime-training .*deploy_ctc\[train\]"):
        importlib.import_module("deploy_ctc.training")
