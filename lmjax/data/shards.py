"""A token stream on disk: fixed blocks of tokens, one ArrayRecord record per block.

Fixed blocks make any token range one or two reads away, so the loader cuts windows with numpy
instead of packing documents token by token in Python. Records use `group_size:1`, so each
block is read alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from array_record.python.array_record_module import ArrayRecordWriter

if TYPE_CHECKING:  # encode.py imports the sources, which this module need not load
    from lmjax.data.encode import Stream

BLOCK_TOKENS = 8192
SHARD_BLOCKS = 8192  # 64M tokens per shard file


class Unreadable(Exception):
    """A shard file that is missing or does not parse, or a split's shards that hold another
    number of blocks than its token count needs."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


class Blocks:
    """A split's tokens in records of `block_tokens` each (the last one short); reads like an
    array through `take`. Opening reads each shard's postscript and index, which Riegeli
    checksums: a shard damaged there, or missing, is Unreadable at once. Damage elsewhere shows
    when the records there are read, as Riegeli checksums each chunk too."""

    def __init__(self, paths: list[Path], n_tokens: int, dtype: np.dtype, block_tokens: int = BLOCK_TOKENS):
        try:
            self._source = ArrayRecordDataSource([str(p) for p in paths])
        except RuntimeError as e:  # one of the files: name it
            raise _first_unreadable(paths, e) from None
        self._n, self.dtype, self.block_tokens = n_tokens, dtype, block_tokens
        if len(self._source) != -(-n_tokens // block_tokens):
            raise Unreadable(
                paths[-1],
                f"the {len(paths)} shards hold {len(self._source)} blocks, "
                f"expected {-(-n_tokens // block_tokens)} for {n_tokens} tokens",
            )

    def __len__(self) -> int:
        return self._n

    def take(self, idx: np.ndarray) -> np.ndarray:
        """tokens[idx] for an index array of any shape, reading each needed block once."""
        block_ids, where = np.unique(idx // self.block_tokens, return_inverse=True)
        blocks = np.zeros((len(block_ids), self.block_tokens), self.dtype)
        for k, record in enumerate(self._source.__getitems__(block_ids.tolist())):
            block = np.frombuffer(record, self.dtype)
            blocks[k, : len(block)] = block
        return blocks[where.reshape(idx.shape), idx % self.block_tokens]


def _first_unreadable(paths: list[Path], error: RuntimeError) -> Unreadable:
    """The first of `paths` that does not open (the first path, with `error`, if all do now)."""
    for path in paths:
        try:
            ArrayRecordDataSource([str(path)])
        except RuntimeError as e:
            return Unreadable(path, _one_line(e))
    return Unreadable(paths[0], _one_line(error))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


class StreamWriter:
    """Appends framed documents to a token stream written in fixed blocks; `close` saves where
    each document starts and returns the split's summary."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self._new_writer = lambda path: ArrayRecordWriter(str(path), "group_size:1")
        self.folder, self.split, self.dtype = folder, split, dtype
        self.pending: list[np.ndarray] = []
        self.tokens = self.blocks = self.bytes = 0
        self.starts: list[np.ndarray] = []
        self.shards: list[str] = []
        self._writer = None

    def add(self, stream: Stream) -> None:
        """Documents framed as <s> ids </s> (encode.py), after those added before."""
        self.pending.append(stream.tokens)
        self.starts.append(self.tokens + stream.starts)
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
        return {"tokens": self.tokens, "documents": len(starts), "bytes": self.bytes, "shards": self.shards}

    def _write(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        whole = len(stream) if final else len(stream) // BLOCK_TOKENS * BLOCK_TOKENS
        for start in range(0, whole, BLOCK_TOKENS):
            if self.blocks % SHARD_BLOCKS == 0:
                if self._writer is not None:
                    self._writer.close()
                self.shards.append(f"{self.split}-{len(self.shards):05d}.array_record")
                self._writer = self._new_writer(self.folder / self.shards[-1])
            self._writer.write(stream[start : start + BLOCK_TOKENS].tobytes())
            self.blocks += 1
        self.pending = [stream[whole:]]
