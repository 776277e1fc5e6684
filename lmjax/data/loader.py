"""Batches of `seq_len` windows over the token stream, with segment ids and positions.

Training batch `step` is a pure function of (seed, step): windows start at offsets drawn from
a generator seeded by both, so a resumed run sees exactly the batches it would have seen and
no iterator state needs saving. A window may span documents; `segment_ids` (1, 2, ... within
the window) keep them from attending to each other, `positions` restart at each document, and
`loss_mask` drops the targets that cross a boundary. Validation batches are consecutive
windows from the start of the split.
"""

from __future__ import annotations

import numpy as np

from lmjax.data.cache import Split


def windows(split: Split, starts_B: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Windows of `seq_len + 1` tokens starting at `starts_B`, as model inputs and targets."""
    n = len(split.tokens)
    unwrapped_BT = starts_B[:, None] + np.arange(seq_len + 1)  # a short split repeats
    wraps_BT, idx_BT = np.divmod(unwrapped_BT, n)
    tokens_BT = np.asarray(split.tokens[idx_BT.ravel()], np.int32).reshape(idx_BT.shape)
    doc_BT = np.searchsorted(split.starts, idx_BT, side="right") - 1
    doc_BT = doc_BT + wraps_BT * len(split.starts)  # each repeat of a document is a new one
    segments_BT = doc_BT - doc_BT[:, :1] + 1
    doc_start_BT = split.starts[doc_BT % len(split.starts)] + wraps_BT * n
    # Positions count from the document's start, or from the window's when it began earlier.
    positions_BT = unwrapped_BT - np.maximum(doc_start_BT, starts_B[:, None])
    return {
        "inputs": tokens_BT[:, :-1],
        "targets": tokens_BT[:, 1:],
        "segment_ids": segments_BT[:, :-1].astype(np.int32),
        "positions": positions_BT[:, :-1].astype(np.int32),
        "loss_mask": (segments_BT[:, 1:] == segments_BT[:, :-1]).astype(np.float32),
    }


class TrainBatches:
    def __init__(self, split: Split, seq_len: int, batch_size: int, seed: int):
        if len(split.tokens) <= seq_len + 1:
            from lmjax.config import UserError

            raise UserError(
                f"the training split has {len(split.tokens)} tokens, fewer than one window of "
                f"model.seq_len+1={seq_len + 1}; add data or lower model.seq_len"
            )
        self.split, self.seq_len, self.batch_size, self.seed = split, seq_len, batch_size, seed

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        # A window holds seq_len + 1 tokens, so the last start is n - seq_len - 1 (inclusive).
        starts_B = rng.integers(0, len(self.split.tokens) - self.seq_len, self.batch_size)
        return windows(self.split, starts_B, self.seq_len)


def eval_batches(split: Split, seq_len: int, batch_size: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """The first `n_batches` batches of consecutive windows (wrapping round a short split)."""
    return [
        windows(split, (b * batch_size + np.arange(batch_size)) * seq_len, seq_len) for b in range(n_batches)
    ]
