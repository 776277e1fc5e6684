"""Batches of uniform random tokens for the throughput benchmark, in the training loader's
layout: plain causal rows, or packed rows of several documents (no tokenizer, no data pipeline)."""

from __future__ import annotations

import numpy as np


def random_batch(
    rng: np.random.Generator, batch_size: int, seq_len: int, vocab: int, packed: bool = False
) -> dict[str, np.ndarray]:
    """Uniform random tokens. Plain: one document per row and no segment ids or positions, so
    attention takes its plain causal path (cuDNN on a GPU), as the peers measure. Packed: the
    loader's layout (`lmjax.data.loader.windows`), documents of lengths drawn uniformly from
    [seq_len/16, seq_len] back to back, segment ids counting from 1 and positions restarting
    at each document; the target that would predict the next document's first token is masked."""
    n = seq_len + 1  # T1 = T + 1: inputs and targets
    tokens_BT1 = rng.integers(0, vocab, (batch_size, n), dtype=np.int32)
    if not packed:
        return {
            "inputs": tokens_BT1[:, :-1],
            "targets": tokens_BT1[:, 1:],
            "loss_mask": np.ones((batch_size, seq_len), np.float32),
        }
    segments_BT1 = np.ones((batch_size, n), np.int32)
    positions_BT1 = np.zeros((batch_size, n), np.int32)
    for row in range(batch_size):
        start, doc = 0, 1
        while start < n:
            end = min(n, start + int(rng.integers(max(1, seq_len // 16), seq_len + 1)))
            segments_BT1[row, start:end] = doc
            positions_BT1[row, start:end] = np.arange(end - start)
            start, doc = end, doc + 1
    return {
        "inputs": tokens_BT1[:, :-1],
        "targets": tokens_BT1[:, 1:],
        "segment_ids": segments_BT1[:, :-1],
        "positions": positions_BT1[:, :-1],
        "loss_mask": (segments_BT1[:, 1:] == segments_BT1[:, :-1]).astype(np.float32),
    }


def max_segments(batches: list[dict[str, np.ndarray]]) -> int:
    """The most documents any row of these batches holds (1 for plain batches)."""
    counts = [
        1 + np.count_nonzero(np.diff(b["segment_ids"], axis=1), axis=1).max()
        for b in batches
        if "segment_ids" in b
    ]
    return int(max(counts, default=1))
