"""Tokenize a corpus once: token arrays on disk, keyed by corpus, tokenizer and settings.

A cache entry is a folder `CACHE/<key>/` holding `tokenizer.model` and, per split, the
concatenated documents (`<split>.npy`, each document as <s> tokens </s>) and where each
document starts (`<split>_starts.npy`). It is built under a temporary name and renamed into
place when complete, so an interrupted build is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from lmjax import config
from lmjax.data import sources, tokenizer

_FORMAT = 1
SPLITS = ("train", "validation")


@dataclasses.dataclass
class Split:
    tokens: np.ndarray  # all documents back to back
    starts: np.ndarray  # index of each document's first token (its <s>)


@dataclasses.dataclass
class Corpus:
    tokenizer: tokenizer.Tokenizer
    splits: dict[str, Split]


def cache_root(cfg: config.Data) -> Path:
    return Path(cfg.cache_dir or os.environ.get("LMJAX_CACHE") or Path.home() / ".cache" / "lmjax")


def key(cfg: config.Data) -> str:
    settings = (
        _FORMAT,
        sorted(tokenizer.TRAINER_SETTINGS.items()),
        sources.fingerprint(cfg),
        cfg.vocab_size,
        cfg.tokenizer,
        cfg.tokenizer_sample_bytes,
        _file_hash(cfg.tokenizer_path) if cfg.tokenizer_path else "",
    )
    return hashlib.sha256(repr(settings).encode()).hexdigest()[:20]


def load_or_build(cfg: config.Data, log=print) -> Corpus:
    entry = cache_root(cfg) / key(cfg)
    if not (entry / "train.npy").exists():
        log(f"tokenizing {cfg.source} corpus into {entry}")
        _build(cfg, entry)
    tok = tokenizer.Tokenizer((entry / "tokenizer.model").read_bytes())
    splits = {
        s: Split(np.load(entry / f"{s}.npy", mmap_mode="r"), np.load(entry / f"{s}_starts.npy"))
        for s in SPLITS
    }
    return Corpus(tok, splits)


def _build(cfg: config.Data, entry: Path) -> None:
    docs = sources.documents(cfg)
    if cfg.tokenizer_path:
        tok = tokenizer.Tokenizer.load(cfg.tokenizer_path)
    else:
        tok = tokenizer.train(docs["train"], cfg)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.model").write_bytes(tok.model_proto)
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    for split in SPLITS:
        ids = tok.encode_batch(docs[split])
        lengths = np.array([len(x) + 2 for x in ids], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat = np.concatenate([np.array([tok.bos_id, *x, tok.eos_id], dtype) for x in ids])
        np.save(tmp / f"{split}.npy", flat)
        np.save(tmp / f"{split}_starts.npy", starts)
    try:
        tmp.rename(entry)
    except OSError:  # another process finished the same entry first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def _file_hash(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise config.UserError(f"data.tokenizer_path={path} does not exist; give a sentencepiece .model")
    return hashlib.sha256(p.read_bytes()).hexdigest()
