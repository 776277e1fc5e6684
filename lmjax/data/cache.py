"""Tokenize each corpus once into ArrayRecord shards, keyed by corpus, tokenizer and settings.

A cache entry `CACHE/<key>/` holds `tokenizer.model`, `meta.json` and, per corpus `c` of the
experiment (one, or each part of a mixture) and split, the documents back to back (each as
<s> tokens </s>) cut into fixed blocks of `BLOCK_TOKENS` tokens, one ArrayRecord record per
block (`c<i>/<split>-<shard>.array_record`), plus where each document starts
(`c<i>/<split>-starts.npy`). Fixed blocks make any token range two reads away, so windows are
cut with numpy, not packed token by token in Python. The entry is built under a temporary
name and renamed into place when complete, so an interrupted build is never read.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lmjax.config import Data, Source, UserError
from lmjax.data import sources, tokenizer

_FORMAT = 2
SPLITS = ("train", "validation")
BLOCK_TOKENS = 8192
SHARD_BLOCKS = 8192  # 64M tokens per shard file
_ENCODE_BATCH_CHARS = 2 << 20


class Blocks:
    """A split's tokens in ArrayRecord records of BLOCK_TOKENS each; indexable like an array."""

    def __init__(self, paths: list[Path], n_tokens: int, dtype: np.dtype):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self._source = ArrayRecordDataSource([str(p) for p in paths])
        self._n, self.dtype = n_tokens, dtype

    def __len__(self) -> int:
        return self._n

    def take(self, idx: np.ndarray) -> np.ndarray:
        """tokens[idx] for an index array of any shape, reading each needed block once."""
        block_ids, where = np.unique(idx // BLOCK_TOKENS, return_inverse=True)
        blocks_KB = np.zeros((len(block_ids), BLOCK_TOKENS), self.dtype)  # the last block is short
        for k, record in enumerate(self._source.__getitems__(block_ids.tolist())):
            block = np.frombuffer(record, self.dtype)
            blocks_KB[k, : len(block)] = block
        return blocks_KB[where.reshape(idx.shape), idx % BLOCK_TOKENS]


class Split:
    """One split of one corpus: documents back to back, and the offset where each starts."""

    def __init__(self, tokens: np.ndarray | Blocks, starts: np.ndarray):
        self.tokens, self.starts = tokens, starts

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, idx: np.ndarray) -> np.ndarray:
        t = self.tokens
        return np.asarray(t.take(idx) if isinstance(t, Blocks) else t[idx], np.int32)


class Corpus:
    """The tokenizer and, for each corpus of the experiment, its splits; `weights` for mixing."""

    def __init__(self, tok: tokenizer.Tokenizer, parts: list[dict[str, Split]], weights: list[float]):
        self.tokenizer, self.parts, self.weights = tok, parts, weights

    def split(self, name: str) -> list[Split]:
        return [part[name] for part in self.parts]


def cache_root(cfg: Data) -> Path:
    return Path(cfg.cache_dir or os.environ.get("LMJAX_CACHE") or Path.home() / ".cache" / "lmjax")


def key(cfg: Data) -> str:
    settings = (
        _FORMAT,
        sorted(tokenizer.TRAINER_SETTINGS.items()),
        [(sources.fingerprint(c), c.weight) for c in cfg.components()],
        cfg.validation_percent,
        cfg.vocab_size,
        cfg.tokenizer,
        cfg.tokenizer_sample_bytes,
        _file_hash(cfg.tokenizer_path) if cfg.tokenizer_path else "",
    )
    return hashlib.sha256(repr(settings).encode()).hexdigest()[:20]


def entry_path(cfg: Data) -> Path:
    return cache_root(cfg) / key(cfg)


def load_or_build(cfg: Data, log: Callable[[str], None] = print, progress: bool | None = None) -> Corpus:
    entry = entry_path(cfg)
    if not (entry / "meta.json").exists():
        log(f"tokenizing {cfg.source} corpus into {entry}")
        _build(cfg, entry, log, sys.stderr.isatty() if progress is None else progress)
    meta = json.loads((entry / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    parts = []
    for i, part in enumerate(meta["parts"]):
        folder = entry / f"c{i}"
        parts.append(
            {
                s: Split(
                    Blocks([folder / f for f in part[s]["shards"]], part[s]["tokens"], dtype),
                    np.load(folder / f"{s}-starts.npy"),
                )
                for s in SPLITS
            }
        )
    tok = tokenizer.Tokenizer((entry / "tokenizer.model").read_bytes())
    return Corpus(tok, parts, [c.weight for c in cfg.components()])


def _build(cfg: Data, entry: Path, log: Callable[[str], None], progress: bool) -> None:
    start = time.time()
    if cfg.tokenizer_path:
        tok = tokenizer.Tokenizer.load(cfg.tokenizer_path)
    else:
        tok = tokenizer.train(tokenizer_sample(cfg), cfg)
    _remove_abandoned_builds(entry)
    tmp = entry.with_name(f".{entry.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _write_parts(cfg, tok, tmp, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.time() - start
    meta["build"] = {"chars": meta["build"]["chars"], "seconds": round(seconds, 2)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    try:
        tmp.rename(entry)
    except OSError:  # another process finished the same entry first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"tokenized {meta['build']['chars'] / 1e6:.1f}M characters in {seconds:.1f}s")


def _write_parts(cfg: Data, tok: tokenizer.Tokenizer, folder: Path, progress: bool) -> dict:
    """Tokenize every corpus of `cfg` into `folder`; returns the entry's meta.json content."""
    from tqdm import tqdm

    (folder / "tokenizer.model").write_bytes(tok.model_proto)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    parts, chars = [], 0
    with tqdm(desc="tokenizing", unit="char", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        for i, c in enumerate(cfg.components()):
            (folder / f"c{i}").mkdir()
            writers = {s: _SplitWriter(folder / f"c{i}", s, dtype, tok) for s in SPLITS}
            for split, texts, (ids, lengths) in _encoded(
                tok, _batches(sources.documents(c, cfg.validation_percent))
            ):
                writers[split].add(ids, lengths, texts)
                chars += sum(map(len, texts))
                bar.update(sum(map(len, texts)))
            parts.append({s: w.close() for s, w in writers.items()})
            for s in SPLITS:
                if parts[-1][s]["tokens"] == 0:
                    raise UserError(
                        f"{_describe(c)} has no {s} text; give more documents"
                        + (" or raise data.validation_percent" if s == "validation" else "")
                    )
    return {
        "format": _FORMAT,
        "dtype": dtype.name,
        "block_tokens": BLOCK_TOKENS,
        "parts": parts,
        "build": {"chars": chars},
    }


def _remove_abandoned_builds(entry: Path) -> None:
    """Delete temporary folders of this host's builds of this entry whose process is gone."""
    for tmp in entry.parent.glob(f".{entry.name}.{socket.gethostname()}.*.tmp"):
        pid = int(tmp.name.split(".")[-2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


class _SplitWriter:
    """Appends documents as <s> ids </s> to a token stream written in fixed blocks."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, tok: tokenizer.Tokenizer):
        self.folder, self.split, self.dtype, self.tok = folder, split, dtype, tok
        self.pending: list[np.ndarray] = []
        self.pending_tokens = self.tokens = self.blocks = self.bytes = 0
        self.starts: list[np.ndarray] = []
        self.shards: list[str] = []
        self._writer = None

    def add(self, ids: np.ndarray, lengths: np.ndarray, texts: list[str]) -> None:
        """Documents' `ids` back to back, `lengths` ids each, framed as <s> ids </s>."""
        framed = lengths + 2
        starts = np.concatenate([[0], np.cumsum(framed)[:-1]])
        stream = np.empty(int(framed.sum()), self.dtype)
        is_text = np.ones(len(stream), bool)
        is_text[starts] = is_text[starts + framed - 1] = False
        stream[starts], stream[starts + framed - 1], stream[is_text] = self.tok.bos_id, self.tok.eos_id, ids
        self.pending.append(stream)
        self.starts.append(self.tokens + starts)
        self.tokens += len(stream)
        self.pending_tokens += len(stream)
        self.bytes += sum(len(t.encode()) for t in texts)
        if self.pending_tokens >= BLOCK_TOKENS:
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
            self._record(stream[start : start + BLOCK_TOKENS].tobytes())
        self.pending = [stream[whole:]]
        self.pending_tokens = len(stream) - whole

    def _record(self, data: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.blocks % SHARD_BLOCKS == 0:
            if self._writer is not None:
                self._writer.close()
            name = f"{self.split}-{len(self.shards):05d}.array_record"
            # group_size:1 keeps every record separately readable: random access to any block.
            self._writer = ArrayRecordWriter(str(self.folder / name), "group_size:1")
            self.shards.append(name)
        self._writer.write(data)
        self.blocks += 1


def _batches(docs: Iterator[sources.Document]) -> Iterator[tuple[str, list[str]]]:
    """Documents grouped by split into batches of about _ENCODE_BATCH_CHARS, order kept."""
    batch: dict[str, list[str]] = {s: [] for s in SPLITS}
    size = dict.fromkeys(SPLITS, 0)
    for split, text in docs:
        batch[split].append(text)
        size[split] += len(text)
        if size[split] >= _ENCODE_BATCH_CHARS:
            yield split, batch[split]
            batch[split], size[split] = [], 0
    for split in SPLITS:
        if batch[split]:
            yield split, batch[split]


def _encoded(
    tok: tokenizer.Tokenizer, batches: Iterator[tuple[str, list[str]]]
) -> Iterator[tuple[str, list[str], tuple[np.ndarray, np.ndarray]]]:
    """Encode batch k (sentencepiece threads, GIL released) while batch k+1 is read and batch
    k-1 is written."""
    with ThreadPoolExecutor(1) as pool:
        previous = None
        for split, texts in batches:
            future = pool.submit(tok.encode_batch, texts)
            if previous:
                yield previous[0], previous[1], previous[2].result()
            previous = (split, texts, future)
        if previous:
            yield previous[0], previous[1], previous[2].result()


def tokenizer_sample(cfg: Data, seed: int = 0) -> list[str]:
    """About `tokenizer_sample_bytes` of training documents, each corpus by its weight.

    A seeded reservoir (keep the documents with the smallest random keys that fit the budget)
    over the first 20x the budget of each corpus: uniform over small corpora, bounded reading
    of large ones.
    """
    components = cfg.components()
    total_weight = sum(c.weight for c in components)
    sample: list[str] = []
    for c in components:
        budget = cfg.tokenizer_sample_bytes * c.weight / total_weight
        rng, heap, kept, seen = random.Random(seed), [], 0, 0
        for index, (split, text) in enumerate(sources.documents(c, cfg.validation_percent)):
            if split != "train":
                continue
            heapq.heappush(heap, (-rng.random(), index, text))
            kept += len(text)
            seen += len(text)
            while kept > budget and len(heap) > 1:
                kept -= len(heapq.heappop(heap)[2])
            if seen >= 20 * budget:
                break
        sample += [text for _, _, text in sorted(heap, key=lambda item: item[1])]
    if not any(sample):
        raise UserError(f"the corpus ({_describe(components[0])}) is empty; give files with text")
    return sample


def _describe(c: Source) -> str:
    return {"stdlib": "the stdlib corpus", "tfds": f"tfds {c.name or c.path}"}.get(
        c.source, f"{c.source} {c.path}"
    )


def _file_hash(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data.tokenizer_path={path} does not exist; give a sentencepiece .model")
    return hashlib.sha256(p.read_bytes()).hexdigest()
