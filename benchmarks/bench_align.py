"""Forced-alignment benchmark: deploy_ctc.forced_align against a per-sample NumPy Viterbi loop, and against the
CTC loss's forward pass on the same shape (float32).

Usage: python benchmarks/bench_align.py [--repeats 5] [--output benchmarks/results/bench_align.json]

Implementations, run interleaved in rounds after one warm-up each (medians reported):
- ``native``: :func:`deploy_ctc.forced_align` on the native engine (threads over samples);
- ``numpy``: the same on the pure-NumPy backend (batched over samples);
- ``numpy_loop``: the obvious alternative, a Viterbi written per sample with NumPy vector operations over the
  lattice (a Python loop over samples and frames), checked to give the same alignments;
- ``loss_forward``: :func:`deploy_ctc.ctc_loss` (reduction "none") on the native engine: the targets read the
  alignment's time against it;
- ``torchaudio``: ``torchaudio.functional.forced_align`` one sample at a time, where torchaudio imports.

Inputs: :func:`benchmarks.common.make_inputs` (full input lengths, target lengths uniform in ``[S/2, S]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout's root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deploy_ctc  # noqa: E402
from benchmarks.common import interleaved_medians, make_inputs  # noqa: E402
from deploy_ctc import backends  # noqa: E402

SHAPES = ((500, 32, 30, 100), (1500, 8, 5000, 300))  # (T, N, C, S)


def numpy_loop_align(lp, targets, input_lengths, target_lengths, blank=0):
    """Per-sample Viterbi: for each sample, a loop over frames of NumPy operations on its ``2S + 1`` positions."""
    T, N, _ = lp.shape
    alignment = np.full((T, N), blank, dtype=np.int64)
    scores = np.zeros((T, N), dtype=lp.dtype)
    for n in range(N):
        frames, target = int(input_lengths[n]), targets[n, : int(target_lengths[n])]
        labels = np.full(2 * target.size + 1, blank)
        labels[1::2] = target
        skip = np.zeros(labels.size, dtype=bool)
        skip[3::2] = target[1:] != target[:-1]
        delta = np.full(labels.size, -np.inf)
        moves = np.zeros((frames, labels.size), dtype=np.int8)
        for t in range(frames):
            emit = lp[t, n, labels].astype(np.float64)
            if t == 0:
                delta = np.where(np.arange(labels.size) < 2, emit, -np.inf)
                continue
            shifted = np.concatenate(([-np.inf, -np.inf], delta))
            one = shifted[1:-1]
            two = np.where(skip, shifted[:-2], -np.inf)
            step = one > delta
            best = np.where(step, one, delta)
            jump = two > best
            moves[t] = np.where(jump, 2, step)
            delta = np.where(jump, two, best) + emit
        s = labels.size - 2 if labels.size > 1 and delta[-2] >= delta[-1] else labels.size - 1
        if delta[s] == -np.inf:
            scores[:frames, n] = -np.inf
            continue
        for t in range(frames - 1, -1, -1):
            alignment[t, n] = labels[s]
            scores[t, n] = lp[t, n, labels[s]]
            s -= int(moves[t, s])
    return alignment, scores


def _torchaudio():
    try:
        import torch
        import torchaudio.functional as F

        F.forced_align(torch.zeros(1, 2, 3), torch.tensor([[1]], dtype=torch.int32))
        return torch, F
    except Exception as error:  # noqa: BLE001 -- any import or load failure means "not available here"
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def run_shape(shape, repeats, torchaudio):
    T, N, C, S = shape
    lp, targets, il, tl = make_inputs(T, N, C, S)

    def on(choice, function):
        def call():
            with backends.using(choice):
                return function()
        return call

    runs = {
        "native": on("native", lambda: deploy_ctc.forced_align(lp, targets, il, tl)),
        "numpy": on("numpy", lambda: deploy_ctc.forced_align(lp, targets, il, tl)),
        "numpy_loop": lambda: numpy_loop_align(lp, targets, il, tl),
        "loss_forward": on("native", lambda: deploy_ctc.ctc_loss(lp, targets, il, tl, reduction="none")),
    }
    if not isinstance(torchaudio, str):
        torch, F = torchaudio
        lp_t = torch.from_numpy(lp).transpose(0, 1).contiguous()

        def torchaudio_loop():
            for n in range(N):
                F.forced_align(lp_t[n:n + 1], torch.from_numpy(targets[n:n + 1, : tl[n]]).int())
        runs["torchaudio"] = torchaudio_loop

    results = {name: runs[name]() for name in ("native", "numpy", "numpy_loop")}
    reference = results["native"]
    agree = {name: bool(np.array_equal(results[name][0], reference[0]) and
                        np.array_equal(results[name][1], reference[1])) for name in ("numpy", "numpy_loop")}
    medians = interleaved_medians(runs, repeats)
    return {
        "shape": {"T": T, "N": N, "C": C, "S": S},
        "median_s": medians,
        "numpy_loop_over_native": medians["numpy_loop"] / medians["native"],
        "native_over_loss_forward": medians["native"] / medians["loss_forward"],
        "numpy_over_native": medians["numpy"] / medians["native"],
        "alignments_equal_to_native": agree,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torchaudio = _torchaudio()
    rows = [run_shape(shape, args.repeats, torchaudio) for shape in SHAPES]
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()},
        "dtype": "float32",
        "repeats": args.repeats,
        "cpu_backend_threads": deploy_ctc._backends.cpu.common.pool_size(),
        "torchaudio": "timed" if not isinstance(torchaudio, str) else f"not available ({torchaudio})",
        "shapes": rows,
    }
    print("| (T, N, C, S) | native ms | NumPy backend ms | per-sample NumPy loop ms | loss forward ms | loop / native "
          "| native / loss forward |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        shape, m = row["shape"], row["median_s"]
        print(f"| ({shape['T']}, {shape['N']}, {shape['C']}, {shape['S']}) | {m['native'] * 1e3:.2f} | "
              f"{m['numpy'] * 1e3:.1f} | {m['numpy_loop'] * 1e3:.1f} | {m['loss_forward'] * 1e3:.2f} | "
              f"{row['numpy_loop_over_native']:.1f}x | {row['native_over_loss_forward']:.2f} |")
    print(f"torchaudio: {report['torchaudio']}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
