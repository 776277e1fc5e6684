"""A token stream on disk: fixed blocks of tokens, one ArrayRecord record per block.

Fixed blocks make any token range one or two reads away, so the loader cuts windows with numpy
instead of packing documents token by token in Python. Records use `group_size:1`, so each
block is read alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from lmjax.data.cache_meta import trained_name

if TYPE_CHECKING:  # encode.py imports the sources, which this module need not load
    from lmjax.data.encode import Stream

BLOCK_TOKENS = 8192
SHARD_BLOCKS = 8192  # 64M tokens per shard file
WRITER_OPTIONS = "group_size:1"  # a record per chunk: each block is read alone


class Unreadable(Exception):
    """A shard file that is missing or does not parse, or a split's shards that hold another
    number of blocks than its token count needs."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


@dataclasses.dataclass(frozen=True)
class _ShardRecords:
    """All the records of one shard, counted from the split's token count: an array_record
    FileInstruction, with which ArrayRecordDataSource need not open the file to count them."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


class Blocks:
    """A split's tokens in records of `block_tokens` each (the last one short), `shard_blocks`
    records a shard but the last (None: SHARD_BLOCKS); reads like an array through `take`.

    Opening touches no file: how many blocks each shard holds follows from the token count, and
    ArrayRecordDataSource opens a shard (its postscript and index) when a block of it is first
    read. A read that fails names its shard (Unreadable: missing, not parsing, or holding another
    number of blocks); `check` opens every shard at once. Riegeli checksums the postscript, the
    index and every chunk, so damage shows when the records there are read."""

    def __init__(
        self,
        paths: list[Path],
        n_tokens: int,
        dtype: np.dtype,
        block_tokens: int = BLOCK_TOKENS,
        shard_blocks: int | None = None,
    ):
        self._n, self.dtype, self.block_tokens = n_tokens, dtype, block_tokens
        self._shard_blocks = shard_blocks or SHARD_BLOCKS
        n_blocks = -(-n_tokens // block_tokens)
        n_shards = -(-n_blocks // self._shard_blocks)
        if len(paths) != n_shards:
            raise Unreadable(
                paths[-1],
                f"the {len(paths)} shards of {self._shard_blocks} blocks are not the {n_shards} "
                f"that hold the {n_blocks} blocks of {n_tokens} tokens",
            )
        last = n_blocks - self._shard_blocks * (n_shards - 1)
        self._shards = list(zip(paths, [self._shard_blocks] * (n_shards - 1) + [last], strict=True))
        self._source = ArrayRecordDataSource([_ShardRecords(str(p), 0, n, n) for p, n in self._shards])

    def __len__(self) -> int:
        return self._n

    def check(self) -> None:
        """Open every shard now: Unreadable for the first that is missing, does not parse, or
        holds another number of blocks than the token count gives it."""
        if unreadable := _first_unreadable(self._shards):
            raise unreadable

    def take(self, idx: np.ndarray) -> np.ndarray:
        """tokens[idx] for an index array of any shape, reading each needed block once (the
        data source reads each shard's blocks in one call, shards in parallel)."""
        block_ids, where = np.unique(idx // self.block_tokens, return_inverse=True)
        try:
            records = self._source.__getitems__(block_ids.tolist())
        except RuntimeError as e:  # array_record does not say which shard: find it
            read = [self._shards[s] for s in np.unique(block_ids // self._shard_blocks)]
            raise _first_unreadable(read) or Unreadable(read[0][0], _one_line(e)) from None
        blocks = np.zeros((len(block_ids), self.block_tokens), self.dtype)
        for k, record in enumerate(records):
            block = np.frombuffer(record, self.dtype)
            blocks[k, : len(block)] = block
        return blocks[where.reshape(idx.shape), idx % self.block_tokens]


def _first_unreadable(shards: list[tuple[Path, int]]) -> Unreadable | None:
    """The first of `shards` (path, blocks it should hold) that is missing, does not parse or
    holds another number of blocks, opened one by one."""
    for path, n_blocks in shards:
        try:
            reader = ArrayRecordReader(str(path))
            held = reader.num_records()
            reader.close()  # raises what opening found: a missing file, or one that does not parse
        except RuntimeError as e:
            return Unreadable(path, _one_line(e))
        if held != n_blocks:
            return Unreadable(path, f"holds {held} blocks, expected {n_blocks}")
    return None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class StreamWriter:
    """Appends framed documents to a token stream written in fixed blocks; `close` saves where
    each document starts (and, for conversations, the trained token ranges: `chat`) and
    returns the split's summary."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, chat: bool = False):
        self._new_writer = lambda path: ArrayRecordWriter(str(path), WRITER_OPTIONS)
        self.folder, self.split, self.dtype = folder, split, dtype
        self.pending: list[np.ndarray] = []
        self.tokens = self.blocks = self.bytes = 0
        self.starts: list[np.ndarray] = []
        self.trained: list[np.ndarray] | None = [] if chat else None
        self.shards: list[str] = []
        self._writer = None

    def add(self, stream: Stream) -> None:
        """Documents framed as <s> ids </s> (encode.py), after those added before."""
        self.pending.append(stream.tokens)
        self.starts.append(self.tokens + stream.starts)
        if self.trained is not None:
            self.trained.append(self.tokens + stream.trained)
        self.tokens += len(stream.tokens)
        self.bytes += stream.bytes
        if sum(map(len, self.pending)) >= BLOCK_TOKENS:
            self._write(final=False)

    def close(self) -> dict:
        self._write(final=True)
        if self._writer is not None:
            self._writer.close()
        starts = np.concatenate(self.starts) if self.starts else np.zeros(0, np.int64)
        np.save(self.folder / f"{self.split}-starts.npy", starts)
        summary = {
            "tokens": self.tokens,
            "documents": len(starts),
            "bytes": self.bytes,
            "shards": self.shards,
        }
        if self.trained is not None:
            ranges = np.concatenate([np.zeros(0, np.int64), *self.trained]).astype(np.int64)
            np.save(self.folder / trained_name(self.split), ranges)
            summary["trained_tokens"] = int((ranges[1::2] - ranges[::2]).sum())
        return summary

    def _write(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        whole = len(stream) if final else len(stream) // BLOCK_TOKENS * BLOCK_TOKENS
        for start in range(0, whole, BLOCK_TOKENS):
            if self.blocks % SHARD_BLOCKS == 0:
                if self._writer is not None:
                    self._writer.close()
                self.shards.append(shard_name(self.split, len(self.shards)))
                self._writer = self._new_writer(self.folder / self.shards[-1])
            self._writer.write(stream[start : start + BLOCK_TOKENS].tobytes())
            self.blocks += 1
        self.pending = [stream[whole:]]


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.array_record"


def write_shard(path: Path, tokens: np.ndarray, block_tokens: int = BLOCK_TOKENS) -> None:
    """A whole shard at once: `tokens` in records of `block_tokens` (the last one short), the
    bytes StreamWriter writes for the same tokens."""
    writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
    for start in range(0, len(tokens), block_tokens):
        writer.write(tokens[start : start + block_tokens].tobytes())
    writer.close()
