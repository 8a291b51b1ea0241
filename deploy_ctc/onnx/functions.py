"""Portable bodies: model-local ONNX functions computing CTCLoss / CTCLossGrad / CTCAlign with standard ops only.

A node ``deploy_ctc::CTCLoss`` whose model carries these FunctionProtos runs in any runtime that inlines
model-local functions (plain onnxruntime on CPU or CUDA, onnx.reference) with no custom-op library.
The bodies are type-generic (float or double, int32 or int64 indices) and read the node's attributes
through ``ref_attr_name``.  They use ONNX opset >= 18 ops (axes as inputs) plus ``ai.onnx.ml``
LabelEncoder, the standard op that turns the ``reduction`` string into a number for opsets < 19,
whose Equal has no string overload.  A model-local function must import the model's own ONNX opset
(ORT rejects a mismatch), hence ``opset`` below.

Algorithm (Graves et al. 2006, in log space; one Loop iteration per frame, never Scan, which ORT
refuses at zero iterations).  With the extended label ``l'`` (length ``L = 2 S + 1``: blank, l_1,
blank, ..., l_S, blank) and emissions ``E[t, n, s] = log_probs[t, n, l'_s]``:

.. math::

    \\alpha_t(s) = E_t(s) + \\operatorname{lse}(\\alpha_{t-1}(s), \\alpha_{t-1}(s-1),
                   [\\text{skip}_s]\\, \\alpha_{t-1}(s-2)),
    \\qquad \\alpha_{-1} = (0, -\\infty, \\ldots)

    \\beta'_t(s) = \\operatorname{lse}_{s' \\in \\{s, s+1, s+2\\}}(\\beta'_{t+1}(s') + E_{t+1}(s')),
    \\qquad \\beta'_{T_n - 1}(s) = 0 \\text{ for } s \\in \\{2 S_n - 1, 2 S_n\\}

where ``skip_s`` means ``l'_s != blank`` and ``l'_s != l'_{s-2}``.  The state is frozen for frames
``t >= input_lengths[n]``, so one batched recurrence serves every length (and input_lengths 0).
``nll = -lse(alpha(2 S_n), alpha(2 S_n - 1))``; the posterior is ``exp(alpha + beta' - ll)``
scattered onto classes, and CTCLossGrad returns ``scale_n * (exp(log_probs) - posterior)``.

The bodies cannot raise Python errors; every input :func:`deploy_ctc.validation.validate` rejects (a bad
``reduction`` / ``zero_infinity``, ``blank`` outside [0, C), a target label outside [0, C) or equal to blank
within its length, a length that is negative, above T or S, or concatenated lengths that do not add up to the
targets' length, a lengths count other than N) makes onnxruntime fail, before any table is sized or indexed by
it, in a node whose name states the rule (see :func:`_require`).  Like
torch, they accept unbatched input: log_probs (T, C), targets (S,), 0-d lengths.
"""

from __future__ import annotations

import itertools

import numpy as np

from deploy_ctc.onnx._deps import require_onnx
from deploy_ctc.onnx.schemas import ALIGN_ATTRIBUTE_DEFAULTS, ATTRIBUTE_DEFAULTS, DOMAIN, OPSET_VERSION
from deploy_ctc.validation import REDUCTIONS

MIN_OPSET = 18
ML_OPSET = 3
_INT64_MIN = np.iinfo(np.int64).min
_INT64_MAX = np.iinfo(np.int64).max  # Slice end meaning 'to the end'


class _Builder:
    """Collects the nodes of one graph; every helper returns the name of the value it creates."""

    _counter = itertools.count()

    def __init__(self, onnx):
        self.onnx = onnx
        self.nodes = []

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._counter)}"

    def op(self, op_type: str, *inputs: str, hint: str | None = None, domain: str = "", **attrs) -> str:
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], domain=domain, **attrs))
        return out

    def const(self, value, dtype=np.int64) -> str:
        """A Constant holding ``value`` (int64 by default)."""
        tensor = self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype))
        return self.op("Constant", hint="c", value=tensor)

    def like(self, value: float, like: str) -> str:
        """Scalar ``value`` in the float type of ``like`` (the bodies are type-generic)."""
        return self.op("CastLike", self.const(value, np.float32), like, hint="cl")

    def attr(self, name: str, kind: str) -> str:
        """Constant from the calling node's attribute ``name`` (``kind``: value_int / value_string)."""
        out = self.fresh(name)
        attribute = self.onnx.AttributeProto()
        attribute.name = kind
        attribute.ref_attr_name = name
        attribute.type = (self.onnx.AttributeProto.INT if kind == "value_int"
                          else self.onnx.AttributeProto.STRING)
        node = self.onnx.helper.make_node("Constant", [], [out])
        node.attribute.append(attribute)
        self.nodes.append(node)
        return out

    def lse(self, *terms: str, zero: str, neg_inf: str) -> str:
        """Elementwise log(sum(exp(terms))), stable; -inf where every term is -inf. Only -inf is log zero: the
        shift is the largest term, replaced by 0 where that is -inf (a finite floor would turn terms below it,
        finite masks such as -1e30 or -3.4e38, into zeros)."""
        m = self.op("Max", *terms)
        m = self.op("Where", self.op("Equal", m, neg_inf), zero, m)
        exps = [self.op("Exp", self.op("Sub", t, m)) for t in terms]
        total = exps[0] if len(exps) == 1 else self.op("Sum", *exps)
        return self.op("Add", self.op("Log", total), m)

    def graph(self, name: str, inputs: list, outputs: list):
        """A subgraph; ``inputs`` are (name, elem_type): scalars, or untyped (the generic float state) for 0."""
        helper = self.onnx.helper
        return helper.make_graph(self.nodes, name,
                                 [helper.make_tensor_value_info(n, t, []) if t else
                                  helper.make_value_info(n, self.onnx.TypeProto()) for n, t in inputs],
                                 [helper.make_value_info(n, self.onnx.TypeProto()) for n in outputs])


def _lattice(b: _Builder, log_probs: str, targets: str, input_lengths: str, target_lengths: str) -> dict:
    """Everything the forward and backward recurrences share, as named values (shapes in comments)."""
    blank = b.attr("blank", "value_int")  # ()
    # Unbatched input (T, C), (S,), (), () is the batch of one (T, 1, C), concatenated (S,), (1,), (1,).
    shape_in = b.op("Shape", log_probs)  # [T, N, C] or [T, C]
    t_vec = b.op("Slice", shape_in, b.const([0]), b.const([1]))  # [T]
    log_probs = b.op("Reshape", log_probs, b.op("Concat", t_vec, b.const([-1]),
                                                 b.op("Slice", shape_in, b.const([-1]), b.const([_INT64_MAX])),
                                                 axis=0), hint="lp3")  # (T, N, C)
    t_len = b.op("Squeeze", t_vec, b.const([0]))  # ()
    il = b.op("Reshape", b.op("Cast", input_lengths, to=b.onnx.TensorProto.INT64), b.const([-1]))  # (N,) int64
    tl = b.op("Reshape", b.op("Cast", target_lengths, to=b.onnx.TensorProto.INT64), b.const([-1]))  # (N,)
    tg = b.op("Cast", targets, to=b.onnx.TensorProto.INT64)  # (N, S) or (sum tl,)
    zero, one, two = b.const(0), b.const(1), b.const(2)
    # [0] computed from log_probs' values (x < x is False, even for NaN): never constant-folded, unlike
    # anything derived from shapes or from lengths a model may hold as constants.
    first = b.op("ReduceSum", b.op("Slice", b.op("Reshape", log_probs, b.const([-1])), b.const([0]), b.const([1])),
                 keepdims=1)  # (1,)
    guard = {"data_zero": b.op("Cast", b.op("Less", first, first), to=b.onnx.TensorProto.INT64)}  # (1,) int64

    # Padded (N, S_max) labels from either target layout: row n starts at n*S (padded) or at the
    # exclusive cumulative sum of target_lengths (concatenated); entries past tl[n] become blank.
    flat = b.op("Reshape", tg, b.const([-1]))  # (K,)
    tg_shape = b.op("Shape", tg)
    is_padded = b.op("Equal", b.op("Size", tg_shape), two)  # ()
    row_width = b.op("Squeeze", b.op("Slice", tg_shape, b.const([-1]), b.const([_INT64_MAX])), b.const([0]))
    # N, and everything sized by it or by the lengths, waits for the lengths' checks (0 once they pass).
    checked = _check_lengths(b, guard, log_probs, t_len, il, tl, flat, tg_shape, row_width)  # ()
    n_vec = b.op("Add", b.op("Shape", il), checked)  # (1,) = [N]
    n = b.op("Squeeze", n_vec, b.const([0]))  # ()

    rows = b.op("Range", zero, n, one)  # (N,)
    start = b.op("Where", is_padded, b.op("Mul", rows, row_width),
                 b.op("Sub", b.op("CumSum", tl, zero), tl))  # (N,)
    s_max = b.op("Add", b.op("Max", b.op("ReduceMax", tl, keepdims=0), zero), checked)  # ()
    s_idx = b.op("Range", zero, s_max, one)  # (S_max,)
    s_row = b.op("Unsqueeze", s_idx, b.const([0]))  # (1, S_max)
    pos = b.op("Add", b.op("Unsqueeze", start, b.const([1])), s_row)  # (N, S_max)
    last = b.op("Max", b.op("Sub", b.op("Size", flat), one), zero)
    pos = b.op("Clip", pos, zero, last)
    tl_col = b.op("Unsqueeze", tl, b.const([1]))  # (N, 1)
    in_target = b.op("Less", s_row, tl_col)  # (N, S_max)
    labels = b.op("Where", in_target, b.op("Gather", flat, pos), blank)  # (N, S_max)
    labels = b.op("Add", labels, _check_labels(b, guard, log_probs, blank, labels, in_target))  # + 0 once checked

    # Extended labels l' = (blank, l_1, blank, ..., l_S, blank): (N, L), L = 2 S_max + 1.
    blanks = b.op("Expand", blank, b.op("Shape", labels))  # (N, S_max)
    pairs = b.op("Concat", b.op("Unsqueeze", blanks, b.const([2])),
                 b.op("Unsqueeze", labels, b.const([2])), axis=2)  # (N, S_max, 2)
    two_s = b.op("Unsqueeze", b.op("Mul", s_max, two), b.const([0]))  # (1,)
    blank_col = b.op("Expand", blank, b.op("Concat", n_vec, b.const([1]), axis=0))  # (N, 1)
    ext = b.op("Concat", b.op("Reshape", pairs, b.op("Concat", n_vec, two_s, axis=0)), blank_col,
               axis=1, hint="ext")  # (N, L)
    ext_shape = b.op("Shape", ext)  # [N, L]

    neg_inf = b.like(-np.inf, log_probs)
    zero_f = b.like(0.0, log_probs)
    neg2 = b.op("Expand", neg_inf, b.op("Concat", n_vec, b.const([2]), axis=0))  # (N, 2)
    # skip_bias[n, s] = 0 where s may be entered from s-2, else -inf.
    ext_prev2 = b.op("Slice", b.op("Concat", blank_col, blank_col, ext, axis=1), b.const([0]), b.const([-2]),
                     b.const([1]))  # (N, L): l'_{s-2}
    skip = b.op("And", b.op("Not", b.op("Equal", ext, blank)), b.op("Not", b.op("Equal", ext, ext_prev2)))
    skip_bias = b.op("Where", skip, zero_f, neg_inf)  # (N, L)

    # Emissions E[t, n, s] = log_probs[t, n, l'_s].
    e_index = b.op("Expand", b.op("Unsqueeze", ext, b.const([0])),
                   b.op("Concat", b.op("Unsqueeze", t_len, b.const([0])), ext_shape, axis=0))  # (T, N, L)
    emit = b.fresh("emit")  # (T, N, L); the node name explains the out-of-bounds error ORT would raise
    b.nodes.append(b.onnx.helper.make_node(
        "GatherElements", [log_probs, e_index], [emit], axis=2,
        name="deploy_ctc: targets and blank must lie in [0, C) of log_probs"))

    # valid[t, n, 0]: frame t is inside sample n's input.
    frames = b.op("Range", zero, t_len, one)  # (T,)
    valid = b.op("Unsqueeze", b.op("Less", b.op("Unsqueeze", frames, b.const([1])),
                                   b.op("Unsqueeze", il, b.const([0]))), b.const([2]))  # (T, N, 1)
    s_states = b.op("Unsqueeze", b.op("Range", zero, b.op("Add", b.op("Mul", s_max, two), one), one),
                    b.const([0]))  # (1, L)
    # Slice parameters of the Loop bodies, hoisted: a Constant inside a body runs every frame.
    slices = {k: b.const([v]) for k, v in (("0", 0), ("1", 1), ("2", 2), ("-1", -1), ("-2", -2),
                                           ("end", _INT64_MAX))}
    data_zero = guard["data_zero"]
    return dict(lp=log_probs, blank=blank, t_len=t_len, t_last=b.op("Sub", t_len, one), n=n, n_vec=n_vec, il=il, tl=tl,
                tl_col=tl_col, ext=ext, ext_shape=ext_shape, e_index=e_index, emit=emit, skip_bias=skip_bias,
                neg_inf=neg_inf, zero_f=zero_f, neg2=neg2, valid=valid, s_states=s_states,
                slices=slices, data_zero=data_zero)


def _all(b: _Builder, condition: str) -> str:
    """bool (): every entry of the bool tensor ``condition`` holds (True when it is empty)."""
    failures = b.op("ReduceSum", b.op("Cast", b.op("Not", condition), to=b.onnx.TensorProto.INT64),
                    keepdims=0)  # over all axes
    return b.op("Equal", failures, b.const(0))


def _check_lengths(b: _Builder, guard: dict, log_probs: str, t_len: str, il: str, tl: str, flat: str,
                   tg_shape: str, row_width: str) -> str:
    """int64 0 once the lengths pass the rules :func:`deploy_ctc.validation.validate` applies; else onnxruntime
    fails in a node named after the broken rule (before any table sized by N or the lengths is allocated)."""
    n_lp = b.op("Squeeze", b.op("Slice", b.op("Shape", log_probs), b.const([1]), b.const([2])), b.const([0]))
    batched = b.op("Equal", b.op("Size", b.op("Shape", log_probs)), b.const(3))  # log_probs was (T, N, C)
    concatenated = b.op("And", batched, b.op("Equal", b.op("Size", tg_shape), b.const(1)))
    total = b.op("Size", flat)
    rules = [
        (b.op("Equal", b.op("Size", il), n_lp), "deploy_ctc: input_lengths must have N entries (log_probs.shape[1])"),
        (b.op("Equal", b.op("Size", tl), n_lp), "deploy_ctc: target_lengths must have N entries (log_probs.shape[1])"),
        (_all(b, b.op("GreaterOrEqual", il, b.const(0))), "deploy_ctc: input_lengths must be non-negative"),
        (_all(b, b.op("LessOrEqual", il, t_len)), "deploy_ctc: input_lengths must not exceed T (log_probs.shape[0])"),
        (_all(b, b.op("GreaterOrEqual", tl, b.const(0))), "deploy_ctc: target_lengths must be non-negative"),
        # Each length within the targets' width first, so the sum below cannot wrap around.
        (_all(b, b.op("LessOrEqual", tl, row_width)),
         "deploy_ctc: target_lengths must not exceed S (targets.shape[-1]; the length of 1-D targets)"),
        (b.op("Or", b.op("Not", concatenated), b.op("Equal", b.op("ReduceSum", tl, keepdims=0), total)),
         "deploy_ctc: sum(target_lengths) must equal the length of 1-D (concatenated) targets"),
    ]
    checked = b.const(0)
    for ok, message in rules:
        checked = _require(b, guard, ok, checked, message)
    return checked


def _check_labels(b: _Builder, guard: dict, log_probs: str, blank: str, labels: str, in_target: str) -> str:
    """int64 0 once ``blank`` and the target labels within ``target_lengths`` pass validate's rules; else
    onnxruntime fails in a node named after the rule (before any label indexes log_probs)."""
    c = b.op("Squeeze", b.op("Slice", b.op("Shape", log_probs), b.const([-1]), b.const([_INT64_MAX])), b.const([0]))
    outside = b.op("Or", b.op("Less", labels, b.const(0)), b.op("GreaterOrEqual", labels, c))  # (N, S_max)
    rules = [
        (b.op("And", b.op("GreaterOrEqual", blank, b.const(0)), b.op("Less", blank, c)),
         "deploy_ctc: blank must be in [0, C) (C = log_probs.shape[-1])"),
        (_all(b, b.op("Not", b.op("And", in_target, outside))),
         "deploy_ctc: targets must lie in [0, C) (C = log_probs.shape[-1]) within target_lengths"),
        (_all(b, b.op("Not", b.op("And", in_target, b.op("Equal", labels, blank)))),
         "deploy_ctc: targets must not contain the blank label within target_lengths"),
    ]
    checked = b.const(0)
    for ok, message in rules:
        checked = _require(b, guard, ok, checked, message)
    return checked


def _loop(b: _Builder, lat: dict, init: str, step, reverse: bool, history: bool):
    """Loop over the T frames (descending when ``reverse``); ``step(body, t, state) -> (new, keep)``.

    Returns the final state (N, L) and, with ``history``, the per-frame states (T, N, L) in frame order.
    """
    body = _Builder(b.onnx)
    it, cond, state = body.fresh("iter"), body.fresh("cond"), body.fresh("state")
    t = body.op("Sub", lat["t_last"], it) if reverse else it
    new, keep = step(body, t, state)
    out = body.op("Where", keep, new, state)  # (N, L): frozen outside the sample's frames
    outputs = [body.op("Identity", cond), out] + ([body.op("Identity", out)] if history else [])
    graph = body.graph("ctc_frame", [(it, b.onnx.TensorProto.INT64), (cond, b.onnx.TensorProto.BOOL), (state, 0)],
                       outputs)
    results = [b.fresh("final")] + ([b.fresh("history")] if history else [])
    # An explicit true condition: onnx.reference's Loop never iterates on an omitted one.
    b.nodes.append(b.onnx.helper.make_node("Loop", [lat["t_len"], b.const(True, np.bool_), init], results,
                                           body=graph))
    if history and reverse:  # Loop stacks in iteration order: flip to frame order
        results[1] = b.op("Slice", results[1], b.const([-1]), b.const([_INT64_MIN]), b.const([0]), b.const([-1]))
    return results


def _forward(b: _Builder, lat: dict, history: bool):
    """alpha recurrence; returns (alpha_final (N, L), ll = log p(target) (N,), history (T, N, L) or None)."""
    start = b.op("Where", b.op("Equal", lat["s_states"], b.const(0)), lat["zero_f"], lat["neg_inf"])  # (1, L)
    alpha0 = b.op("Expand", start, lat["ext_shape"])  # (N, L) = alpha_{-1}

    c = lat["slices"]

    def step(body, t, a):
        padded = body.op("Concat", lat["neg2"], a, axis=1)  # (N, L + 2)
        a1 = body.op("Slice", padded, c["1"], c["-1"], c["1"])  # alpha(s-1)
        a2 = body.op("Add", body.op("Slice", padded, c["0"], c["-2"], c["1"]), lat["skip_bias"])  # alpha(s-2)
        lse = body.lse(a, a1, a2, zero=lat["zero_f"], neg_inf=lat["neg_inf"])
        new = body.op("Add", lse, body.op("Gather", lat["emit"], t, axis=0))
        return new, body.op("Gather", lat["valid"], t, axis=0)  # (N, L), (N, 1)

    final, *hist = _loop(b, lat, alpha0, step, reverse=False, history=history)
    # ll = lse(alpha(2 S_n), alpha(2 S_n - 1)); the second only when S_n > 0.
    two_tl = b.op("Mul", lat["tl_col"], b.const(2))  # (N, 1)
    ends = b.op("GatherElements", final,
                b.op("Concat", two_tl, b.op("Max", b.op("Sub", two_tl, b.const(1)), b.const(0)), axis=1),
                axis=1)  # (N, 2)
    end_blank = b.op("Slice", ends, b.const([0]), b.const([1]), b.const([1]))  # (N, 1)
    end_label = b.op("Where", b.op("Greater", lat["tl_col"], b.const(0)),
                     b.op("Slice", ends, b.const([1]), b.const([2]), b.const([1])), lat["neg_inf"])
    ll = b.op("Squeeze", b.lse(end_blank, end_label, zero=lat["zero_f"], neg_inf=lat["neg_inf"]),
              b.const([1]))  # (N,)
    return final, ll, (hist[0] if history else None)


def _backward(b: _Builder, lat: dict) -> str:
    """beta' recurrence; returns its history (T, N, L) in frame order (beta' excludes E_t)."""
    two_tl = b.op("Mul", lat["tl_col"], b.const(2))  # (N, 1)
    is_end = b.op("Or", b.op("Equal", lat["s_states"], two_tl),
                  b.op("Equal", lat["s_states"], b.op("Sub", two_tl, b.const(1))))  # (N, L)
    beta_end = b.op("Where", is_end, lat["zero_f"], lat["neg_inf"])  # (N, L)
    # E and validity of frame t + 1 (frame T reads as invalid: the state stays at beta_end).
    c = lat["slices"]
    emit_next = b.op("Concat", b.op("Slice", lat["emit"], c["1"], c["end"], c["0"]),
                     b.op("Slice", lat["emit"], c["-1"], c["end"], c["0"]),
                     axis=0)  # (T, N, L): E_{t+1}; the last row repeats frame T - 1 (masked)
    never = b.op("Expand", b.op("Cast", b.const(0), to=b.onnx.TensorProto.BOOL),
                 b.op("Concat", b.const([1]), lat["n_vec"], b.const([1]), axis=0))  # (1, N, 1)
    valid_next = b.op("Concat", b.op("Slice", lat["valid"], b.const([1]), b.const([_INT64_MAX]),
                                     b.const([0])), never, axis=0)  # (T, N, 1)
    skip_next = b.op("Slice", b.op("Concat", lat["skip_bias"], lat["neg2"], axis=1), b.const([2]),
                     b.const([_INT64_MAX]), b.const([1]))  # (N, L): skip into s + 2

    def step(body, t, beta):
        q = body.op("Add", beta, body.op("Gather", emit_next, t, axis=0))  # (N, L)
        padded = body.op("Concat", q, lat["neg2"], axis=1)  # (N, L + 2)
        q1 = body.op("Slice", padded, c["1"], c["-1"], c["1"])  # from s + 1
        q2 = body.op("Add", body.op("Slice", padded, c["2"], c["end"], c["1"]), skip_next)  # from s + 2
        lse = body.lse(q, q1, q2, zero=lat["zero_f"], neg_inf=lat["neg_inf"])
        return lse, body.op("Gather", valid_next, t, axis=0)

    _, history = _loop(b, lat, beta_end, step, reverse=True, history=True)
    return history


def _require(b: _Builder, lat: dict, ok: str, value: str, message: str) -> str:
    """``value`` if ``ok`` (bool ()), else fail at run time in a node named ``message``.

    Standard ONNX has no assert: the failing branch reshapes to an impossible shape, and onnxruntime's
    error names the node, so the user reads ``message`` (e.g. "reduction must be one of ...").
    ``value`` must be an int64 scalar; ``lat["data_zero"]`` is [0] computed from the inputs' values.
    """
    fine, fail = _Builder(b.onnx), _Builder(b.onnx)
    fine_out = fine.op("Identity", value)
    fail_out = fail.fresh("invalid")
    # shape [-2], computed from input data so that constant folding cannot reject the unused branch
    impossible = fail.op("Sub", lat["data_zero"], fail.const([2]))
    fail.nodes.append(b.onnx.helper.make_node("Reshape", [value, impossible], [fail_out], name=message))
    # Or'ed with a data-dependent False so onnxruntime cannot fold the If (and rename the failing node).
    ok = b.op("Or", ok, b.op("Squeeze", b.op("Less", lat["data_zero"], b.const([0])), b.const([0])))
    checked = b.fresh("checked")
    b.nodes.append(b.onnx.helper.make_node("If", [ok], [checked], then_branch=fine.graph("ok", [], [fine_out]),
                                           else_branch=fail.graph("invalid", [], [fail_out])))
    return checked


def _infinite_fill(b: _Builder, lat: dict, log_probs: str) -> tuple:
    """(zero_infinity as bool (), value replacing infinite losses' gradients: 0 or NaN)."""
    value = b.attr("zero_infinity", "value_int")
    valid = b.op("Or", b.op("Equal", value, b.const(0)), b.op("Equal", value, b.const(1)))
    value = _require(b, lat, valid, value, "deploy_ctc: zero_infinity must be 0 or 1")
    zero_inf = b.op("Equal", value, b.const(1))
    return zero_inf, b.op("Where", zero_inf, b.like(0.0, log_probs), b.like(np.nan, log_probs))


def _reduction_code(b: _Builder, lat: dict) -> str:
    """The reduction attribute as int64 (): its index in REDUCTIONS; fails at run time if unknown."""
    code = b.op("LabelEncoder", b.attr("reduction", "value_string"), domain="ai.onnx.ml",
                keys_strings=list(REDUCTIONS), values_int64s=list(range(len(REDUCTIONS))), default_int64=-1)
    return _require(b, lat, b.op("GreaterOrEqual", code, b.const(0)), code,
                    "deploy_ctc: reduction must be one of " + ", ".join(map(repr, REDUCTIONS)))


def _mean_divisor(b: _Builder, lat: dict, like: str) -> str:
    """max(target_lengths, 1) in the float type of ``like``: (N,)."""
    return b.op("CastLike", b.op("Max", lat["tl"], b.const(1)), like)


def _ctc_loss_body(b: _Builder) -> tuple:
    inputs = ["log_probs", "targets", "input_lengths", "target_lengths"]
    lat = _lattice(b, *inputs)
    _, ll, _ = _forward(b, lat, history=False)
    nll = b.op("Neg", ll)  # (N,)
    zero_inf, _ = _infinite_fill(b, lat, "log_probs")
    losses = b.op("Where", b.op("And", zero_inf, b.op("IsInf", nll)), lat["zero_f"], nll)  # (N,)

    def branch(name, op_type, *args):
        sub = _Builder(b.onnx)
        out = sub.op(op_type, *args, keepdims=0) if op_type.startswith("Reduce") else sub.op(op_type, *args)
        return sub.graph(name, [], [out])

    code = _reduction_code(b, lat)
    per_target = b.op("Div", losses, _mean_divisor(b, lat, losses))
    reduced = b.fresh("reduced")
    b.nodes.append(b.onnx.helper.make_node("If", [b.op("Equal", code, b.const(REDUCTIONS.index("sum")))], [reduced],
                                           then_branch=branch("sum", "ReduceSum", losses),
                                           else_branch=branch("mean", "ReduceMean", per_target)))
    b.nodes.append(b.onnx.helper.make_node("If", [b.op("Equal", code, b.const(REDUCTIONS.index("none")))], ["loss"],
                                           then_branch=branch("none", "Reshape", losses,
                                                              b.op("Shape", "input_lengths")),  # (N,) or ()
                                           else_branch=branch("reduced", "Identity", reduced)))
    return inputs, ["loss"]


def _ctc_loss_grad_body(b: _Builder) -> tuple:
    inputs = ["d_loss", "log_probs", "targets", "input_lengths", "target_lengths"]
    lat = _lattice(b, *inputs[1:])
    _, ll, alphas = _forward(b, lat, history=True)
    betas = _backward(b, lat)
    # Posterior over states, scattered onto classes (repeated labels add up).
    log_gamma = b.op("Sub", b.op("Add", alphas, betas),
                     b.op("Unsqueeze", ll, b.const([0, 2])))  # (T, N, L)
    lp = lat["lp"]  # (T, N, C)
    zeros = b.op("CastLike", b.op("ConstantOfShape", b.op("Shape", lp)), lp)  # (T, N, C)
    posterior = b.op("ScatterElements", zeros, lat["e_index"], b.op("Exp", log_gamma), axis=2,
                     reduction="add")  # (T, N, C)
    raw = b.op("Sub", b.op("Exp", lp), posterior)  # (T, N, C)

    # scale_n = d_loss (broadcast to (N,)), divided by N * max(tl_n, 1) for "mean".
    d_loss = b.op("Expand", "d_loss", lat["n_vec"])  # (N,)
    mean_factor = b.op("Reciprocal", b.op("Mul", _mean_divisor(b, lat, d_loss), b.op("CastLike", lat["n"], d_loss)))
    is_mean = b.op("Equal", _reduction_code(b, lat), b.const(REDUCTIONS.index("mean")))
    scale = b.op("Mul", d_loss, b.op("Where", is_mean, mean_factor, b.like(1.0, d_loss)))  # (N,)
    scale = b.op("Unsqueeze", scale, b.const([0, 2]))  # (1, N, 1)

    # Rows of an infinite loss: 0 under zero_infinity, else NaN; of a NaN loss: NaN always (torch's rules; the
    # posterior alone would leave the classes outside the target finite).
    _, fill = _infinite_fill(b, lat, "log_probs")
    is_nan = b.op("IsNaN", ll)  # (N,)
    fill = b.op("Unsqueeze", b.op("Where", is_nan, b.like(np.nan, "log_probs"), fill), b.const([0, 2]))  # (1, N, 1)
    non_finite = b.op("Unsqueeze", b.op("Or", b.op("IsInf", ll), is_nan), b.const([0, 2]))  # (1, N, 1)
    inside = b.op("Where", non_finite, fill, b.op("Mul", scale, raw))  # (T, N, C)
    grad = b.op("Where", lat["valid"], inside, lat["zero_f"])  # (T, N, C)
    b.nodes.append(b.onnx.helper.make_node("Reshape", [grad, b.op("Shape", "log_probs")], ["d_log_probs"]))
    return inputs, ["d_log_probs"]


def _ctc_align_body(b: _Builder) -> tuple:
    """Forced alignment (the Viterbi of deploy_ctc.align): a Loop over frames with max in place of log-sum-exp,
    recording the move into each cell, then a Loop from the last frame back that follows the moves.

    ``delta`` is float64 whatever the input type and the first maximal move wins (stay, step, skip), as on every
    deploy_ctc backend; NaN and +inf log-probs count as -inf.
    """
    inputs = ["log_probs", "targets", "input_lengths", "target_lengths"]
    lat = _lattice(b, *inputs)
    c = lat["slices"]
    double = b.onnx.TensorProto.DOUBLE
    neg_inf = b.op("Cast", lat["neg_inf"], to=double)  # ()
    neg2 = b.op("Cast", lat["neg2"], to=double)  # (N, 2)
    skip_bias = b.op("Cast", lat["skip_bias"], to=double)  # (N, L)
    two_tl = b.op("Mul", lat["tl_col"], b.const(2))  # (N, 1)
    inside = b.op("Less", lat["s_states"], b.op("Add", two_tl, b.const(1)))  # (N, L) the sample's own positions
    emit = b.op("Cast", lat["emit"], to=double)  # (T, N, L)
    emit = b.op("Where", b.op("And", b.op("Less", emit, b.op("Cast", b.like(np.inf, lat["lp"]), to=double)),
                              b.op("Unsqueeze", inside, b.const([0]))), emit, neg_inf)  # NaN, +inf: impossible
    # delta_{-1} = (0, -inf, ...): the general step then starts paths on the first blank or the first label.
    start = b.op("Where", b.op("Equal", lat["s_states"], b.const(0)), b.op("Cast", b.const(0.0, np.float64), to=double),
                 neg_inf)  # (1, L)
    delta0 = b.op("Expand", start, lat["ext_shape"])  # (N, L)

    fwd = _Builder(b.onnx)
    t, cond, delta = fwd.fresh("iter"), fwd.fresh("cond"), fwd.fresh("delta")
    padded = fwd.op("Concat", neg2, delta, axis=1)  # (N, L + 2)
    one = fwd.op("Slice", padded, c["1"], c["-1"], c["1"])  # from s - 1
    two = fwd.op("Add", fwd.op("Slice", padded, c["0"], c["-2"], c["1"]), skip_bias)  # from s - 2
    step = fwd.op("Greater", one, delta)
    best = fwd.op("Where", step, one, delta)
    jump = fwd.op("Greater", two, best)
    best = fwd.op("Where", jump, two, best)
    move = fwd.op("Where", jump, fwd.const(2, np.uint8), fwd.op("Cast", step, to=b.onnx.TensorProto.UINT8))  # (N, L)
    new = fwd.op("Add", best, fwd.op("Gather", emit, t, axis=0))
    new = fwd.op("Where", fwd.op("Gather", lat["valid"], t, axis=0), new, delta)  # frozen past the input
    graph = fwd.graph("ctc_align_frame", [(t, b.onnx.TensorProto.INT64), (cond, b.onnx.TensorProto.BOOL), (delta, 0)],
                      [fwd.op("Identity", cond), new, move])
    final, moves = b.fresh("final"), b.fresh("moves")  # (N, L), (T, N, L)
    b.nodes.append(b.onnx.helper.make_node("Loop", [lat["t_len"], b.const(True, np.bool_), delta0], [final, moves],
                                           body=graph))

    # The end: the last label unless the trailing blank is strictly better (S_n = 0: the blank).
    end_label = b.op("Max", b.op("Sub", two_tl, b.const(1)), b.const(0))  # (N, 1)
    on_label = b.op("And", b.op("Greater", lat["tl_col"], b.const(0)),
                    b.op("GreaterOrEqual", b.op("GatherElements", final, end_label, axis=1),
                         b.op("GatherElements", final, two_tl, axis=1)))  # (N, 1)
    state0 = b.op("Where", on_label, end_label, two_tl)  # (N, 1)
    feasible = b.op("Greater", b.op("GatherElements", final, state0, axis=1), neg_inf)  # (N, 1)

    back = _Builder(b.onnx)
    it, cond, state = back.fresh("iter"), back.fresh("cond"), back.fresh("state")
    t = back.op("Sub", lat["t_last"], it)
    active = back.op("And", back.op("Gather", lat["valid"], t, axis=0), feasible)  # (N, 1)
    label = back.op("Where", active, back.op("GatherElements", lat["ext"], state, axis=1), lat["blank"])  # (N, 1)
    move = back.op("Cast", back.op("GatherElements", back.op("Gather", moves, t, axis=0), state, axis=1),
                   to=back.onnx.TensorProto.INT64)
    new = back.op("Where", active, back.op("Sub", state, move), state)  # (N, 1)
    graph = back.graph("ctc_align_back", [(it, b.onnx.TensorProto.INT64), (cond, b.onnx.TensorProto.BOOL), (state, 0)],
                       [back.op("Identity", cond), new, label])
    last, labels = b.fresh("last"), b.fresh("labels")  # (N, 1), (T, N, 1) from the last frame to the first
    b.nodes.append(b.onnx.helper.make_node("Loop", [lat["t_len"], b.const(True, np.bool_), state0], [last, labels],
                                           body=graph))
    labels = b.op("Slice", labels, b.const([-1]), b.const([_INT64_MIN]), b.const([0]), b.const([-1]))  # frame order

    picked = b.op("Squeeze", b.op("GatherElements", lat["lp"], labels, axis=2), b.const([2]))  # (T, N)
    valid = b.op("Squeeze", lat["valid"], b.const([2]))  # (T, N)
    scores = b.op("Where", valid, b.op("Where", b.op("Squeeze", feasible, b.const([1])), picked, lat["neg_inf"]),
                  lat["zero_f"])  # (T, N)
    out_shape = b.op("Slice", b.op("Shape", "log_probs"), c["0"], c["-1"])  # [T, N] or [T] unbatched
    b.nodes.append(b.onnx.helper.make_node("Reshape", [b.op("Squeeze", labels, b.const([2])), out_shape],
                                           ["alignment"]))
    b.nodes.append(b.onnx.helper.make_node("Reshape", [scores, out_shape], ["scores"]))
    return inputs, ["alignment", "scores"]


def make_functions(opset: int = MIN_OPSET) -> list:
    """[CTCLoss, CTCLossGrad, CTCAlign] FunctionProtos (domain deploy_ctc) for a model importing ONNX ``opset``.

    Raises:
        ValueError: ``opset`` < 18.
    """
    onnx = require_onnx()
    import onnx.numpy_helper  # noqa: F401 -- used by _Builder.const

    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an int >= {MIN_OPSET} for the portable CTC bodies, got {opset!r}")
    imports = [onnx.helper.make_opsetid("", opset), onnx.helper.make_opsetid("ai.onnx.ml", ML_OPSET)]
    functions = []
    for name, build, attributes in (("CTCLoss", _ctc_loss_body, ATTRIBUTE_DEFAULTS),
                                    ("CTCLossGrad", _ctc_loss_grad_body, ATTRIBUTE_DEFAULTS),
                                    ("CTCAlign", _ctc_align_body, ALIGN_ATTRIBUTE_DEFAULTS)):
        defaults = [onnx.helper.make_attribute(k, v) for k, v in attributes.items()]
        b = _Builder(onnx)
        inputs, outputs = build(b)
        functions.append(onnx.helper.make_function(DOMAIN, name, inputs, outputs, b.nodes, imports,
                                                   attribute_protos=defaults,
                                                   doc_string=f"Portable deploy_ctc::{name} "
                                                              "(see deploy_ctc.onnx.functions)"))
    return functions


def attach_functions(model, opset: int | None = None) -> None:
    """Add the portable bodies of the deploy_ctc ops ``model``'s graph uses (in place), once each.

    Also adds the ``deploy_ctc`` and ``ai.onnx.ml`` opset imports the bodies need.  ``opset`` defaults to
    the model's ONNX opset, which the bodies must import (see module docstring).

    Raises:
        ValueError: the model's ONNX opset is below 18 (convert it with onnx.version_converter first).
    """
    onnx = require_onnx()
    imports = {o.domain: o.version for o in model.opset_import}
    if opset is None:
        opset = imports.get("", imports.get("ai.onnx"))
    if opset is None or opset < MIN_OPSET:
        raise ValueError(f"the portable CTC bodies need ONNX opset >= {MIN_OPSET}, the model imports {opset!r}; "
                         "convert it (onnx.version_converter) or pass embed_functions=False")
    ensure_opset_imports(model)
    if imports.get("ai.onnx.ml", ML_OPSET) < 2:
        raise ValueError(f"the portable CTC bodies need ai.onnx.ml opset >= 2, "
                         f"the model imports {imports['ai.onnx.ml']}")
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    present = {f.name for f in model.functions if f.domain == DOMAIN}
    for function in make_functions(opset):
        if function.name in used and function.name not in present:
            model.functions.append(function)
    if model.ir_version < 8:  # model-local functions exist from IR 8 on
        model.ir_version = 8


def ensure_opset_imports(model) -> None:
    """Import the deploy_ctc domain (``OPSET_VERSION``) and ai.onnx.ml in ``model`` when missing (in place)."""
    onnx = require_onnx()
    present = {o.domain for o in model.opset_import}
    for domain, version in ((DOMAIN, OPSET_VERSION), ("ai.onnx.ml", ML_OPSET)):
        if domain not in present:
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))
