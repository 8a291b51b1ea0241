"""deploy_ctc.torch.forced_align: torchaudio's signature and batch-first layout, any batch size.

torchaudio 2.11 (the release whose semantics this follows) does not load beside the torch installed here, so the
oracle is brute-force enumeration (tests/utils/oracles.py) plus torchaudio's documented output conventions.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import deploy_ctc  # noqa: E402
import deploy_ctc.torch as dt  # noqa: E402
from tests.utils.oracles import brute_force_alignment, log_softmax  # noqa: E402


def test_batch_first_results_match_brute_force(rng):
    N, T, C = 5, 6, 4
    lp = log_softmax(rng.normal(size=(N, T, C)) * 2)
    targets = rng.integers(1, C, size=(N, 3))
    il, tl = np.array([6, 5, 6, 4, 6]), np.array([3, 2, 1, 3, 0])
    alignment, scores = dt.forced_align(torch.from_numpy(lp), torch.from_numpy(targets).int(), torch.from_numpy(il),
                                        torch.from_numpy(tl))
    assert alignment.shape == (N, T) and alignment.dtype == torch.int32 and scores.dtype == torch.float64
    for n in range(N):
        path, best = brute_force_alignment(lp[n, : il[n]], targets[n, : tl[n]])
        np.testing.assert_array_equal(alignment[n, : il[n]].numpy(), path)
        np.testing.assert_array_equal(alignment[n, il[n]:].numpy(), 0)
        np.testing.assert_array_equal(scores[n, : il[n]].numpy(), lp[n, np.arange(il[n]), path])
        np.testing.assert_array_equal(scores[n, il[n]:].numpy(), 0.0)


def test_defaults_and_dtypes_as_torchaudio(rng):
    lp = torch.from_numpy(log_softmax(rng.normal(size=(1, 8, 5)))).float()
    targets = torch.tensor([[1, 2, 2]])
    alignment, scores = dt.forced_align(lp, targets)  # lengths default to T and L
    assert alignment.dtype == torch.int64 and scores.dtype == torch.float32 and alignment.shape == (1, 8)
    picked = np.take_along_axis(lp.numpy(), alignment.numpy()[..., None], 2)[..., 0]  # (1, T)
    np.testing.assert_array_equal(scores.numpy(), picked)
    half, _ = dt.forced_align(lp.bfloat16(), targets)
    assert half.shape == (1, 8)
    listed, _ = dt.forced_align(lp, targets, [8], (3,))  # lengths as sequences, as the loss takes them
    np.testing.assert_array_equal(listed.numpy(), alignment.numpy())


def test_same_alignment_as_the_numpy_front_end(rng):
    lp = log_softmax(rng.normal(size=(30, 4, 7)) * 3).astype(np.float32)  # (T, N, C)
    targets = rng.integers(1, 7, size=(4, 9))
    il, tl = np.array([30, 25, 12, 30]), np.array([9, 4, 9, 0])
    expected = deploy_ctc.forced_align(lp, targets, il, tl)
    got = dt.forced_align(torch.from_numpy(lp).transpose(0, 1), torch.from_numpy(targets), torch.from_numpy(il),
                          torch.from_numpy(tl))
    np.testing.assert_array_equal(got[0].numpy().T, expected[0])
    np.testing.assert_array_equal(got[1].numpy().T, expected[1])


@pytest.mark.parametrize("bad, message", [
    (dict(log_probs=torch.zeros(6, 5)), r"\(N, T, C\)"),
    (dict(targets=torch.tensor([1, 2])), r"\(N, L\)"),
    (dict(targets=torch.tensor([[1, 0]])), r"targets\[0, 1\] = 0 equals blank=0"),
])
def test_bad_arguments(bad, message):
    args = dict(log_probs=torch.full((1, 6, 5), -1.0), targets=torch.tensor([[1, 2]]))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        dt.forced_align(**args)
