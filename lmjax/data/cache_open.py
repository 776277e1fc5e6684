"""What a cache entry is read as: `Split` and `Corpus`, and `open_corpus`, which opens a local
folder of an entry's files as a Corpus; a file that does not parse, or is not what meta.json
says, is Damage (cache_meta.py).

Opening an entry with file records reads the tokenizer and maps each split's starts, no more:
shards are opened when first read, and the identity and the most documents a window holds come
from meta.json when it records them (cache_meta.summarize)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lmjax import storage
from lmjax.config import Data, UserError
from lmjax.data import shards, tokenizer
from lmjax.data.cache_meta import SPLITS, Damage, corpus_identity, describe, trained_name

CachePath = Path | storage.Path  # a local folder, or a folder on a bucket


class Split:
    """One split of one corpus: documents back to back, and the offset where each starts;
    `most_documents`: the most documents a window holds, by window length (as text), where
    meta.json records it; `trained`: for conversations, the token ranges the loss is taken on
    (int64 `[start, end, ...]`, see encode.Stream), None where every target counts."""

    def __init__(
        self,
        tokens: np.ndarray | shards.Blocks,
        starts: np.ndarray,
        most_documents: dict[str, int] | None = None,
        trained: np.ndarray | None = None,
    ):
        self.tokens, self.starts, self.most_documents = tokens, starts, most_documents or {}
        self.trained = trained

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, idx: np.ndarray) -> np.ndarray:
        t = self.tokens
        return np.asarray(t.take(idx) if isinstance(t, shards.Blocks) else t[idx], np.int32)


class Corpus:
    """The tokenizer and, for each corpus of the experiment, its splits; `weights` for mixing;
    the cache entry it was read from and that entry's meta.json."""

    def __init__(
        self,
        tok: tokenizer.Tokenizer,
        parts: list[dict[str, Split]],
        weights: list[float],
        entry: CachePath,
        meta: dict,
    ):
        self.tokenizer, self.parts, self.weights, self.entry, self.meta = tok, parts, weights, entry, meta

    def splits(self, name: str) -> list[Split]:
        """Split `name` of each corpus, in the order of `weights`."""
        return [part[name] for part in self.parts]

    @functools.cached_property
    def identity(self) -> str:
        """What training on this corpus depends on: the tokenizer, and per corpus and split the
        token count and every document's start. Unlike the cache key, it does not change when
        the files move to another folder or machine. Recorded in meta.json when the entry was
        built; worked out from the starts (once: a large corpus has many) for older entries."""
        if "identity" in self.meta:
            return self.meta["identity"]
        splits = [{s: (len(part[s]), part[s].starts, part[s].trained) for s in SPLITS} for part in self.parts]
        return corpus_identity(self.tokenizer.model_proto, splits)


def open_corpus(cfg: Data, folder: Path, meta: dict, entry: CachePath) -> Corpus:
    """The corpus of the entry `entry` whose files are in the local folder `folder`, already
    checked against meta.json's records (cache_meta.file_problem); a file that does not parse, or
    holds another number of tokens or documents than meta.json says, is Damage. Shards are opened
    when first read, as their records vouch for their ends (header, index); where meta.json has no
    checksums (entries written before them), every shard is opened now to check it parses."""
    shape = _ShardShape(np.dtype(meta["dtype"]), meta["block_tokens"], meta.get("shard_blocks"))
    check_now = "files" not in meta
    parts = [
        {s: _open_split(folder, f"c{i}", s, part[s], shape, check_now) for s in SPLITS}
        for i, part in enumerate(meta["parts"])
    ]
    try:
        tok = tokenizer.Tokenizer((folder / "tokenizer.model").read_bytes())
    except RuntimeError:  # what sentencepiece raises for bytes that are no model
        raise Damage("tokenizer.model", "not a sentencepiece model") from None
    except (OSError, UserError) as e:
        raise Damage("tokenizer.model", describe(e)) from None
    return Corpus(tok, parts, [c.weight for c in cfg.components()], entry, meta)


class _ShardShape(NamedTuple):
    """How an entry's shards hold tokens: their dtype, tokens a block, blocks a shard (None:
    shards.SHARD_BLOCKS, for entries that do not record it)."""

    dtype: np.dtype
    block_tokens: int
    shard_blocks: int | None


def _open_split(
    folder: Path, part: str, split: str, summary: dict, shape: _ShardShape, check_now: bool
) -> Split:
    paths = [folder / part / f for f in summary["shards"]]
    try:
        tokens = shards.Blocks(paths, summary["tokens"], shape.dtype, shape.block_tokens, shape.shard_blocks)
        if check_now:
            tokens.check()
    except shards.Unreadable as e:
        raise Damage(f"{part}/{e.path.name}", e.problem) from None
    name = f"{part}/{split}-starts.npy"
    try:
        starts = np.load(folder / name, mmap_mode="r")
    except (OSError, ValueError) as e:  # missing, truncated or not an .npy file
        raise Damage(name, describe(e)) from None
    expected = summary.get("documents", len(starts))
    if (
        starts.dtype != np.int64
        or starts.shape != (expected,)
        or (expected and starts[-1] >= summary["tokens"])
    ):
        raise Damage(
            name, f"{starts.dtype}{list(starts.shape)}, expected int64[{expected}] below {summary['tokens']}"
        )
    return Split(tokens, starts, summary.get("most_documents"), _trained(folder, part, split, summary))


def _trained(folder: Path, part: str, split: str, summary: dict) -> np.ndarray | None:
    """A conversation split's trained token ranges (None for text), checked against meta.json."""
    if "trained_tokens" not in summary:
        return None
    name = f"{part}/{trained_name(split)}"
    try:
        ranges = np.load(folder / name, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise Damage(name, describe(e)) from None
    if ranges.dtype != np.int64 or ranges.ndim != 1 or len(ranges) % 2:
        raise Damage(name, f"{ranges.dtype}{list(ranges.shape)}, expected int64 start/end pairs")
    if int((ranges[1::2] - ranges[::2]).sum()) != summary["trained_tokens"]:
        raise Damage(name, f"does not hold the {summary['trained_tokens']} trained tokens meta.json records")
    return ranges
