"""A cache entry on a bucket (`data.cache_dir=gs://...` or LMJAX_CACHE): built, published,
mirrored to local disk and read from there.

A bucket has no rename or lock, so an entry is made whole by one conditional create instead:
1. the entry is built as a local one (cache_build.py) in a local folder, `<mirror>/<build id>/`
   (host, pid, random);
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

import json
import os
import secrets
import shutil
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import fsspec

from lmjax import storage
from lmjax.config import Data, UserError
from lmjax.data.cache_build import build, remove_abandoned_builds
from lmjax.data.cache_meta import Damage, file_problem, parse_meta, records
from lmjax.data.cache_open import Corpus, open_corpus


def bucket_corpus(cfg: Data, entry: storage.Path, log: Callable[[str], None], progress: bool) -> Corpus:
    """The corpus of an entry on a bucket, built and uploaded first when it has no meta.json yet,
    read through the local mirror. A mirror's file that does not parse is copied once more; a
    file that is damaged on the bucket too is a UserError, as other hosts and runs may read it."""
    meta = read_bucket_meta(cfg, entry)
    if meta is None:
        log(f"tokenizing {cfg.source} corpus into {entry}")
        _build_on_bucket(cfg, entry, log, progress)
        meta = read_bucket_meta(cfg, entry)
        assert meta is not None, f"{entry}/meta.json vanished after it was created"
    copied_again: set[str] = set()
    while True:
        local = _mirror(entry, meta, log)
        try:
            return open_corpus(cfg, local, meta, entry)
        except Damage as damage:
            if damage.name in copied_again:
                raise _bucket_damage(entry, damage) from None
            log(f"the mirror {local} of {entry} is damaged ({damage}); copying that file again")
            (local / damage.name).unlink(missing_ok=True)
            copied_again.add(damage.name)


def read_bucket_meta(cfg: Data, entry: storage.Path) -> dict | None:
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
        meta = parse_meta(text, len(cfg.components()))
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
    remove_abandoned_builds(local.parent, ".*.tmp")
    build(cfg, local, log, progress)
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
    fs = storage.filesystem(entry)
    names = sorted(
        p.relative_to(local).as_posix()
        for p in local.rglob("*")
        if p.is_file() and p.name != "meta.json" and not p.name.startswith(".")
    )
    folder = storage.object_name(entry / build_id)
    fs.put([str(local / n) for n in names], [f"{folder}/{n}" for n in names])
    meta = json.loads((local / "meta.json").read_text())
    return create_meta(entry, build_id, meta, {n: (local / n).stat().st_size for n in names})


def create_meta(entry: storage.Path, build_id: str, meta: dict, sizes: dict[str, int]) -> bool:
    """Create `entry/meta.json`: `meta` naming the upload `entry/<build_id>/` and its files'
    `sizes`, only if no build did first. False when another build won: this upload is deleted."""
    fs = storage.filesystem(entry)
    meta["upload"] = {"build": build_id, "files": sizes}
    if storage.create_once(entry / "meta.json", (json.dumps(meta, indent=1) + "\n").encode()):
        _remove_unnamed_uploads(fs, entry, build_id)
        return True
    fs.rm(storage.object_name(entry / build_id), recursive=True)
    return False


def _remove_unnamed_uploads(fs: fsspec.AbstractFileSystem, entry: storage.Path, build_id: str) -> None:
    """Delete upload folders of `entry` other than `build_id`: with meta.json in place none of
    them will ever be read (killed uploads, or racers that are about to lose)."""
    for name in fs.ls(storage.object_name(entry), detail=False):
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
    build_id, recorded = meta["upload"]["build"], records(meta)
    local = mirror_path(entry) / build_id
    problems = {n: p for n, record in recorded.items() if (p := file_problem(local / n, record))}
    if not problems:
        return local
    damaged = [f"{n}: {p}" for n, p in problems.items() if p != "missing"]
    why = f" ({len(damaged)} damaged, such as {damaged[0]})" if damaged else ""
    log(f"copying {len(problems)} files of {entry} to {local}{why}")
    tmp = {n: Path(storage.temporary_name(local / n)) for n in problems}
    try:
        _download(entry, build_id, tmp)
        for n, path in tmp.items():
            if problem := file_problem(path, recorded[n]):
                raise _bucket_damage(entry, Damage(f"{build_id}/{n}", problem))
            path.replace(local / n)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)  # left only when a download failed
    return local


def _download(entry: storage.Path, build_id: str, targets: dict[str, Path]) -> None:
    """Copy the files `targets` names from `entry/<build_id>/` to the local paths it gives."""
    folder = storage.object_name(entry / build_id)
    try:
        for path in targets.values():
            path.parent.mkdir(parents=True, exist_ok=True)
        storage.filesystem(entry).get([f"{folder}/{n}" for n in targets], [str(p) for p in targets.values()])
    except FileNotFoundError:
        fs = storage.filesystem(entry)
        missing = [n for n in targets if not fs.exists(f"{folder}/{n}")] or ["a file"]
        raise _bucket_damage(entry, Damage(f"{build_id}/{missing[0]}", "missing")) from None
    except OSError as e:
        raise UserError(
            f"cannot copy the token cache {entry} to local disk ({storage.describe_error(e)}); check "
            "the bucket's read permission and that LMJAX_MIRROR is a local folder with room"
        ) from None
