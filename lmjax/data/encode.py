"""One chunk of a corpus (an input file, see sources.py) encoded into framed token streams.

The unit that every build shares: the in-process build encodes chunks one after another and
appends them to its shards in order; the Beam pipeline (prepare_beam.py) encodes them on its
workers and cuts the same shards from them. A chunk's documents become, per split, one stream
of <s> ids </s> back to back and where each document starts in it, so both give the same
tokens in the same order. A conversation (chat sources) is rendered by the chat template, and
its stream also says which tokens the loss is taken on (`trained`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from lmjax.config import Source
from lmjax.data import chat_jinja, chat_template, sources, tokenizer
from lmjax.data.cache_meta import SPLITS

ENCODE_BATCH_CHARS = 2 << 20  # texts per sentencepiece call: enough to keep every thread busy


@dataclasses.dataclass
class Stream:
    """Documents of one split framed as <s> ids </s> back to back: `tokens`, where each
    document starts in it (`starts`, int64), and the characters and UTF-8 bytes of their text.
    `trained`: for conversations, the token ranges the loss is taken on, as int64
    `[start, end, start, end, ...]` (a target at offset i counts when i lies in one); None for
    text, where every target counts."""

    tokens: np.ndarray
    starts: np.ndarray
    chars: int = 0
    bytes: int = 0
    trained: np.ndarray | None = None

    @classmethod
    def empty(cls, dtype: np.dtype, chat: bool = False) -> Stream:
        return cls(np.zeros(0, dtype), np.zeros(0, np.int64), trained=np.zeros(0, np.int64) if chat else None)

    @classmethod
    def joined(cls, streams: list[Stream], dtype: np.dtype) -> Stream:
        """`streams` one after another, their starts (and trained ranges) shifted to the joined tokens."""
        if not streams:
            return cls.empty(dtype)
        offsets = np.cumsum([0] + [len(s.tokens) for s in streams[:-1]])
        pairs = list(zip(streams, offsets, strict=True))
        return cls(
            np.concatenate([s.tokens for s in streams]).astype(dtype, copy=False),
            np.concatenate([s.starts + o for s, o in pairs]).astype(np.int64),
            sum(s.chars for s in streams),
            sum(s.bytes for s in streams),
            None if streams[0].trained is None else np.concatenate([s.trained + o for s, o in pairs]),
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
    return encode_chunks(c, [chunk], tok, validation_percent)[0]


def encode_chunks(
    c: Source,
    chunks: list[sources.Chunk],
    tok: tokenizer.Tokenizer,
    validation_percent: float,
    jinja_template: str = "",
) -> list[dict[str, Stream]]:
    """`encode_chunk` of each of `chunks`, their documents encoded together: many small files
    make a few large sentencepiece batches instead of many small ones. Conversations render
    with `jinja_template` (data.chat_template's source), or lmjax's template where it is ""."""
    dtype = dtype_for(tok.vocab_size)
    if sources.is_chat(c):
        template = chat_jinja.for_source(tok, jinja_template)
        return [_conversations(c, chunk, template, validation_percent, dtype) for chunk in chunks]
    encoded = {s: _Encoded() for s in SPLITS}
    documents = (
        (k, split, text)
        for k, chunk in enumerate(chunks)
        for split, text in sources.chunk_documents(c, chunk, validation_percent)
    )
    for split, owners, texts in _batches(documents):
        encoded[split].add(owners, texts, *tok.encode_batch(texts))
    for split in SPLITS:
        encoded[split].join()
    return [{s: encoded[s].stream(k, tok, dtype) for s in SPLITS} for k in range(len(chunks))]


def _conversations(
    c: Source,
    chunk: sources.Chunk,
    template: chat_template.ChatTemplate,
    validation_percent: float,
    dtype: np.dtype,
) -> dict[str, Stream]:
    """Each split's conversations of `chunk` rendered and framed as <s> ids </s>, with the
    ranges of their trained tokens."""
    tok = template.tokenizer
    out = {s: [] for s in SPLITS}
    for split, messages in sources.chunk_documents(c, chunk, validation_percent):
        rendered = template.render(messages)
        trained = np.concatenate([[False], rendered.trained, [False]])  # <s> and </s> are not
        edges = np.flatnonzero(np.diff(np.concatenate([[False], trained, [False]])))
        text = chat_template.text(messages)
        ids = np.array([tok.bos_id, *rendered.ids, tok.eos_id], dtype)
        out[split].append(Stream(ids, np.zeros(1, np.int64), len(text), len(text.encode()), edges))
    return {s: Stream.joined(out[s], dtype) if out[s] else Stream.empty(dtype, chat=True) for s in SPLITS}


class _Encoded:
    """One split's encoded documents of several chunks, in order: which chunk each is from
    (`owners`, ascending), their ids back to back and each one's number of ids, and the
    characters and UTF-8 bytes of each chunk's documents (summed per batch)."""

    def __init__(self):
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.sums: list[tuple[int, np.ndarray, np.ndarray]] = []  # (first owner, chars, bytes)

    def add(self, owners: list[int], texts: list[str], ids: np.ndarray, lengths: np.ndarray) -> None:
        owned = np.asarray(owners, np.int32)
        chars = np.fromiter(map(len, texts), np.int64, len(texts))
        utf8 = np.fromiter((len(t.encode()) for t in texts), np.int64, len(texts))
        by_owner = owned - owned[0]
        self.sums.append((owners[0], np.bincount(by_owner, chars), np.bincount(by_owner, utf8)))
        self.parts.append((owned, ids, lengths))

    def join(self) -> None:
        empty = (np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64))
        joined = (np.concatenate(p) for p in zip(*self.parts or [empty], strict=True))
        self.owners, self.ids, self.lengths = joined
        self.ids_before = np.concatenate([[0], np.cumsum(self.lengths)])

    def stream(self, owner: int, tok: tokenizer.Tokenizer, dtype: np.dtype) -> Stream:
        """The documents of chunk `owner`, framed."""
        first, end = np.searchsorted(self.owners, [owner, owner + 1])
        if first == end:
            return Stream.empty(dtype)
        ids = self.ids[self.ids_before[first] : self.ids_before[end]]
        stream = frame(ids, self.lengths[first:end], tok.bos_id, tok.eos_id, dtype)
        for start, chars, utf8 in self.sums:
            if start <= owner < start + len(chars):
                stream.chars += round(chars[owner - start])
                stream.bytes += round(utf8[owner - start])
        return stream


def _batches(documents: Iterator[tuple[int, str, str]]) -> Iterator[tuple[str, list[int], list[str]]]:
    """(owner, split, text) documents grouped by split into batches of about
    ENCODE_BATCH_CHARS, order kept: (split, owners, texts)."""
    owners: dict[str, list[int]] = {s: [] for s in SPLITS}
    batch: dict[str, list[str]] = {s: [] for s in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    for owner, split, text in documents:
        owners[split].append(owner)
        batch[split].append(text)
        size[split] += len(text)
        if size[split] >= ENCODE_BATCH_CHARS:
            yield split, owners[split], batch[split]
            owners[split], batch[split], size[split] = [], [], 0
    for split in SPLITS:
        if batch[split]:
            yield split, owners[split], batch[split]
