"""Tokenize each corpus once into ArrayRecord shards, keyed by corpus, tokenizer and settings.

A cache entry `CACHE/<key>/` holds `tokenizer.model`, `meta.json` and, per corpus of the
experiment (one, or each part of a mixture) and split, the documents back to back as
<s> ids </s> in fixed token blocks (`c<i>/<split>-<shard>.array_record`, see shards.py) and
where each document starts (`c<i>/<split>-starts.npy`). The entry is built in a temporary
folder, locked while its build runs, and renamed into place when complete, so an interrupted
build is never read; the next build removes any temporary folder whose lock is free.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmjax.config import Data, UserError
from lmjax.data import shards, sources, tokenizer

_FORMAT = 2
SPLITS = ("train", "validation")
_ENCODE_BATCH_CHARS = 2 << 20


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
        entry: Path,
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


def cache_root(cfg: Data) -> Path:
    return Path(cfg.cache_dir or os.environ.get("LMJAX_CACHE") or Path.home() / ".cache" / "lmjax")


def cache_key(cfg: Data) -> str:
    settings = (
        _FORMAT,
        sorted(tokenizer.TRAINER_SETTINGS.items()),
        [(sources.fingerprint(c), c.weight) for c in cfg.components()],  # weights shape the sample
        cfg.validation_percent,
        cfg.vocab_size,
        cfg.tokenizer,
        cfg.tokenizer_sample_bytes,
        _file_hash(cfg.tokenizer_path) if cfg.tokenizer_path else "",
    )
    return hashlib.sha256(repr(settings).encode()).hexdigest()[:20]


def entry_path(cfg: Data) -> Path:
    return cache_root(cfg) / cache_key(cfg)


def load_or_build(cfg: Data, log: Callable[[str], None] = print, progress: bool | None = None) -> Corpus:
    entry = entry_path(cfg)
    if not (entry / "meta.json").exists():
        log(f"tokenizing {cfg.source} corpus into {entry}")
        _build(cfg, entry, log, sys.stderr.isatty() if progress is None else progress)
    meta = json.loads((entry / "meta.json").read_text())
    dtype, block_tokens = np.dtype(meta["dtype"]), meta["block_tokens"]
    parts = []
    for i, part in enumerate(meta["parts"]):
        folder = entry / f"c{i}"
        parts.append(
            {
                s: Split(
                    shards.Blocks(
                        [folder / f for f in part[s]["shards"]], part[s]["tokens"], dtype, block_tokens
                    ),
                    np.load(folder / f"{s}-starts.npy", mmap_mode="r"),
                )
                for s in SPLITS
            }
        )
    tok = tokenizer.Tokenizer((entry / "tokenizer.model").read_bytes())
    return Corpus(tok, parts, [c.weight for c in cfg.components()], entry, meta)


def _build(cfg: Data, entry: Path, log: Callable[[str], None], progress: bool) -> None:
    start = time.time()
    tok = (
        tokenizer.Tokenizer.load(cfg.tokenizer_path)
        if cfg.tokenizer_path
        else tokenizer.train(tokenizer.sample(cfg), cfg)
    )
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{time.time_ns()}.tmp")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(
            f"cannot write the token cache in {tmp.parent} ({e.strerror}); set data.cache_dir"
        ) from None
    with (tmp / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while this build runs: see _remove_abandoned_builds
        _remove_abandoned_builds(entry)
        try:
            meta = _write_parts(cfg, tok, tmp, progress)
            meta["build"]["seconds"] = round(time.time() - start, 2)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            tmp.rename(entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(sys.exc_info()[1], OSError) and (entry / "meta.json").exists():
                log(f"another process built {entry} first; using it")  # theirs is as good
                return
            raise
    log(f"tokenized {meta['build']['chars'] / 1e6:.1f}M characters in {meta['build']['seconds']:.1f}s")


def _remove_abandoned_builds(entry: Path) -> None:
    """Delete temporary folders of builds of this entry that no running process holds locked
    (a killed build's lock is released by the kernel)."""
    for tmp in entry.parent.glob(f".{entry.name}.*.tmp"):
        try:
            with (tmp / ".lock").open() as lock:  # none yet: a build that is just starting
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # locked: a build in progress (or already gone)
            continue


def _write_parts(cfg: Data, tok: tokenizer.Tokenizer, folder: Path, progress: bool) -> dict:
    """Tokenize every corpus of `cfg` into `folder`; returns the entry's meta.json content."""
    (folder / "tokenizer.model").write_bytes(tok.model_proto)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    parts, chars = [], 0
    with tqdm(desc="tokenizing", unit="char", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        for i, c in enumerate(cfg.components()):
            (folder / f"c{i}").mkdir()
            writers = {
                s: shards.StreamWriter(folder / f"c{i}", s, dtype, tok.bos_id, tok.eos_id) for s in SPLITS
            }
            for split, texts, (ids, lengths) in _encoded(
                tok, _batches(sources.documents(c, cfg.validation_percent))
            ):
                writers[split].add(ids, lengths, sum(len(t.encode()) for t in texts))
                chars += sum(map(len, texts))
                bar.update(sum(map(len, texts)))
            parts.append({s: w.close() for s, w in writers.items()})
            for s in SPLITS:
                if parts[-1][s]["tokens"] == 0:
                    raise UserError(
                        f"{sources.describe(c)} has no {s} text; give more documents"
                        + (" or raise data.validation_percent" if s == "validation" else "")
                    )
    return {
        "format": _FORMAT,
        "dtype": dtype.name,
        "block_tokens": shards.BLOCK_TOKENS,
        "parts": parts,
        "build": {"chars": chars},
    }


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


def _file_hash(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data.tokenizer_path={path} does not exist; give a sentencepiece .model")
    return hashlib.sha256(p.read_bytes()).hexdigest()
