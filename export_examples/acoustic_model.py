"""The small acoustic model of the examples: conv front-end + BiLSTM over 80-dim features, 30 classes.

Defined in :mod:`deploy_ctc.demo` (so the installed ``deploy-ctc demo`` command carries it) and
re-exported here for the example scripts and the training helper:

- ``AcousticModel(n_mels=80, n_classes=30, hidden=64)``: forward(features (N, T, 80), feature_lengths (N,))
  -> (log_probs (T', N, C), output_lengths (N,)), T' = ceil(T / 2).
- ``AcousticModelWithLoss(model, blank=0, reduction="mean")``: the same followed by ``F.ctc_loss``.
- ``make_batch(batch_size, max_frames, ...)``: synthetic features, lengths and feasible targets.
"""

from deploy_ctc.demo import N_CLASSES, N_MELS, AcousticModel, AcousticModelWithLoss, make_batch

__all__ = ["N_CLASSES", "N_MELS", "AcousticModel", "AcousticModelWithLoss", "make_batch"]
