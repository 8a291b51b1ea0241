"""benchmarks/bench_align.py: its per-sample NumPy baseline aligns like brute force, and a tiny shape reports."""

import json

import numpy as np

from benchmarks import bench_align
from tests.utils.oracles import brute_force_alignment, log_softmax


def test_the_per_sample_baseline_matches_brute_force(rng):
    lp = -rng.choice([0.5, 1.0, 2.0], size=(6, 6, 4))  # exact sums: ties decided by the documented rule
    lp[:, 3] = log_softmax(rng.normal(size=(6, 4)))
    targets = rng.integers(1, 4, size=(6, 3))
    targets[0, 1] = targets[0, 0]
    il, tl = np.array([6, 5, 6, 6, 2, 6]), np.array([3, 2, 1, 3, 2, 0])
    alignment, scores = bench_align.numpy_loop_align(lp, targets, il, tl)
    for n in range(6):
        path, _ = brute_force_alignment(lp[: il[n], n], targets[n, : tl[n]])
        if path is None:
            np.testing.assert_array_equal(scores[: il[n], n], -np.inf)
        else:
            np.testing.assert_array_equal(alignment[: il[n], n], path)


def test_a_tiny_shape_reports_agreeing_alignments():
    row = bench_align.run_shape((12, 3, 5, 4), repeats=1, torchaudio="not installed")
    assert row["alignments_equal_to_native"] == {"numpy": True, "numpy_loop": True}
    assert set(row["median_s"]) == {"native", "numpy", "numpy_loop", "loss_forward"}
    json.dumps(row)
