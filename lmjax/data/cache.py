"""Tokenize each corpus once into ArrayRecord shards, keyed by corpus, tokenizer and settings.

A cache entry `CACHE/<key>/` holds `tokenizer.model`, `meta.json` and, per corpus of the
experiment (one, or each part of a mixture) and split, the documents back to back as
<s> ids </s> in fixed token blocks (`c<i>/<split>-<shard>.array_record`, see shards.py),
where each document starts (`c<i>/<split>-starts.npy`) and, for conversations, the token ranges
the loss is taken on (`c<i>/<split>-trained.npy`). The entry is built in a temporary
folder, locked while its build runs, and renamed into place when complete, so an interrupted
build is never read; the next build removes any temporary folder whose lock is free.

meta.json records, under "files", each file's size and a sha256: of all of it for the
tokenizer, the starts and the trained ranges (eight bytes a document or range: small next to
the shards), of only the first and
last 64 KiB for a shard (`sha256_ends`, `ends_bytes`: its header, and the postscript and index
that opening it reads; Riegeli checksums every chunk, so damage in between fails the read of
those blocks). Loading checks every size and checksum, which costs reading the small files
and 128 KiB per shard, never the terabytes; a shard is opened only when first read. A file
missing, of another size or checksum, one that does not parse or holds another number of tokens
or documents, or a meta.json that is not JSON or lacks a key, is damage. A damaged local entry
is deleted (renamed away, then removed, under a lock of the cache folder, so only one process
deletes it) and rebuilt. Entries written before these records check only that every file exists
and parses (every shard opened at once); their key is unchanged, so they are reused.

On a bucket (`data.cache_dir=gs://...` or LMJAX_CACHE), which has no rename or lock, an entry is
built locally, uploaded under a build id, made whole by one conditional create of its meta.json,
and read through a local mirror; a damaged bucket entry is a UserError naming it.

This module holds the key, `load_or_build` and the local entry's check and deletion; the rest:
- cache_meta.py: the layout, Damage, meta.json parsing, and each file's record and its check;
- cache_open.py: Split and Corpus, and opening an entry's local files as them;
- cache_build.py: building an entry in a local folder;
- cache_bucket.py: an entry on a bucket: building, publishing, mirroring and reading it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lmjax import storage
from lmjax.config import Data, UserError
from lmjax.data import sources, tokenizer
from lmjax.data.cache_bucket import bucket_corpus, mirror_path, publish, read_bucket_meta
from lmjax.data.cache_build import build
from lmjax.data.cache_meta import FORMAT, SPLITS, Damage, describe, file_problem, parse_meta, records
from lmjax.data.cache_open import CachePath, Corpus, Split, open_corpus

__all__ = [
    "SPLITS",
    "CachePath",
    "Corpus",
    "Split",
    "cache_key",
    "cache_root",
    "entry_path",
    "exists_whole",
    "input_bytes",
    "is_built",
    "load_or_build",
    "mirror_path",
    "publish",
]


def cache_root(cfg: Data) -> CachePath:
    name = cfg.cache_dir or os.environ.get("LMJAX_CACHE")
    if name and storage.is_bucket(name):
        return storage.path(name)
    return Path(name or Path.home() / ".cache" / "lmjax")


def cache_key(cfg: Data) -> str:
    settings = (
        FORMAT,
        sorted(tokenizer.TRAINER_SETTINGS.items()),
        [(sources.fingerprint(c), c.weight) for c in cfg.components()],  # weights shape the sample
        cfg.validation_percent,
        cfg.vocab_size,
        cfg.tokenizer,
        cfg.tokenizer_sample_bytes,
        _file_hash(cfg.tokenizer_path) if cfg.tokenizer_path else "",
        *([_file_hash(cfg.chat_template, "chat_template.jinja")] if cfg.chat_template else []),
    )
    return hashlib.sha256(repr(settings).encode()).hexdigest()[:20]


def entry_path(cfg: Data) -> CachePath:
    return cache_root(cfg) / cache_key(cfg)


def is_built(cfg: Data) -> bool:
    """Whether the entry of `cfg` is in place (its meta.json is written last, locally and on a
    bucket); not whether its files are whole, which opening it checks."""
    return (entry_path(cfg) / "meta.json").exists()


def exists_whole(cfg: Data, log: Callable[[str], None] = print) -> bool:
    """Whether the entry of `cfg` exists whole, checked as `load_or_build` checks it: a damaged
    local entry is deleted (False), a damaged or unreadable bucket entry is a UserError."""
    entry = entry_path(cfg)
    if storage.is_bucket(entry):
        return read_bucket_meta(cfg, entry) is not None
    try:
        _checked_open(cfg, entry)
        return True
    except FileNotFoundError:
        return False
    except Damage:
        _remove_if_damaged(cfg, entry, log)
        return entry.exists()


def input_bytes(cfg: Data) -> int:
    """The size of the input files of every corpus of `cfg`, from their listing (0 for TFDS)."""
    return sum(chunk.size for c in cfg.components() for chunk in sources.chunks(c, cfg.validation_percent))


def load_or_build(cfg: Data, log: Callable[[str], None] = print, progress: bool | None = None) -> Corpus:
    entry = entry_path(cfg)
    progress = sys.stderr.isatty() if progress is None else progress
    if storage.is_bucket(entry):
        return bucket_corpus(cfg, entry, log, progress)
    return _local_corpus(cfg, entry, log, progress)


def _local_corpus(cfg: Data, entry: Path, log: Callable[[str], None], progress: bool) -> Corpus:
    try:
        return _checked_open(cfg, entry)
    except FileNotFoundError:
        log(f"tokenizing {cfg.source} corpus into {entry}")
    except Damage:
        _remove_if_damaged(cfg, entry, log)
    if not entry.exists():
        build(cfg, entry, log, progress)
    try:
        return _checked_open(cfg, entry)
    except Damage as damage:
        raise UserError(
            f"the token cache entry {entry} is damaged right after it was built ({damage}); check that disk"
        ) from None


def _checked_open(cfg: Data, entry: Path) -> Corpus:
    """The corpus of the local entry `entry`, its files checked against its meta.json first."""
    meta = parse_meta(_read_text(entry / "meta.json"), len(cfg.components()))
    for name, record in records(meta).items():
        if problem := file_problem(entry / name, record):
            raise Damage(name, problem)
    return open_corpus(cfg, entry, meta, entry)


def _remove_if_damaged(cfg: Data, entry: Path, log: Callable[[str], None]) -> None:
    """Delete the local entry `entry` if it is still damaged. Checked again under a lock of the
    cache folder, so that of processes that found it damaged only the first deletes it: the
    others find it gone, or rebuilt whole by then, and must not delete that."""
    folder = os.open(entry.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            _checked_open(cfg, entry)
            return
        except FileNotFoundError:  # deleted by another process
            return
        except Damage as damage:
            aside = entry.with_name(f".{entry.name}.damaged-{time.time_ns()}")
            try:
                entry.rename(aside)  # at once: no reader sees an entry half deleted
            except OSError as e:
                raise UserError(
                    f"token cache entry {entry} is damaged ({damage}) and cannot be deleted "
                    f"({e.strerror}); delete it, or set data.cache_dir"
                ) from None
            log(f"token cache entry {entry} is damaged ({damage}); deleting it and rebuilding")
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        os.close(folder)


def _read_text(path: Path) -> str:
    """The text of `path`: FileNotFoundError when its folder (the entry) does not exist, Damage
    when the file is missing or unreadable."""
    if not path.parent.exists():
        raise FileNotFoundError(path)
    try:
        return path.read_text()
    except FileNotFoundError:
        raise Damage(path.name, "missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Damage(path.name, describe(e)) from None


def _file_hash(path: str, what: str = "sentencepiece .model") -> str:
    p = storage.path(path)
    if not p.is_file():
        key = "chat_template" if what.startswith("chat") else "tokenizer_path"
        raise UserError(f"data.{key}={path} does not exist; give a {what}")
    return hashlib.sha256(p.read_bytes()).hexdigest()
