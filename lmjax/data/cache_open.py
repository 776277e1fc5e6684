"""What a cache entry is read as: `Split` and `Corpus`, and `open_corpus`, which opens a local
folder of an entry's files as a Corpus; a file that does not parse, or is not what meta.json
says, is Damage (cache_meta.py)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from lmjax import storage
from lmjax.config import Data, UserError
from lmjax.data import shards, tokenizer
from lmjax.data.cache_meta import SPLITS, Damage, describe

CachePath = Path | storage.Path  # a local folder, or a folder on a bucket


class Split:
    """One split of one corpus: documents back to back, and the offset where each starts."""

    def __init__(self, tokens: np.ndarray | shards.Blocks, starts: np.ndarray):
        self.tokens, self.starts = tokens, starts

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
        the files move to another folder or machine. Worked out once (the starts of a large
        corpus are many), then read at every checkpoint."""
        h = hashlib.sha256(self.tokenizer.model_proto)
        for part in self.parts:
            for name in SPLITS:
                h.update(f"{name}:{len(part[name])}:".encode())
                h.update(np.ascontiguousarray(part[name].starts, np.int64).tobytes())
        return h.hexdigest()[:20]


def open_corpus(cfg: Data, folder: Path, meta: dict, entry: CachePath) -> Corpus:
    """The corpus of the entry `entry` whose files are in the local folder `folder`; a file that
    does not parse, or holds another number of tokens or documents than meta.json says, is Damage."""
    dtype, block_tokens = np.dtype(meta["dtype"]), meta["block_tokens"]
    parts = [
        {s: _open_split(folder, f"c{i}", s, part[s], dtype, block_tokens) for s in SPLITS}
        for i, part in enumerate(meta["parts"])
    ]
    try:
        tok = tokenizer.Tokenizer((folder / "tokenizer.model").read_bytes())
    except RuntimeError:  # what sentencepiece raises for bytes that are no model
        raise Damage("tokenizer.model", "not a sentencepiece model") from None
    except (OSError, UserError) as e:
        raise Damage("tokenizer.model", describe(e)) from None
    return Corpus(tok, parts, [c.weight for c in cfg.components()], entry, meta)


def _open_split(
    folder: Path, part: str, split: str, summary: dict, dtype: np.dtype, block_tokens: int
) -> Split:
    try:
        tokens = shards.Blocks(
            [folder / part / f for f in summary["shards"]], summary["tokens"], dtype, block_tokens
        )
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
    return Split(tokens, starts)
