"""Batches of `seq_len` windows cut from the token cache, shuffled and mixed by grain.

Packing is concat-then-split: a split's documents lie back to back, and window `w` is tokens
[w*seq_len, (w+1)*seq_len] (inputs and the shifted targets). Each document is <s> text </s>;
`segment_ids` (1, 2, ... within the window) keep documents from attending to each other,
`positions` restart at each document, and `loss_mask` drops the one target per boundary that
would predict the next document's <s>; in a conversation it also drops every target outside the
trained ranges (the system's and user's tokens), so the loss is the assistant's alone. Nothing
is dropped but the split's last partial window (fewer than seq_len tokens).

Training: grain shuffles the window ids of each corpus with a seed (a new order every epoch),
mixes corpora by weight, and batches; each host builds only the rows of the global batch
its devices hold. Batch `step` is a pure function of (seed, step), and the iterator's state is
the step it reaches next, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import grain
import numpy as np

from lmjax.config import UserError
from lmjax.data.cache import Split

Batch = dict[str, np.ndarray]
Placed = TypeVar("Placed")  # a batch once on the devices


def windows(split: Split, starts_B: np.ndarray, seq_len: int) -> Batch:
    """Windows of `seq_len + 1` tokens starting at token offsets `starts_B`, as inputs/targets."""
    idx_BT1 = starts_B[:, None] + np.arange(seq_len + 1)  # T1 = T + 1: inputs and targets
    tokens_BT1 = split.take(idx_BT1)
    doc_BT1 = np.searchsorted(split.starts, idx_BT1, side="right") - 1
    segments_BT1 = doc_BT1 - doc_BT1[:, :1] + 1
    # Positions count from the document's start, or from the window's when it began earlier.
    positions_BT1 = idx_BT1 - np.maximum(split.starts[doc_BT1], starts_B[:, None])
    loss_mask_BT = segments_BT1[:, 1:] == segments_BT1[:, :-1]
    if split.trained is not None:  # conversations: only the trained targets (the assistant's)
        loss_mask_BT &= np.searchsorted(split.trained, idx_BT1[:, 1:], side="right") % 2 == 1
    return {
        "inputs": tokens_BT1[:, :-1],
        "targets": tokens_BT1[:, 1:],
        "segment_ids": segments_BT1[:, :-1].astype(np.int32),
        "positions": positions_BT1[:, :-1].astype(np.int32),
        "loss_mask": loss_mask_BT.astype(np.float32),
    }


def num_windows(split: Split, seq_len: int) -> int:
    return (len(split) - 1) // seq_len


def max_segments(splits: Sequence[Split], seq_len: int) -> int:
    """The most documents any window of these splits holds (sizes the cuDNN packed kernel): what
    the cache recorded for `seq_len` when every split has it (cache_meta.summarize, the same
    count), else counted over every window."""
    recorded = [split.most_documents.get(str(seq_len)) for split in splits]
    if None not in recorded:
        return max([1, *recorded])
    most = 1
    for split in splits:
        window_starts = np.arange(num_windows(split, seq_len)) * seq_len
        begun_inside = np.searchsorted(split.starts, window_starts + seq_len) - np.searchsorted(
            split.starts, window_starts, side="right"
        )
        most = max(most, int(begun_inside.max(initial=0)) + 1)
    return most


class _Materialize:
    """(corpus ids, window ids) of a global batch -> this host's rows, as token windows."""

    def __init__(self, splits: list[Split], seq_len: int, rows: np.ndarray | None):
        self.splits, self.seq_len, self.rows = splits, seq_len, rows

    def __call__(self, ids: tuple[np.ndarray, np.ndarray]) -> Batch:
        part_B, window_B = (np.asarray(x) for x in ids)
        if self.rows is not None:
            part_B, window_B = part_B[self.rows], window_B[self.rows]
        out: Batch = {}
        for p in np.unique(part_B):
            mine = np.flatnonzero(part_B == p)
            for name, value in windows(self.splits[p], window_B[mine] * self.seq_len, self.seq_len).items():
                out.setdefault(name, np.empty((len(part_B), self.seq_len), value.dtype))[mine] = value
        return out


def _window_counts(splits: list[Split], seq_len: int, what: str) -> list[int]:
    """Per corpus, its number of windows; UserError for a split shorter than one window."""
    counts = [num_windows(split, seq_len) for split in splits]
    for split, n in zip(splits, counts, strict=True):
        if n < 1:
            raise UserError(
                f"the {what} split has {len(split)} tokens, fewer than one window of "
                f"model.seq_len+1={seq_len + 1}; add data or lower model.seq_len"
            )
    return counts


def _window_ids(splits: list[Split], seq_len: int, what: str) -> list[grain.MapDataset]:
    """Per corpus, a grain MapDataset of (corpus index, window id) over all its windows."""
    return [
        grain.MapDataset.range(n).map(lambda w, p=p: (p, w))
        for p, n in enumerate(_window_counts(splits, seq_len, what))
    ]


class TrainBatches:
    """Shuffled, mixed training batches: `batches[step]`, or iterate with prefetch.

    `rows`: the rows of the global batch this host loads (`sharding.BatchPlacement.rows`); None
    for all.
    """

    def __init__(
        self,
        splits: list[Split],
        weights: Sequence[float],
        seq_len: int,
        batch_size: int,
        seed: int,
        rows: np.ndarray | None = None,
        prefetch: int = 4,
    ):
        parts = [
            ds.shuffle(seed=(seed * 1_000_003 + 7919 * p) % 2**32).repeat()
            for p, ds in enumerate(_window_ids(splits, seq_len, "training"))
        ]
        mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights))  # exact ratios
        self.dataset = mixed.batch(batch_size).map(_Materialize(splits, seq_len, rows))
        options = grain.ReadOptions(num_threads=min(prefetch, 2), prefetch_buffer_size=prefetch)
        self._iterable = self.dataset.to_iter_dataset(options)
        self._iterator = iter(self._iterable)

    def __getitem__(self, step: int) -> Batch:
        return self.dataset[step]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self) -> dict:
        """What a checkpoint saves: restores the iterator to the batch it would yield next."""
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)


class DevicePrefetch(Generic[Placed]):
    """Keeps the next batch already on the devices (`put` places it) while a step runs.

    `get_state` is the loader's state for the batch `next` returns next, not for the one
    fetched ahead, so a checkpoint taken between steps resumes at the right batch."""

    def __init__(self, batches: TrainBatches, put: Callable[[Batch], Placed]):
        self._batches, self._put = batches, put
        self._state = batches.get_state()
        self._ahead = put(next(batches))

    def __iter__(self) -> Iterator[Placed]:
        return self

    def __next__(self) -> Placed:
        batch = self._ahead
        self._state = self._batches.get_state()
        self._ahead = self._put(next(self._batches))
        return batch

    def get_state(self) -> dict:
        return self._state


class EvalBatches(Sequence):
    """Validation batches in a fixed order, each built when it is read (a whole split of a large
    corpus is many): `n_batches` of them, each corpus giving its first windows in proportion
    to its weight (fewer when it has fewer), or with `n_batches=0` every window of every corpus.

    The last batch is filled with rows whose loss_mask is 0, so every window counts once and
    none twice. `rows`: the rows of each global batch this host loads (None: all)."""

    def __init__(
        self,
        splits: list[Split],
        weights: Sequence[float],
        seq_len: int,
        batch_size: int,
        n_batches: int,
        rows: np.ndarray | None = None,
    ):
        counts = _window_counts(splits, seq_len, "validation")
        if n_batches:
            wanted = n_batches * batch_size
            counts = [min(n, round(wanted * w / sum(weights))) for n, w in zip(counts, weights, strict=True)]
        # (corpus, window) pairs: each corpus's first windows, in order (made at once: a split of
        # a large corpus has millions of windows, and start-up must not walk them)
        window_ids = np.concatenate(
            [np.stack([np.full(n, p), np.arange(n)], axis=1) for p, n in enumerate(counts)]
        )
        if n_batches:
            window_ids = window_ids[:wanted]
        self.windows = len(window_ids)
        # [windows, 2]: (corpus, window) pairs, padded to whole batches
        self._window_ids = np.pad(window_ids, ((0, -len(window_ids) % batch_size), (0, 0)))
        self._batch_size, self._rows = batch_size, rows
        self._materialize = _Materialize(splits, seq_len, rows)

    def __len__(self) -> int:
        return len(self._window_ids) // self._batch_size

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        first = i * self._batch_size
        ids_B2 = self._window_ids[first : first + self._batch_size]
        batch = self._materialize(tuple(ids_B2.T))
        row_B = first + (np.arange(self._batch_size) if self._rows is None else self._rows)
        batch["loss_mask"][row_B >= self.windows] = 0  # the padding rows
        return batch
