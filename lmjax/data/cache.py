"""Tokenize each corpus once into ArrayRecord shards, keyed by corpus, tokenizer and settings.

A cache entry `CACHE/<key>/` holds `tokenizer.model`, `meta.json` and, per corpus of the
experiment (one, or each part of a mixture) and split, the documents back to back as
<s> ids </s> in fixed token blocks (`c<i>/<split>-<shard>.array_record`, see shards.py) and
where each document starts (`c<i>/<split>-starts.npy`). The entry is built in a temporary
folder, locked while its build runs, and renamed into place when complete, so an interrupted
build is never read; the next build removes any temporary folder whose lock is free.

meta.json records, under "files", each file's size and a sha256: of all of it for the
tokenizer and the starts (which Corpus.identity reads whole anyway), of only the first and
last 64 KiB for a shard (`sha256_ends`, `ends_bytes`: its header, and the postscript and index
that opening it reads; Riegeli checksums every chunk, so damage in between fails the read of
those blocks). Loading checks every size and checksum, which costs reading the small files
and 128 KiB per shard, never the terabytes, and opens every file: one missing, of another
size or checksum, one that does not parse or holds another number of tokens or documents, or a
meta.json that is not JSON or lacks a key, is damage. A damaged local entry is deleted (renamed
away, then removed, under a lock of the cache folder, so only one process deletes it) and
rebuilt. Entries written before these records check only that every file exists and parses;
their key is unchanged, so they are reused.

On a bucket (`data.cache_dir=gs://...` or LMJAX_CACHE), which has no rename or lock, an entry
is made whole by one conditional create instead:
1. the entry is built as above in a local folder, `<mirror>/<build id>/` (host, pid, random);
2. its files are uploaded under `CACHE/<key>/<build id>/`;
3. `CACHE/<key>/meta.json` is created only if absent (`storage.create_once`), naming the build
   id and every file's size: the first builder to create it wins; a loser deletes its upload
   and uses the winner's, a winner deletes folders of uploads that never got a meta.json;
4. readers go through meta.json only, so a half-uploaded build is never read, and copy the
   named files once to the local mirror, each to a temporary name then renamed, skipping those
   present and as recorded: the shards are read locally, as ArrayRecord needs.
The mirror of `gs://B/P/<key>` is `$LMJAX_MIRROR/B/P/<key>/<build id>` (LMJAX_MIRROR defaults
to ~/.cache/lmjax/mirror). A damaged file of the mirror is copied again; a download that is not
as recorded, or does not parse, or a garbage meta.json, is damage of the bucket entry: a
UserError that names the entry to delete, since other hosts and runs may be reading it.
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
_ENDS_BYTES = 64 << 10  # ArrayRecord's block: a shard's header, and its postscript at the end
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
        return _bucket_corpus(cfg, entry, log, progress)
    return _local_corpus(cfg, entry, log, progress)


class Damage(Exception):
    """A file of a cache entry that is missing, unreadable, or not what its meta.json records."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name = name  # relative to the entry


def _local_corpus(cfg: Data, entry: Path, log: Callable[[str], None], progress: bool) -> Corpus:
    try:
        return _checked_open(cfg, entry)
    except FileNotFoundError:
        log(f"tokenizing {cfg.source} corpus into {entry}")
    except Damage:
        _remove_if_damaged(cfg, entry, log)
    if not entry.exists():
        _build(cfg, entry, log, progress)
    try:
        return _checked_open(cfg, entry)
    except Damage as damage:
        raise UserError(
            f"the token cache entry {entry} is damaged right after it was built ({damage}); check that disk"
        ) from None


def _checked_open(cfg: Data, entry: Path) -> Corpus:
    """The corpus of the local entry `entry`, its files checked against its meta.json first."""
    meta = _parse_meta(_read_text(entry / "meta.json"), len(cfg.components()))
    for name, record in _records(meta).items():
        if problem := _file_problem(entry / name, record):
            raise Damage(name, problem)
    return _open(cfg, entry, meta, entry)


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
        raise Damage(path.name, _describe(e)) from None


def _parse_meta(text: str, n_parts: int) -> dict:
    """meta.json's content, checked for every key that reading the entry needs."""
    try:
        meta = json.loads(text)
        np.dtype(meta["dtype"])
        if not isinstance(meta["block_tokens"], int) or len(meta["parts"]) != n_parts:
            raise ValueError(
                f"block_tokens={meta['block_tokens']!r}, {len(meta['parts'])} corpora for {n_parts}"
            )
        for part in meta["parts"]:
            for s in SPLITS:
                if not isinstance(part[s]["tokens"], int) or not _are_names(part[s]["shards"]):
                    raise ValueError(f"no token count or shard names for {s}")
        if not all(isinstance(record["size"], int) for record in meta.get("files", {}).values()):
            raise ValueError("a file's size is not a number")
        upload = meta.get("upload", {"build": "", "files": {}})
        uploaded_sizes = list(upload["files"].values())
        if not isinstance(upload["build"], str) or not all(isinstance(n, int) for n in uploaded_sizes):
            raise ValueError("the upload names no build or sizes")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, or keys missing
        raise Damage("meta.json", f"unreadable ({_describe(e)})") from None
    return meta


def _are_names(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def _entry_files(meta: dict) -> list[str]:
    """The files of an entry, relative to it: the tokenizer, and per corpus and split its shards
    and where its documents start."""
    names = ["tokenizer.model"]
    for i, part in enumerate(meta["parts"]):
        for s in SPLITS:
            names += [f"c{i}/{s}-starts.npy", *(f"c{i}/{shard}" for shard in part[s]["shards"])]
    return names


def _records(meta: dict) -> dict[str, dict | None]:
    """Each file of the entry and what meta.json says of it: size and checksum; for entries
    written before these were recorded, the size a bucket upload lists, or nothing."""
    recorded, uploaded = meta.get("files", {}), meta.get("upload", {}).get("files", {})
    return {
        n: recorded.get(n) or ({"size": uploaded[n]} if n in uploaded else None) for n in _entry_files(meta)
    }


def _file_record(path: Path) -> dict:
    """`path`'s size and checksum: of a shard its first and last _ENDS_BYTES (its header, and the
    postscript and index that opening it reads), of any other file all of it."""
    if path.suffix == ".array_record":
        return {
            "size": path.stat().st_size,
            "ends_bytes": _ENDS_BYTES,
            "sha256_ends": _ends_sha256(path, _ENDS_BYTES),
        }
    return {"size": path.stat().st_size, "sha256": _whole_sha256(path)}


def _file_problem(path: Path, record: dict | None) -> str | None:
    """What is wrong with the file `path` that `record` describes (None: that it exists), if anything."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if record is None:
        return None
    if size != record["size"]:
        return f"{size} bytes, expected {record['size']}"
    if "sha256" in record and _whole_sha256(path) != record["sha256"]:
        return "contents differ from its sha256 in meta.json"
    if "sha256_ends" in record and _ends_sha256(path, record["ends_bytes"]) != record["sha256_ends"]:
        return f"first or last {record['ends_bytes']} bytes differ from their sha256 in meta.json"
    return None


def _whole_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _ends_sha256(path: Path, ends_bytes: int) -> str:
    """sha256 of the first and the last `ends_bytes` of `path`: all of a short file."""
    with path.open("rb") as f:
        h = hashlib.sha256(f.read(ends_bytes))
        f.seek(max(ends_bytes, path.stat().st_size - ends_bytes))
        h.update(f.read())
    return h.hexdigest()


def _open(cfg: Data, folder: Path, meta: dict, entry: CachePath) -> Corpus:
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
        raise Damage("tokenizer.model", _describe(e)) from None
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
        raise Damage(name, _describe(e)) from None
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
            meta["files"] = {n: _file_record(tmp / n) for n in _entry_files(meta)}
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


def _bucket_corpus(cfg: Data, entry: storage.Path, log: Callable[[str], None], progress: bool) -> Corpus:
    """The corpus of an entry on a bucket, built and uploaded first when it has no meta.json yet,
    read through the local mirror. A mirror's file that does not parse is copied once more; a
    file that is damaged on the bucket too is a UserError, as other hosts and runs may read it."""
    meta = _read_bucket_meta(cfg, entry)
    if meta is None:
        log(f"tokenizing {cfg.source} corpus into {entry}")
        _build_on_bucket(cfg, entry, log, progress)
        meta = _read_bucket_meta(cfg, entry)
        assert meta is not None, f"{entry}/meta.json vanished after it was created"
    copied_again: set[str] = set()
    while True:
        local = _mirror(entry, meta, log)
        try:
            return _open(cfg, local, meta, entry)
        except Damage as damage:
            if damage.name in copied_again:
                raise _bucket_damage(entry, damage) from None
            log(f"the mirror {local} of {entry} is damaged ({damage}); copying that file again")
            (local / damage.name).unlink(missing_ok=True)
            copied_again.add(damage.name)


def _read_bucket_meta(cfg: Data, entry: storage.Path) -> dict | None:
    try:
        text = (entry / "meta.json").read_text()
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types
        raise UserError(
            f"cannot read the token cache {entry} ({storage.describe_error(e)}); check the bucket name "
            "and credentials (gcloud auth application-default login), or set data.cache_dir"
        ) from None
    try:
        meta = _parse_meta(text, len(cfg.components()))
    except Damage as damage:
        raise _bucket_damage(entry, damage) from None
    if "upload" not in meta:
        raise _bucket_damage(entry, Damage("meta.json", "names no upload"))
    return meta


def _bucket_damage(entry: storage.Path, damage: Damage) -> UserError:
    return UserError(
        f"the token cache entry {entry} is damaged ({damage}); once no run reads it, delete it "
        f"(gcloud storage rm -r {entry}) and the next run rebuilds it"
    )


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
    """The local copy of the build that meta.json names: files missing or not as meta.json
    records are downloaded, each to a temporary name then renamed, so a killed copy is never
    taken whole; a download not as recorded is damage of the bucket entry."""
    build, records = meta["upload"]["build"], _records(meta)
    local = mirror_path(entry) / build
    problems = {n: p for n, record in records.items() if (p := _file_problem(local / n, record))}
    if not problems:
        return local
    damaged = [f"{n}: {p}" for n, p in problems.items() if p != "missing"]
    why = f" ({len(damaged)} damaged, such as {damaged[0]})" if damaged else ""
    log(f"copying {len(problems)} files of {entry} to {local}{why}")
    tmp = {n: _temporary_name(local / n) for n in problems}
    try:
        _download(entry, build, tmp)
        for n, path in tmp.items():
            if problem := _file_problem(path, records[n]):
                raise _bucket_damage(entry, Damage(f"{build}/{n}", problem))
            path.replace(local / n)
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
    except FileNotFoundError:
        fs = bucket_filesystem(str(entry))
        missing = [n for n in targets if not fs.exists(f"{folder}/{n}")] or ["a file"]
        raise _bucket_damage(entry, Damage(f"{build}/{missing[0]}", "missing")) from None
    except OSError as e:
        raise UserError(
            f"cannot copy the token cache {entry} to local disk ({storage.describe_error(e)}); check "
            "the bucket's read permission and that LMJAX_MIRROR is a local folder with room"
        ) from None


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
