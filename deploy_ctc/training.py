"""On-device fine-tuning: ONNX Runtime training artifacts whose loss is ``deploy_ctc::CTCLoss``.

Workflow (server side, in an environment with ``onnxruntime-training``)::

    model (T, N, C) log-probs  --generate_artifacts-->  training_model.onnx   forward + CTCLoss + gradient graph
                                                         eval_model.onnx       forward + CTCLoss
                                                         optimizer_model.onnx  AdamW / SGD step
                                                         checkpoint            parameters (+ optimizer state)

then, on the device, :func:`open_training` (``onnxruntime.training.api`` CheckpointState / Module / Optimizer)
runs ``loss = module(features, targets, input_lengths, target_lengths)``, ``optimizer.step()``,
``module.lazy_reset_grad()`` and finally :func:`export_inference_model` writes the trained model without the loss.

ONNX Runtime's gradient builder knows nothing about a custom op: :func:`generate_artifacts` registers the
gradient definition ``CTCLoss -> CTCLossGrad(d_loss, log_probs, targets, input_lengths, target_lengths)``
with it. That registry copies no attributes from the forward node (its attribute values are constants, and
the first registration of an op wins for the whole process), so each ``CTCLossGrad`` node receives the
``blank`` / ``reduction`` / ``zero_infinity`` of its ``CTCLoss`` node after the graph is built.

The training graph's loss must be a scalar: ORT seeds the backward pass with a scalar 1. With
``reduction="none"`` the loss block therefore returns ``sum_n loss[n]`` (``CTCLossGrad`` then receives
``d_loss = ones(N)``: torch's ``loss.sum().backward()``).

onnxruntime-training 1.19.2 (Sep 2024) is the last release of the package; it accepts models of IR version
<= 10 and opsets <= 21, while onnx >= 1.23 writes IR 14. The artifacts are written with IR 10. Its gradient
builder also swaps every LSTM / GRU for a training variant whose kernel runs forward directions only; the
ones no gradient flows through (a frozen bidirectional encoder) are turned back into standard ops.

This module imports only where ``onnxruntime-training`` (which provides the ``onnxruntime`` module itself,
so it lives in its own environment) and torch (needed by ``import onnxruntime.training``) are installed.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

try:
    import onnx
    from onnxruntime.capi import _pybind_state as _ort_c
    from onnxruntime.training import artifacts as _ort_artifacts
    from onnxruntime.training import onnxblock as _onnxblock
    from onnxruntime.training.onnxblock import _training_graph_utils
except ImportError as exc:
    raise ImportError(
        "deploy_ctc.training needs onnxruntime-training (and torch, which `import onnxruntime.training` "
        "requires): pip install deploy_ctc[train] in a separate environment -- onnxruntime-training provides "
        f"the `onnxruntime` module itself and conflicts with the onnxruntime package ({exc})"
    ) from exc

from deploy_ctc.onnx import schemas as _schemas
from deploy_ctc.validation import check_options

__all__ = ["CTCLossBlock", "TrainingArtifacts", "export_inference_model", "generate_artifacts", "open_training"]

# What onnxruntime-training 1.19.2 (its last release) loads.
MAX_IR_VERSION = 10
MAX_ONNX_OPSET = 21

OPTIMIZERS = {"AdamW": _ort_artifacts.OptimType.AdamW, "SGD": _ort_artifacts.OptimType.SGD}

# The loss block's extra graph inputs, in CTCLoss's input order after log_probs.
TARGETS, INPUT_LENGTHS, TARGET_LENGTHS = "targets", "input_lengths", "target_lengths"

_FILES = {
    "training_model": "training_model.onnx",
    "eval_model": "eval_model.onnx",
    "optimizer_model": "optimizer_model.onnx",
    "checkpoint": "checkpoint",
}


class CTCLossBlock(_onnxblock.Block):
    """onnxblock loss block: ``CTCLoss(log_probs, targets, input_lengths, target_lengths)`` on model outputs.

    Adds the graph inputs ``targets`` (N, S) int64 and ``target_lengths`` (N,) int64, and ``input_lengths``
    (N,) int64 when the model does not compute them (each only if the graph lacks it), then one
    ``deploy_ctc::CTCLoss`` node carrying every attribute explicitly.

    Args:
        blank, reduction, zero_infinity: as ``torch.nn.CTCLoss``.

    Calling the block with the name of a (T, N, C) float log-probability output, and optionally the name
    of a model output holding the (N,) input lengths (e.g. frame counts after subsampling), returns the
    name of the scalar training loss: the CTC loss for "mean" / "sum", ``sum_n loss[n]`` for "none".

    Raises:
        TypeError / ValueError: bad options (as ``deploy_ctc.ctc_loss``); a log_probs output that is not
            a rank-3 float/double tensor.
    """

    def __init__(self, blank=0, reduction="mean", zero_infinity=False):
        super().__init__()
        self.blank, self.reduction, self.zero_infinity = check_options(blank, reduction, zero_infinity)

    def build(self, log_probs_name: str, input_lengths_name: str | None = None) -> str:
        graph = self.base.graph
        lp_type = _output_tensor_type(self.base, log_probs_name)
        elem_type = lp_type.elem_type
        batch_dim = lp_type.shape.dim[1]  # N of (T, N, C)

        new_inputs = {TARGETS: [batch_dim, "S"], TARGET_LENGTHS: [batch_dim]}
        if input_lengths_name is None:
            input_lengths_name = INPUT_LENGTHS
            new_inputs[INPUT_LENGTHS] = [batch_dim]
        existing = {value.name for value in graph.input}
        for name in (TARGETS, INPUT_LENGTHS, TARGET_LENGTHS):
            if name in new_inputs and name not in existing:
                graph.input.append(_int64_input(name, new_inputs[name]))

        if not any(opset.domain == _schemas.DOMAIN for opset in self.base.opset_import):
            self.base.opset_import.append(onnx.helper.make_opsetid(_schemas.DOMAIN, _schemas.OPSET_VERSION))

        loss_name = _fresh_name(self.base, "ctc_loss")
        graph.node.append(onnx.helper.make_node(
            "CTCLoss", [log_probs_name, TARGETS, input_lengths_name, TARGET_LENGTHS], [loss_name],
            name=_onnxblock._graph_utils.generate_graph_name("CTCLoss"), domain=_schemas.DOMAIN,
            blank=self.blank, reduction=self.reduction, zero_infinity=int(self.zero_infinity),
        ))
        # onnx shape inference cannot see through an unregistered custom op: declare the loss type.
        loss_shape = [batch_dim] if self.reduction == "none" else []
        graph.value_info.append(_tensor_value_info(loss_name, elem_type, loss_shape))
        if self.reduction != "none":
            return loss_name

        # A training loss is a scalar (ORT seeds the backward pass with a scalar 1): train on sum_n loss[n].
        total_name = _fresh_name(self.base, "ctc_loss_sum")
        graph.node.append(onnx.helper.make_node(
            "ReduceSum", [loss_name], [total_name], keepdims=0,
            name=_onnxblock._graph_utils.generate_graph_name("ReduceSum")))
        graph.value_info.append(_tensor_value_info(total_name, elem_type, []))
        return total_name


def _fresh_name(model, name: str) -> str:
    """``name``, or a generated variant when the graph already uses it."""
    if _onnxblock._graph_utils.node_arg_exists(model, name):
        return _onnxblock._graph_utils.generate_graph_name(name)
    return name


def _output_tensor_type(model, name: str):
    """The tensor type of graph output ``name``, checked to be a rank-3 float/double tensor."""
    outputs = {value.name: value for value in model.graph.output}
    if name not in outputs:
        raise ValueError(f"log_probs: the model has no graph output {name!r}; outputs: {sorted(outputs)}")
    tensor_type = outputs[name].type.tensor_type
    allowed = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    if tensor_type.elem_type not in allowed:
        got = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ValueError(f"log_probs: output {name!r} must be a float or double tensor, got {got}")
    if not tensor_type.HasField("shape") or len(tensor_type.shape.dim) != 3:
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else "unknown"
        raise ValueError(f"log_probs: output {name!r} must have shape (T, N, C), got rank {rank}")
    return tensor_type


def _int64_input(name: str, dims: list):
    value = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [None] * len(dims))
    _copy_dims(value, dims)
    return value


def _tensor_value_info(name: str, elem_type: int, dims: list):
    value = onnx.helper.make_tensor_value_info(name, elem_type, [None] * len(dims))
    _copy_dims(value, dims)
    return value


def _copy_dims(value, dims: list) -> None:
    """Set ``value``'s dims from TensorShapeProto.Dimension objects or dim_param strings."""
    for target, dim in zip(value.type.tensor_type.shape.dim, dims):
        if isinstance(dim, str):
            target.dim_param = dim
        else:
            target.CopyFrom(dim)


@dataclass(frozen=True)
class TrainingArtifacts:
    """Paths of the files :func:`generate_artifacts` wrote.

    Attributes:
        training_model: forward + CTCLoss + gradient graph (+ gradient accumulation).
        eval_model: forward + CTCLoss.
        optimizer_model: one optimizer step over the trainable parameters.
        checkpoint: parameters (trainable and frozen) for ``CheckpointState.load_checkpoint``.
        needs_library: True when CTCLoss / CTCLossGrad run in deploy_ctc's native custom-op library (the
            device registers that library file: :func:`open_training`, or ``RegisterCustomOpsLibrary_V2``
            from the C/C++ training API); False when the models carry the portable ONNX function bodies.
        log_probs: name of the model output holding the (T, N, C) log-probabilities.
        input_lengths: name of the model output holding the (N,) CTC input lengths, or None when they are
            the graph input ``input_lengths``.
    """

    training_model: pathlib.Path
    eval_model: pathlib.Path
    optimizer_model: pathlib.Path
    checkpoint: pathlib.Path
    needs_library: bool
    log_probs: str
    input_lengths: str | None = None

    @classmethod
    def in_directory(cls, directory) -> "TrainingArtifacts":
        """The artifacts written into ``directory`` (e.g. after copying them to a device).

        The output names are read from the eval model's CTCLoss node.

        Raises:
            FileNotFoundError: one of the four artifacts is missing.
            ValueError: the eval model holds no deploy_ctc::CTCLoss node.
        """
        directory = pathlib.Path(directory)
        paths = {key: directory / name for key, name in _FILES.items()}
        missing = [str(path) for path in paths.values() if not path.exists()]
        if missing:
            raise FileNotFoundError(f"artifact_directory {str(directory)!r} lacks {missing}")
        eval_model = onnx.load(os.fspath(paths["eval_model"]))
        losses = _ctc_nodes(eval_model, "CTCLoss")
        if not losses:
            raise ValueError(f"artifact_directory: {paths['eval_model']} holds no {_schemas.DOMAIN}::CTCLoss node")
        log_probs, _, input_lengths, _ = losses[0].input
        graph_inputs = {value.name for value in eval_model.graph.input}
        has_bodies = any(function.domain == _schemas.DOMAIN for function in eval_model.functions)
        return cls(**paths, needs_library=not has_bodies, log_probs=log_probs,
                   input_lengths=None if input_lengths in graph_inputs else input_lengths)


def generate_artifacts(model: onnx.ModelProto | str | os.PathLike, requires_grad: Sequence[str],
                       frozen_params: Sequence[str] | None = None, optimizer: str = "AdamW",
                       artifact_directory: str | os.PathLike | None = None, blank: int = 0, reduction: str = "mean",
                       zero_infinity: bool = False, *, log_probs: str | None = None, input_lengths: str | None = None,
                       portable: bool = False) -> TrainingArtifacts:
    """Write ONNX Runtime training artifacts for ``model`` with a CTC loss on its log-probabilities.

    Args:
        model: ``onnx.ModelProto`` or path of an ONNX model whose output ``log_probs`` (T, N, C) holds
            log-probabilities (e.g. a LogSoftmax over C); parameters are its initializers. Not modified.
        requires_grad: names of the initializers to train (non-empty).
        frozen_params: names of initializers kept as parameters but not trained.
        optimizer: "AdamW" or "SGD".
        artifact_directory: output folder (created if missing); the current directory when None.
        blank, reduction, zero_infinity: the CTC loss options, as ``torch.nn.CTCLoss``.
        log_probs: name of the log-probability output; defaults to the model's only output.
        input_lengths: name of a model output holding the (N,) int64 CTC input lengths (e.g. frame counts
            after subsampling); None adds a graph input ``input_lengths`` instead.
        portable: False: CTCLoss / CTCLossGrad run in deploy_ctc's native custom-op library
            (:func:`deploy_ctc.onnx.library_path`; generation builds it, the device registers the file). True:
            the models carry the portable model-local function bodies (standard ONNX ops,
            ``deploy_ctc.onnx.functions``) and run in onnxruntime-training alone, slower; needs opset >= 18.

    Returns:
        :class:`TrainingArtifacts` naming the four written artifacts (models at IR version 10).

    Raises:
        TypeError / ValueError: bad options; unknown, non-float or doubly listed parameter names; a model
            opset above 21 (what onnxruntime-training 1.19.2 runs), or below 18 with ``portable``; no such /
            ambiguous log_probs output.
        deploy_ctc.onnx.native_library.NativeUnavailable: ``portable`` is False and the native library cannot
            be built here (the message says why).
    """
    blank, reduction, zero_infinity = check_options(blank, reduction, zero_infinity)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    model = _load_model(model)
    requires_grad, frozen_params = _check_parameters(model, requires_grad, frozen_params)
    log_probs = _log_probs_name(model, log_probs)
    loss_inputs = [log_probs]
    if input_lengths is not None:
        _check_output(model, input_lengths, "input_lengths")
        loss_inputs.append(input_lengths)

    if portable:
        _attach_function_bodies(model)
        library = None
    else:
        library = _native_library()
    _register_gradient()
    directory = pathlib.Path(os.getcwd() if artifact_directory is None else artifact_directory)
    directory.mkdir(parents=True, exist_ok=True)

    with _quiet_gradient_builder():
        _ort_artifacts.generate_artifacts(
            model, requires_grad=requires_grad, frozen_params=frozen_params,
            loss=CTCLossBlock(blank, reduction, zero_infinity), optimizer=OPTIMIZERS[optimizer],
            artifact_directory=directory, custom_op_library=library, loss_input_names=loss_inputs,
        )
    result = TrainingArtifacts(**{key: directory / name for key, name in _FILES.items()},
                               needs_library=not portable, log_probs=log_probs, input_lengths=input_lengths)
    _finish_model(result.training_model, training_graph=True)
    _finish_model(result.eval_model)
    _finish_model(result.optimizer_model)
    return result


def open_training(artifacts: TrainingArtifacts, library: str | os.PathLike | None = None) -> tuple[Any, Any, Any]:
    """Load ``artifacts`` with ``onnxruntime.training.api``.

    Args:
        artifacts: what :func:`generate_artifacts` wrote (or :meth:`TrainingArtifacts.in_directory`).
        library: path of deploy_ctc's native custom-op library for artifacts that need it (e.g. a copy built
            for the device); None builds or finds it with :func:`deploy_ctc.onnx.library_path`.

    Returns:
        ``(state, module, optimizer)``: CheckpointState, Module (training and eval models) and Optimizer;
        the module starts in training mode.

    Raises:
        deploy_ctc.onnx.native_library.NativeUnavailable: the artifacts need the native library, none was
            given and it cannot be built here.
    """
    import onnxruntime
    from onnxruntime.training import api

    options = onnxruntime.SessionOptions()
    if artifacts.needs_library:
        options.register_custom_ops_library(os.fspath(library) if library is not None else _native_library())
    else:
        # onnxruntime 1.19.2's GatherSliceToSplitFusion (an extended-level transformer) names every node it
        # creates "/GatherSliceToSplitFusion/"; the inlined bodies hold several matches and the session
        # then refuses "two nodes with same node name". Basic-level optimizations are unaffected.
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    state = api.CheckpointState.load_checkpoint(os.fspath(artifacts.checkpoint))
    module = api.Module(os.fspath(artifacts.training_model), state, os.fspath(artifacts.eval_model),
                        session_options=options)
    return state, module, api.Optimizer(os.fspath(artifacts.optimizer_model), module)


def export_inference_model(state: Any, artifacts: TrainingArtifacts, path: str | os.PathLike) -> None:
    """Write the inference model: the eval model cut at its log-probabilities, parameters from ``state``.

    Its outputs are ``artifacts.log_probs`` and, when the model computes them, ``artifacts.input_lengths``.

    ``Module.export_model_for_inferencing`` cannot do this in onnxruntime-training 1.19.2 when the eval model
    holds a custom op served by a custom-op library: it re-resolves the graph without the library's schemas and
    fails with "deploy_ctc:CTCLoss(-1) is not a registered function/op". Only standard ops remain here.

    Args:
        state: the ``CheckpointState`` the module trained (parameters are read from it).
        artifacts: the artifacts the module was opened from.
        path: where to write the model (IR version of the eval model, parameters as initializers).
    """
    model = onnx.load(os.fspath(artifacts.eval_model))
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    output_names = [artifacts.log_probs] + ([artifacts.input_lengths] if artifacts.input_lengths else [])
    needed, stack = set(), list(output_names)
    while stack:  # every value the outputs depend on
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producer:
            stack.extend(producer[name].input)
    nodes = [node for node in graph.node if needed.intersection(node.output)]
    parameters = {name for name, _ in state.parameters}
    initializers = [onnx.numpy_helper.from_array(state.parameters[name].data, name)
                    for name in sorted(parameters & needed)]
    initializers += [init for init in graph.initializer if init.name in needed and init.name not in parameters]
    inputs = [value for value in graph.input if value.name in needed and value.name not in parameters]
    del graph.node[:], graph.initializer[:], graph.input[:], graph.output[:], graph.value_info[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    graph.input.extend(inputs)
    used_domains = {node.domain for node in nodes}
    opsets = [opset for opset in model.opset_import if opset.domain in used_domains | {""}]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    functions = [function for function in model.functions if function.domain in used_domains]
    del model.functions[:]
    model.functions.extend(functions)
    # The eval graph's only outputs are losses: the outputs' types come from shape inference on the cut graph.
    inferred_model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    inferred = {value.name: value for value in inferred_model.graph.value_info}
    missing = [name for name in output_names if name not in inferred]
    if missing:
        raise ValueError(f"artifacts: shape inference found no type for {missing}; the eval model does not "
                         "compute them from standard ops")
    graph.output.extend(inferred[name] for name in output_names)
    onnx.save(model, os.fspath(path))


def _native_library() -> str:
    """Path of deploy_ctc's native custom-op library; NativeUnavailable names the reason and the alternative."""
    from deploy_ctc.onnx.native_library import NativeUnavailable, library_path

    try:
        return library_path()
    except NativeUnavailable as error:
        raise NativeUnavailable(f"{error}; generate_artifacts(..., portable=True) writes artifacts that need no "
                                "library") from None


def _load_model(model):
    if isinstance(model, onnx.ModelProto):
        model_copy = onnx.ModelProto()
        model_copy.CopyFrom(model)
        model = model_copy
    elif isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    else:
        raise TypeError(f"model must be an onnx.ModelProto or a path, got {type(model).__name__}")
    opset = _onnx_opset(model)
    if opset > MAX_ONNX_OPSET:
        raise ValueError(f"model: opset {opset} is newer than onnxruntime-training 1.19.2 runs "
                         f"(<= {MAX_ONNX_OPSET}); export with opset_version={MAX_ONNX_OPSET} or lower")
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    return model


def _onnx_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _attach_function_bodies(model) -> None:
    """Add the portable CTCLoss / CTCLossGrad FunctionProtos (and the opsets they import) to ``model``."""
    from deploy_ctc.onnx import functions

    opset = _onnx_opset(model)
    if opset < functions.MIN_OPSET:
        raise ValueError(f"model: portable=True needs an ONNX opset >= {functions.MIN_OPSET} (the function "
                         f"bodies take axes as inputs), got opset {opset}; re-export with a newer opset")
    present = {(function.domain, function.name) for function in model.functions}
    model.functions.extend(function for function in functions.make_functions(opset)
                           if (function.domain, function.name) not in present)
    imported = {opset.domain for opset in model.opset_import}
    for domain, version in (("ai.onnx.ml", functions.ML_OPSET), (_schemas.DOMAIN, _schemas.OPSET_VERSION)):
        if domain not in imported:
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def _check_parameters(model, requires_grad, frozen_params) -> tuple[list, list]:
    """Check parameter names against the model's initializers; returns (requires_grad, frozen_params) lists."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    initializers = {init.name: init.data_type for init in model.graph.initializer}

    def names(value, argument: str) -> list:
        if isinstance(value, str) or not all(isinstance(name, str) for name in value):
            raise TypeError(f"{argument} must be a list of parameter names, got {value!r}")
        value = list(value)
        unknown = [name for name in value if name not in initializers]
        if unknown:
            raise ValueError(f"{argument}: {unknown} are not initializers of the model; "
                             f"its initializers are {sorted(initializers)}")
        return value

    requires_grad = names(requires_grad, "requires_grad")
    if not requires_grad:
        raise ValueError("requires_grad must name at least one parameter, got []")
    not_float = [name for name in requires_grad if initializers[name] not in floats]
    if not_float:
        raise ValueError(f"requires_grad: {not_float} are not floating-point initializers")
    frozen_params = names([] if frozen_params is None else frozen_params, "frozen_params")
    both = sorted(set(requires_grad) & set(frozen_params))
    if both:
        raise ValueError(f"{both} are listed in both requires_grad and frozen_params")
    return requires_grad, frozen_params


def _log_probs_name(model, log_probs) -> str:
    outputs = [value.name for value in model.graph.output]
    if log_probs is None:
        if len(outputs) != 1:
            raise ValueError(f"log_probs: the model has outputs {outputs}; name the log-probability output")
        return outputs[0]
    _check_output(model, log_probs, "log_probs")
    return log_probs


def _check_output(model, name: str, argument: str) -> None:
    outputs = [value.name for value in model.graph.output]
    if name not in outputs:
        raise ValueError(f"{argument}: the model has no graph output {name!r}; outputs: {outputs}")


_gradient_registered = False


def _register_gradient() -> None:
    """Tell ORT's gradient builder: d CTCLoss = CTCLossGrad(GO(0), I(0..3)) -> GI(0); no gradient to the ints.

    The registry keeps the first definition per op for the whole process, so this runs once; the
    attributes are copied per node afterwards (:func:`_copy_grad_attributes`).
    """
    global _gradient_registered
    if _gradient_registered:
        return
    grad = _ort_c.GradientNodeDefinition()
    grad.op_type, grad.domain = "CTCLossGrad", _schemas.DOMAIN
    grad.inputs = ["GO(0)", "I(0)", "I(1)", "I(2)", "I(3)"]
    grad.outputs = ["GI(0)"]
    grad.attributes = []
    key = f"{_schemas.DOMAIN}::CTCLoss"
    _ort_c.register_gradient_definition(key, [grad])
    # targets and lengths are integers: never ask for their gradient, whatever computes them.
    _ort_c.register_custom_stop_gradient_edges(key, {1, 2, 3})
    _gradient_registered = True


def _ctc_nodes(model, op_type: str) -> list:
    """The graph's deploy_ctc nodes of ``op_type``."""
    return [node for node in model.graph.node if node.domain == _schemas.DOMAIN and node.op_type == op_type]


def _copy_grad_attributes(model) -> None:
    """Give each CTCLossGrad node the attributes of the CTCLoss node it differentiates (same four inputs)."""
    forward = {tuple(node.input): node for node in _ctc_nodes(model, "CTCLoss")}
    for node in _ctc_nodes(model, "CTCLossGrad"):
        del node.attribute[:]
        node.attribute.extend(forward[tuple(node.input[1:])].attribute)


# Recurrent ops the gradient builder swaps for training variants with extra outputs (their gradient's inputs):
# training op -> (standard op, number of standard outputs).
_TRAINING_RECURRENCES = {"LSTMTraining": ("LSTM", 3), "GRUTraining": ("GRU", 2)}


def _restore_frozen_recurrences(model) -> None:
    """Turn LSTMTraining / GRUTraining nodes that no gradient reads back into standard LSTM / GRU nodes.

    onnxruntime-training 1.19.2 replaces every LSTM / GRU by its training variant, differentiated or not,
    and that kernel refuses non-forward directions ("LSTM and LSTMGrad kernel only supports the forward
    direction for now"). A frozen bidirectional encoder needs no gradient: the standard op runs it.
    """
    consumed = {name for node in model.graph.node for name in node.input}
    consumed |= {value.name for value in model.graph.output}
    for node in model.graph.node:
        if node.domain != "com.microsoft" or node.op_type not in _TRAINING_RECURRENCES:
            continue
        op_type, n_outputs = _TRAINING_RECURRENCES[node.op_type]
        if consumed.intersection(node.output[n_outputs:]):
            continue  # a gradient node reads the extra outputs: the training variant is needed
        node.op_type, node.domain = op_type, ""
        del node.output[n_outputs:]


def _finish_model(path: pathlib.Path, training_graph: bool = False) -> None:
    """Rewrite an artifact at an IR version onnxruntime-training 1.19.2 loads (onnx >= 1.23 writes IR 14).

    The training graph also gets its CTCLossGrad attributes and its frozen recurrences restored.
    """
    model = onnx.load(os.fspath(path))
    if training_graph:
        _copy_grad_attributes(model)
        _restore_frozen_recurrences(model)
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save(model, os.fspath(path))


@contextlib.contextmanager
def _quiet_gradient_builder():
    """Run the gradient builder with WARNING-level logging.

    onnxruntime-training 1.19.2 builds the gradient graph with a SessionOptions it creates itself, whose
    default severity logs every graph transformer at INFO (~60 lines per model); the module is frozen upstream.
    """
    original = _training_graph_utils.SessionOptions

    def quiet_options():
        options = original()
        options.log_severity_level = 2
        return options

    _training_graph_utils.SessionOptions = quiet_options
    try:
        yield
    finally:
        _training_graph_utils.SessionOptions = original
