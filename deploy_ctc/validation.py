"""Argument checking shared by every backend, the torch adapter and the ONNX Runtime op.

``validate`` turns what a user may pass to :func:`deploy_ctc.ctc_loss` (the argument forms ``torch.nn.CTCLoss``
accepts) into one canonical :class:`CTCProblem`, or raises a ``ValueError``/``TypeError`` whose message names the
argument and the offending value. Backends only ever see a validated problem, so kernels never index out of bounds.

Where torch reads out of bounds or silently casts (target values outside ``[0, C)``, targets equal to ``blank``,
float targets), this module refuses with a clear error instead.

On CuPy the checks on target values run on the device; the lengths and the count of bad target values come back to
the host in one small transfer (size ``2N + 1``), the only synchronisation on the success path.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The ``reduction`` values, in the order of torch's ``at::Reduction`` enum (the ONNX bodies and the exporter rely on
#: the index).
REDUCTIONS = ("none", "mean", "sum")
#: The gradient conventions of :func:`deploy_ctc.ctc_loss_and_grad`: ``"torch"`` (``exp(log_probs) - posterior``,
#: what autograd through ``F.ctc_loss`` gives) and ``"plain"`` (``-posterior``).
CONVENTIONS = ("torch", "plain")


@dataclass(frozen=True)
class CTCProblem:
    """A validated batch, in the layout every backend consumes.

    Attributes:
        xp: the array module of ``log_probs`` (``numpy`` or ``cupy``).
        log_probs: ``(T, N, C)`` float16, float32 or float64 on NumPy, float32 or float64 on CuPy (float16 input
            upcast); may be a strided view of the caller's array, never a modified one.
        targets: ``(N, S)`` int64, C-contiguous, ``S = max(target_lengths)``; entries at ``s >= target_lengths[n]``
            are 0, every other entry is in ``[0, C)`` and differs from ``blank``.
        input_lengths: ``(N,)`` int64 NumPy array on the host, each in ``[0, T]``.
        target_lengths: ``(N,)`` int64 NumPy array on the host, each ``>= 0``.
        blank, reduction, zero_infinity: the validated options.
        batched: False for the unbatched ``(T, C)`` form (results then drop the batch axis).
        out_dtype: dtype of the caller's ``log_probs``; losses and gradients are returned in it.
    """

    xp: Any
    log_probs: Any
    targets: Any
    input_lengths: np.ndarray
    target_lengths: np.ndarray
    blank: int
    reduction: str
    zero_infinity: bool
    batched: bool
    out_dtype: Any

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(T, N, C)``."""
        return tuple(self.log_probs.shape)


def _one_of(values) -> str:
    """``'a', 'b', 'c'``: the accepted values as a message lists them."""
    return ", ".join(repr(value) for value in values)


def check_convention(convention) -> str:
    """``convention`` if it is one of :data:`CONVENTIONS`.

    Raises:
        ValueError: any other value.
    """
    if not isinstance(convention, str) or convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {_one_of(CONVENTIONS)}, got {convention!r}")
    return convention


def check_blank(blank) -> int:
    """``blank`` as an int (its range is checked against C in :func:`validate`).

    Raises:
        TypeError: ``blank`` is not an integer (a bool is not one).
    """
    if type(blank) is int:  # the usual case, without the abstract-class check below
        return blank
    if isinstance(blank, (bool, np.bool_)) or not isinstance(blank, numbers.Integral):
        raise TypeError(f"blank must be an integer, got {blank!r} of type {type(blank).__name__}")
    return int(blank)


def check_options(blank, reduction, zero_infinity) -> tuple[int, str, bool]:
    """Validate the three options of ``nn.CTCLoss`` (and the ONNX op's attributes).

    ``blank`` is range-checked against C later, in :func:`validate`.

    Returns:
        ``(blank, reduction, zero_infinity)`` as ``(int, str, bool)``.

    Raises:
        TypeError: ``blank`` is not an integer, ``reduction`` not a string, ``zero_infinity`` not a bool or 0/1.
        ValueError: ``reduction`` is not one of ``'none'``, ``'mean'``, ``'sum'``; ``zero_infinity`` is an integer
            other than 0 or 1.
    """
    blank = check_blank(blank)
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a string, one of {REDUCTIONS}, got {reduction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {_one_of(REDUCTIONS)}, got {reduction!r}")
    if isinstance(zero_infinity, (bool, np.bool_)):
        zero_infinity = bool(zero_infinity)
    elif isinstance(zero_infinity, numbers.Integral):
        # The ONNX op carries zero_infinity as an int attribute.
        if zero_infinity not in (0, 1):
            raise ValueError(f"zero_infinity must be a bool (or 0/1), got {zero_infinity!r}")
        zero_infinity = bool(zero_infinity)
    else:
        raise TypeError(f"zero_infinity must be a bool, got {zero_infinity!r} of type {type(zero_infinity).__name__}")
    return blank, reduction, zero_infinity


def array_module(log_probs):
    """The array module (``numpy`` or ``cupy``) that owns ``log_probs``.

    Raises:
        TypeError: ``log_probs`` is neither a NumPy nor a CuPy array.
    """
    if isinstance(log_probs, np.ndarray):
        return np
    if type(log_probs).__module__.startswith("cupy"):
        import cupy

        if isinstance(log_probs, cupy.ndarray):
            return cupy
    hint = " (use deploy_ctc.torch for torch tensors)" if type(log_probs).__module__.startswith("torch") else ""
    raise TypeError(f"log_probs must be a numpy.ndarray or cupy.ndarray, got {type(log_probs).__name__}{hint}")


def _float_log_probs(log_probs, xp):
    """Return ``(log_probs for the backends, caller's dtype)``: float16 stays float16 on NumPy (the CPU backends upcast
    it a group of samples at a time) and is upcast to float32 on CuPy (the kernels take float and double);
    non-native byte order is converted (the results come back in native order)."""
    dtype = log_probs.dtype
    if not dtype.isnative:  # big-endian data from a file, say: the backends compute in native byte order
        dtype = dtype.newbyteorder("=")
        log_probs = log_probs.astype(dtype)
    kind = dtype.char  # one letter per type: comparing dtypes converts the other side on every call
    if kind == "e":  # float16
        return (log_probs if xp is np else log_probs.astype(np.float32)), dtype
    if kind in ("f", "d") or dtype in (np.float32, np.float64):  # (a platform may spell one with another letter)
        return log_probs, dtype
    raise TypeError(f"log_probs must have a floating dtype (float16, float32 or float64), got {dtype}")


_INT64_MAX = np.iinfo(np.int64).max


def _is_integer_dtype(dtype) -> bool:
    """Whether ``dtype`` is an integer dtype (bool is not one), as ``np.issubdtype(dtype, np.integer)``; the usual
    kinds are answered without it (it costs microseconds)."""
    return dtype.kind in "iu" or (dtype.kind != "b" and bool(np.issubdtype(dtype, np.integer)))


def integer_array(value, name: str, xp):
    """Convert an int / sequence / integer array to an integer array of ``xp`` without copying device data.

    Raises:
        TypeError: not integers (bools and floats included, as torch).
        ValueError: a value outside the int64 range (reported as given, not wrapped around).
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be integers, got {value!r}")
    if isinstance(value, np.ndarray) or (xp is not np and isinstance(value, xp.ndarray)):
        arr = value
    elif isinstance(value, (list, tuple)):
        arr = np.asarray(value)
        if not (_is_integer_dtype(arr.dtype) or arr.size == 0):
            # NumPy turns ints beyond 64 bits into objects, and a mix of uint64- and int64-only values into floats.
            for i, item in enumerate(np.asarray(value, dtype=object).reshape(-1)):
                if isinstance(item, (bool, np.bool_)) or not isinstance(item, numbers.Integral):
                    raise TypeError(f"{name} must be integers, got {value!r}")
                if not -_INT64_MAX - 1 <= int(item) <= _INT64_MAX:
                    raise ValueError(f"{name}[{i}] = {int(item)} is outside the int64 range")
            arr = np.asarray(value, dtype=np.int64)
    elif isinstance(value, numbers.Integral):
        value = operator.index(value)
        if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise ValueError(f"{name} = {value} is outside the int64 range")
        arr = np.asarray(value, dtype=np.int64)
    elif type(value).__module__.startswith("cupy"):
        # NumPy log_probs with device targets/lengths: NumPy cannot read device memory.
        raise TypeError(f"{name} is a CuPy (device) array but log_probs is a NumPy array; pass {name} as a NumPy "
                        "array, a sequence or an int")
    else:
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer array, got {type(value).__name__}")
    if not _is_integer_dtype(arr.dtype):
        raise TypeError(f"{name} must have an integer dtype (int32 or int64), got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size:  # uint64
        too_big = _to_host(arr > _INT64_MAX, xp)  # uint64 above int64: casting would wrap it to a negative value
        if too_big.any():
            first = _first_index(too_big)
            where = f"[{', '.join(map(str, first))}]" if first else ""
            raise ValueError(f"{name}{where} = {int(_to_host(arr[first], xp))} is outside the int64 range")
    return arr


def _lengths(value, name: str, n: int, batched: bool, xp):
    """``(N,)`` int64 array of ``xp`` from any accepted lengths form: as torch, any integer array (0-d included)
    or sequence holding exactly N values (one, when unbatched)."""
    arr = integer_array(value, name, xp)
    if arr.size != n:
        expected = f"N={n} entries (one per batch item)" if batched else "a single length for unbatched (T, C) log_probs"
        raise ValueError(f"{name} must have {expected}, got shape {tuple(arr.shape)}")
    # On NumPy, a private copy: what is checked is what the backends read, whatever the caller does meanwhile (CuPy
    # lengths reach the host as a copy).
    return arr.reshape(n).astype(np.int64, copy=xp is np)


def _first_index(mask) -> tuple[int, ...]:
    """Index of the first True entry of a (host) boolean array."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def validate(log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean",
             zero_infinity=False) -> CTCProblem:
    """Check the arguments of :func:`deploy_ctc.ctc_loss` and return them as a :class:`CTCProblem`.

    Accepted forms (those of ``torch.nn.CTCLoss``): ``log_probs`` ``(T, N, C)`` or unbatched ``(T, C)``; ``targets``
    padded ``(N, S)``, concatenated 1-D of length ``sum(target_lengths)``, or ``(S,)`` unbatched; lengths as an int,
    a tuple/list of ints or an integer array of any integer dtype holding N values (0-d included when N = 1, as
    torch), values within int64. Inputs are never modified.

    Raises:
        TypeError: non-float ``log_probs``; non-integer targets or lengths; non-array ``log_probs``.
        ValueError: wrong ranks or lengths counts, empty ``log_probs``, a length outside the int64 range, ``blank`` outside ``[0, C)``, negative
            lengths, ``input_lengths[n] > T``, ``target_lengths[n] > S``, concatenated length mismatch, a target value
            outside ``[0, C)`` or equal to ``blank`` within its target's length; bad ``reduction``.
    """
    blank, reduction, zero_infinity = check_options(blank, reduction, zero_infinity)
    xp = array_module(log_probs)
    log_probs, out_dtype = _float_log_probs(log_probs, xp)

    if log_probs.ndim not in (2, 3):
        raise ValueError(f"log_probs must be 3-D (T, N, C) or 2-D (T, C), got shape {tuple(log_probs.shape)}")
    batched = log_probs.ndim == 3
    if not batched:
        log_probs = log_probs[:, None, :]  # (T, 1, C)
    T, N, C = log_probs.shape
    if T == 0 or N == 0 or C == 0:
        raise ValueError(f"log_probs must not be empty, got shape {tuple(log_probs.shape if batched else (T, C))}")
    if not 0 <= blank < C:
        raise ValueError(f"blank={blank} must be in [0, C={C})")

    il = _lengths(input_lengths, "input_lengths", N, batched, xp)  # (N,)
    tl = _lengths(target_lengths, "target_lengths", N, batched, xp)  # (N,)

    targets = integer_array(targets, "targets", xp)
    targets = xp.asarray(targets)
    if targets.ndim == 0:
        raise ValueError("targets must be 1-D or 2-D, got a scalar")
    padded = targets.ndim == 2
    if targets.ndim > 2 or (not batched and padded):
        raise ValueError(f"targets must be (N, S) or 1-D for batched log_probs and (S,) for unbatched, "
                         f"got shape {tuple(targets.shape)}")
    if padded and targets.shape[0] != N:
        raise ValueError(f"targets must have N={N} rows, got shape {tuple(targets.shape)}")
    concatenated = batched and not padded
    width = targets.shape[-1]  # S of the padded / unbatched form, total length when concatenated

    if xp is np:
        # The lengths are private copies (_lengths): the checks and the backends see the same values.
        S, labels = _check_lengths(il, tl, T, width, concatenated)
        dense = _dense_targets(targets, tl, tl, S, width, concatenated, np)  # (N, S) private, checked next
        if not _labels_valid(dense, labels, C, blank):
            bad = _bad_targets(targets, tl, C, blank, width, concatenated, np)
            _raise_bad_target(targets, bad, tl, C, blank, concatenated, batched, np)
        il_host, tl_host = il, tl
    else:
        # Device-side check of target values, then the one host transfer: both lengths and the bad-value count.
        bad = _bad_targets(targets, tl, C, blank, width, concatenated, xp)
        bad_count = xp.count_nonzero(bad).reshape(1).astype(np.int64)
        host = _to_host(xp.concatenate([il, tl, bad_count]), xp)  # (2N + 1,)
        il_host, tl_host, n_bad = host[:N], host[N:2 * N], int(host[2 * N])
        S, _ = _check_lengths(il_host, tl_host, T, width, concatenated)
        if n_bad:
            _raise_bad_target(targets, bad, tl_host, C, blank, concatenated, batched, xp)
        dense = _dense_targets(targets, tl, tl_host, S, width, concatenated, xp)

    return CTCProblem(xp=xp, log_probs=log_probs, targets=dense, input_lengths=il_host, target_lengths=tl_host,
                      blank=blank, reduction=reduction, zero_infinity=zero_infinity, batched=batched,
                      out_dtype=out_dtype)


def _low_high(values: np.ndarray) -> tuple[int, int]:
    """``(min, max)`` of a non-empty host integer array, as ints (a short one through a list: a NumPy reduction costs
    more than the whole list)."""
    if values.size <= _SHORT:
        listed = values.tolist()
        return min(listed), max(listed)
    return int(values.min()), int(values.max())


_SHORT = 64  # arrays up to this long are reduced as Python lists


def _check_lengths(il, tl, T: int, width: int, concatenated: bool) -> tuple[int, int]:
    """Check the host ``(N,)`` int64 lengths against ``T`` and the targets' ``width`` (``S``, or the concatenated
    length); returns ``(max(target_lengths), sum(target_lengths))``.

    Raises:
        ValueError: a negative length, ``input_lengths[n] > T``, ``target_lengths[n] > width``, or concatenated
            targets whose length is not ``sum(target_lengths)`` (the first of these, in this order).
    """
    il_low, il_high = _low_high(il)
    tl_low, tl_high = _low_high(tl)
    for name, lengths, low in (("input_lengths", il, il_low), ("target_lengths", tl, tl_low)):
        if low < 0:
            i = int(np.argmax(lengths < 0))
            raise ValueError(f"{name}[{i}] = {lengths[i]} must be non-negative")
    if il_high > T:
        i = int(np.argmax(il > T))
        raise ValueError(f"input_lengths[{i}] = {il[i]} exceeds T={T} (log_probs.shape[0])")
    if tl_high > width:
        i = int(np.argmax(tl > width))
        if concatenated:
            raise ValueError(f"target_lengths[{i}] = {tl[i]} exceeds the length of the 1-D (concatenated) "
                             f"targets, {width}")
        raise ValueError(f"target_lengths[{i}] = {tl[i]} exceeds S={width} (targets.shape[-1])")
    # Each length is now in [0, width]: their int64 sum is exact below 2^63, else summed in Python ints (an int64 sum
    # could wrap around to the right total).
    total = int(tl.sum()) if _SHORT < tl.size and tl.size * width < 2**63 else sum(tl.tolist())
    if concatenated and total != width:
        raise ValueError(f"sum(target_lengths) = {total} must equal the length of the 1-D "
                         f"(concatenated) targets, {width}")
    return tl_high, total


def _bad_targets(targets, tl, C: int, blank: int, width: int, concatenated: bool, xp):
    """Which entries within their target's length are outside ``[0, C)`` or equal ``blank``: ``(P,)`` bool for
    concatenated targets, else ``(N, width)``; ``tl`` the ``(N,)`` lengths in ``xp``."""
    N = tl.shape[0]
    if concatenated:
        ends = xp.cumsum(tl)  # (N,) end offset of each target
        bad_value = (targets < 0) | (targets >= C) | (targets == blank)  # (P,)
        inside = xp.arange(width) < ends[-1]  # (P,) entries covered by the lengths
    else:
        flat_targets = targets.reshape(N, width)  # (N, S)
        bad_value = (flat_targets < 0) | (flat_targets >= C) | (flat_targets == blank)  # (N, S)
        inside = xp.arange(width)[None, :] < tl[:, None]  # (N, S)
    return bad_value & inside


def _dense_targets(targets, tl, tl_host, S: int, width: int, concatenated: bool, xp):
    """The ``(N, S)`` int64 C-contiguous targets of :class:`CTCProblem` (a new array, zero beyond each length) from
    lengths-checked padded, unbatched or concatenated ``targets``; ``tl`` the lengths in ``xp``, ``tl_host`` on the
    host."""
    N = tl_host.shape[0]
    pos = xp.arange(S)  # (S,)
    if concatenated:
        starts = xp.asarray(np.cumsum(tl_host) - tl_host)  # (N,)
        index = xp.minimum(starts[:, None] + pos[None, :], max(width - 1, 0))  # (N, S)
        gathered = targets[index] if width else xp.zeros((N, S), dtype=targets.dtype)
    else:
        gathered = targets.reshape(N, width)[:, :S]  # (N, S)
    keep = pos[None, :] < tl[:, None]  # (N, S)
    return xp.ascontiguousarray(xp.where(keep, gathered, 0), dtype=np.int64)


def _labels_valid(dense, labels: int, C: int, blank: int) -> bool:
    """Whether every label of host ``dense`` ``(N, S)`` int64 targets (0 beyond each target's length; ``labels`` the
    sum of the lengths) is in ``[0, C)`` and differs from ``blank``, in two NumPy calls."""
    if not dense.size:
        return True
    # Negative labels are above 2^63 as unsigned: one maximum checks both ends of [0, C) (the padding 0 is in it).
    if int(np.maximum.reduce(dense.view(np.uint64), axis=None)) >= C:
        return False
    if blank == 0:  # the padding is 0 too: exactly the sum(tl) labels must be nonzero
        return int(np.count_nonzero(dense)) == labels
    return not (dense == blank).any()


def _to_host(arr, xp) -> np.ndarray:
    return arr if xp is np else xp.asnumpy(arr)


def _raise_bad_target(targets, bad, tl_host, C, blank, concatenated, batched, xp):
    """Raise the ValueError for the first bad target value (error path: extra host transfers are fine)."""
    bad = _to_host(bad, xp)
    idx = _first_index(bad)
    value = int(_to_host(targets.reshape(bad.shape)[idx], xp))
    if concatenated:
        n = int(np.searchsorted(np.cumsum(tl_host), idx[0], side="right"))
        s = idx[0] - int(np.cumsum(tl_host)[n] - tl_host[n])
        where = f"targets[{idx[0]}] (target {n}, position {s})"
    elif batched:
        where = f"targets[{idx[0]}, {idx[1]}]"
    else:
        where = f"targets[{idx[-1]}]"
    if value == blank:
        raise ValueError(f"{where} = {value} equals blank={blank}; targets must not contain the blank label")
    raise ValueError(f"{where} = {value} is outside [0, C={C})")
