"""One chunk of a corpus (an input file, see sources.py) encoded into framed token streams.

The unit that every build shares: the in-process build encodes chunks one after another and
appends them to its shards in order; the Beam pipeline (prepare_beam.py) encodes them on its
workers and cuts the same shards from them. A chunk's documents become, per split, one stream
of <s> ids </s> back to back and where each document starts in it, so both give the same
tokens in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from lmjax.config import Source
from lmjax.data import sources, tokenizer
from lmjax.data.cache_meta import SPLITS

ENCODE_BATCH_CHARS = 2 << 20  # texts per sentencepiece call: enough to keep every thread busy


@dataclasses.dataclass
class Stream:
    """Documents of one split framed as <s> ids </s> back to back: `tokens`, where each
    document starts in it (`starts`, int64), and the characters and UTF-8 bytes of their text."""

    tokens: np.ndarray
    starts: np.ndarray
    chars: int = 0
    bytes: int = 0

    @classmethod
    def empty(cls, dtype: np.dtype) -> Stream:
        return cls(np.zeros(0, dtype), np.zeros(0, np.int64))

    @classmethod
    def joined(cls, streams: list[Stream], dtype: np.dtype) -> Stream:
        """`streams` one after another, their starts shifted to the joined tokens."""
        if not streams:
            return cls.empty(dtype)
        offsets = np.cumsum([0] + [len(s.tokens) for s in streams[:-1]])
        return cls(
            np.concatenate([s.tokens for s in streams]).astype(dtype, copy=False),
            np.concatenate([s.starts + o for s, o in zip(streams, offsets, strict=True)]).astype(np.int64),
            sum(s.chars for s in streams),
            sum(s.bytes for s in streams),
        )


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def frame(ids: np.ndarray, lengths: np.ndarray, bos_id: int, eos_id: int, dtype: np.dtype) -> Stream:
    """Documents' `ids` back to back, `lengths` ids each, framed as <s> ids </s>."""
    framed = lengths + 2
    starts = np.concatenate([[0], np.cumsum(framed)[:-1]]).astype(np.int64)
    stream = np.empty(int(framed.sum()), dtype)
    is_text = np.ones(len(stream), bool)
    is_text[starts] = is_text[starts + framed - 1] = False
    stream[starts], stream[starts + framed - 1], stream[is_text] = bos_id, eos_id, ids
    return Stream(stream, starts)


def encode_chunk(
    c: Source, chunk: sources.Chunk, tok: tokenizer.Tokenizer, validation_percent: float
) -> dict[str, Stream]:
    """Each split's documents of `chunk`, encoded and framed, in the chunk's order."""
    dtype = dtype_for(tok.vocab_size)
    parts: dict[str, list[Stream]] = {s: [] for s in SPLITS}
    for split, texts in _batches(sources.chunk_documents(c, chunk, validation_percent)):
        stream = frame(*tok.encode_batch(texts), tok.bos_id, tok.eos_id, dtype)
        stream.chars = sum(map(len, texts))
        stream.bytes = sum(len(t.encode()) for t in texts)
        parts[split].append(stream)
    return {s: Stream.joined(parts[s], dtype) for s in SPLITS}


def _batches(docs: Iterator[sources.Document]) -> Iterator[tuple[str, list[str]]]:
    """Documents grouped by split into batches of about ENCODE_BATCH_CHARS, order kept."""
    batch: dict[str, list[str]] = {s: [] for s in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    for split, text in docs:
        batch[split].append(text)
        size[split] += len(text)
        if size[split] >= ENCODE_BATCH_CHARS:
            yield split, batch[split]
            batch[split], size[split] = [], 0
    for split in SPLITS:
        if batch[split]:
            yield split, batch[split]
