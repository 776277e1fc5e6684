"""Tokenize each corpus once into ArrayRecord shards, keyed by corpus, tokenizer and settings.

A cache entry `CACHE/<key>/` holds `tokenizer.model`, `meta.json` and, per corpus of the
experiment (one, or each part of a mixture) and split, the documents back to back as
<s> ids </s> in fixed token blocks (`c<i>/<split>-<shard>.array_record`, see shards.py) and
where each document starts (`c<i>/<split>-starts.npy`). The entry is built in a temporary
folder, locked while its build runs, and renamed into place when complete, so an interrupted
build is never read; the next build removes any temporary folder whose lock is free.

On a bucket (`data.cache_dir=gs://...` or LMJAX_CACHE), which has no rename or lock, an entry
is made whole by one conditional create instead:
1. the entry is built as above in a local folder, `<mirror>/<build id>/` (host, pid, random);
2. its files are uploaded under `CACHE/<key>/<build id>/`;
3. `CACHE/<key>/meta.json` is created only if absent (`storage.create_once`), naming the build
   id and every file's size: the first builder to create it wins; a loser deletes its upload
   and uses the winner's, a winner deletes folders of uploads that never got a meta.json;
4. readers go through meta.json only, so a half-uploaded build is never read, and copy the
   named files once to the local mirror, each to a temporary name then renamed, skipping those
   present with the right size: the shards are read locally, as ArrayRecord needs.
The mirror of `gs://B/P/<key>` is `$LMJAX_MIRROR/B/P/<key>/<build id>` (LMJAX_MIRROR defaults
to ~/.cache/lmjax/mirror).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import numpy as np
from tqdm import tqdm

from lmjax import storage
from lmjax.config import Data, UserError
from lmjax.data import shards, sources, tokenizer
from lmjax.data.files import bucket_filesystem

_FORMAT = 2
SPLITS = ("train", "validation")
_ENCODE_BATCH_CHARS = 2 << 20

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


def cache_root(cfg: Data) -> CachePath:
    name = cfg.cache_dir or os.environ.get("LMJAX_CACHE")
    if name and storage.is_bucket(name):
        return storage.path(name)
    return Path(name or Path.home() / ".cache" / "lmjax")


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


def entry_path(cfg: Data) -> CachePath:
    return cache_root(cfg) / cache_key(cfg)


def load_or_build(cfg: Data, log: Callable[[str], None] = print, progress: bool | None = None) -> Corpus:
    entry = entry_path(cfg)
    progress = sys.stderr.isatty() if progress is None else progress
    if storage.is_bucket(entry):
        folder, meta = _bucket_entry(cfg, entry, log, progress)
    else:
        if not (entry / "meta.json").exists():
            log(f"tokenizing {cfg.source} corpus into {entry}")
            _build(cfg, entry, log, progress)
        folder, meta = entry, json.loads((entry / "meta.json").read_text())
    return _open(cfg, folder, meta, entry)


def _open(cfg: Data, folder: Path, meta: dict, entry: CachePath) -> Corpus:
    """The corpus of the entry `entry` whose files are in the local folder `folder`."""
    dtype, block_tokens = np.dtype(meta["dtype"]), meta["block_tokens"]
    parts = []
    for i, part in enumerate(meta["parts"]):
        part_folder = folder / f"c{i}"
        parts.append(
            {
                s: Split(
                    shards.Blocks(
                        [part_folder / f for f in part[s]["shards"]], part[s]["tokens"], dtype, block_tokens
                    ),
                    np.load(part_folder / f"{s}-starts.npy", mmap_mode="r"),
                )
                for s in SPLITS
            }
        )
    tok = tokenizer.Tokenizer((folder / "tokenizer.model").read_bytes())
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
        _remove_abandoned_builds(entry.parent, f".{entry.name}.*.tmp")
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


def _remove_abandoned_builds(folder: Path, pattern: str) -> None:
    """Delete the temporary build folders `pattern` in `folder` that no running process holds
    locked (a killed build's lock is released by the kernel)."""
    for tmp in folder.glob(pattern):
        try:
            with (tmp / ".lock").open() as lock:  # none yet: a build that is just starting
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # locked: a build in progress (or already gone)
            continue


def _bucket_entry(
    cfg: Data, entry: storage.Path, log: Callable[[str], None], progress: bool
) -> tuple[Path, dict]:
    """(local folder holding the entry's files, its meta.json) of an entry on a bucket, built
    and uploaded first when it has no meta.json yet."""
    meta = _read_bucket_meta(entry)
    if meta is None:
        log(f"tokenizing {cfg.source} corpus into {entry}")
        _build_on_bucket(cfg, entry, log, progress)
        meta = _read_bucket_meta(entry)
        assert meta is not None, f"{entry}/meta.json vanished after it was created"
    return _mirror(entry, meta, log), meta


def _read_bucket_meta(entry: storage.Path) -> dict | None:
    try:
        return json.loads((entry / "meta.json").read_text())
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types
        raise UserError(
            f"cannot read the token cache {entry} ({storage.describe_error(e)}); check the bucket name "
            "and credentials (gcloud auth application-default login), or set data.cache_dir"
        ) from None


def _build_on_bucket(cfg: Data, entry: storage.Path, log: Callable[[str], None], progress: bool) -> None:
    storage.check_writable(entry.parent, "the token cache")  # before the tokenizing, not after
    build_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    local = mirror_path(entry) / build_id
    local.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(local.parent, ".*.tmp")
    _build(cfg, local, log, progress)
    won = False
    try:
        won = publish(local, entry, build_id)
    except OSError as e:  # gcsfs: permission, quota, network
        raise UserError(
            f"cannot upload the token cache to {entry} ({storage.describe_error(e)}); check the bucket's "
            "write permission, or set data.cache_dir to a local folder"
        ) from None
    finally:
        if not won:  # the winner's copy is read through the mirror like any other host's
            shutil.rmtree(local, ignore_errors=True)
    if not won:
        log(f"another process built {entry} first; using it")  # theirs is as good


def publish(local: Path, entry: storage.Path, build_id: str) -> bool:
    """Upload the built entry `local` to `entry/<build_id>/`, then create `entry/meta.json`
    naming it, only if no build did first. False when another build won: this upload is
    deleted, theirs is used."""
    fs = bucket_filesystem(str(entry))
    names = sorted(
        p.relative_to(local).as_posix()
        for p in local.rglob("*")
        if p.is_file() and p.name != "meta.json" and not p.name.startswith(".")
    )
    folder = _object_name(entry / build_id)
    fs.put([str(local / n) for n in names], [f"{folder}/{n}" for n in names])
    meta = json.loads((local / "meta.json").read_text())
    meta["upload"] = {"build": build_id, "files": {n: (local / n).stat().st_size for n in names}}
    if storage.create_once(entry / "meta.json", (json.dumps(meta, indent=1) + "\n").encode()):
        _remove_unnamed_uploads(fs, entry, build_id)
        return True
    fs.rm(folder, recursive=True)
    return False


def _remove_unnamed_uploads(fs: fsspec.AbstractFileSystem, entry: storage.Path, build_id: str) -> None:
    """Delete upload folders of `entry` other than `build_id`: with meta.json in place none of
    them will ever be read (killed uploads, or racers that are about to lose)."""
    for name in fs.ls(_object_name(entry), detail=False):
        if name.rstrip("/").rsplit("/", 1)[-1] not in (build_id, "meta.json"):
            fs.rm(name, recursive=True)


def mirror_path(entry: storage.Path) -> Path:
    """The local folder that holds copies of the bucket entry `entry`'s builds."""
    url = urllib.parse.urlsplit(str(entry))
    root = Path(os.environ.get("LMJAX_MIRROR") or Path.home() / ".cache" / "lmjax" / "mirror")
    return root.expanduser().absolute() / url.netloc / url.path.strip("/")


def _mirror(entry: storage.Path, meta: dict, log: Callable[[str], None]) -> Path:
    """The local copy of the build that meta.json names: files missing or of another size are
    downloaded, each to a temporary name then renamed, so a killed copy is never taken whole."""
    build, sizes = meta["upload"]["build"], meta["upload"]["files"]
    local = mirror_path(entry) / build
    missing = [n for n, size in sizes.items() if not _has_size(local / n, size)]
    if not missing:
        return local
    log(f"copying {len(missing)} files of {entry} to {local}")
    tmp = {n: _temporary_name(local / n) for n in missing}
    try:
        _download(entry, build, tmp)
        for n in missing:
            if not _has_size(tmp[n], sizes[n]):
                raise UserError(
                    f"{entry}/{build}/{n} is not the size its meta.json says; delete {entry}/meta.json"
                )
            tmp[n].replace(local / n)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)  # left only when a download failed
    return local


def _download(entry: storage.Path, build: str, targets: dict[str, Path]) -> None:
    """Copy the files `targets` names from `entry/<build>/` to the local paths it gives."""
    folder = _object_name(entry / build)
    try:
        for path in targets.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        bucket_filesystem(str(entry)).get(
            [f"{folder}/{n}" for n in targets], [str(p) for p in targets.values()]
        )
    except FileNotFoundError as e:
        raise UserError(
            f"the token cache {entry} lacks a file its meta.json names ({storage.describe_error(e)}); "
            f"delete {entry}/meta.json to rebuild it"
        ) from None
    except OSError as e:
        raise UserError(
            f"cannot copy the token cache {entry} to local disk ({storage.describe_error(e)}); check "
            "the bucket's read permission and that LMJAX_MIRROR is a local folder with room"
        ) from None


def _has_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _object_name(path: storage.Path) -> str:
    """A bucket path as fsspec names it: without the scheme."""
    return str(path).split("://", 1)[1]


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
    p = storage.path(path)
    if not p.is_file():
        raise UserError(f"data.tokenizer_path={path} does not exist; give a sentencepiece .model")
    return hashlib.sha256(p.read_bytes()).hexdigest()
