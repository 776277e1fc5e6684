"""Where runs, token caches and corpora live: a local folder or a bucket (`gs://...`), behind one
path type, `etils.epath.Path` (gcsfs serves buckets; Orbax and tensorstore take the same paths).

What holds where (docs/cloud-storage.md says it for users):
- A file written by `write_atomic` is never seen half-written: locally it is written beside
  its place and renamed over it; on a bucket an object appears whole when its upload completes.
- `create_once` writes a file only if there is none, and says whether this call made it:
  a hard link locally, a generation-match precondition (`ifGenerationMatch=0`) on a bucket.
  It is what stands in for a directory rename or a lock where object storage has neither.
- A bucket has no append, rename or folders: nothing in lmjax appends to an object or renames
  one to finish it; what grows (metrics) is kept locally and uploaded whole (metrics.py).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import tempfile
import urllib.parse
from typing import TYPE_CHECKING

import fsspec
import fsspec.config
from etils import epath

from lmjax.config import UserError

if TYPE_CHECKING:  # google-cloud-storage: imported where a bucket is used
    from google.cloud.storage import Blob

Path = epath.Path
PathLike = str | os.PathLike

# gcsfs caches folder listings for the life of a process by default; other processes and hosts
# (and tensorstore, which writes Orbax's arrays without gcsfs) change a run's folders under it,
# and a stale listing would hide a newer checkpoint.
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def path(name: PathLike) -> Path:
    """A bucket URL as it is, a local path with `~` expanded and made absolute (Orbax needs
    absolute paths; a run must not depend on the directory it was started from)."""
    text = os.fspath(name)
    if is_bucket(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_bucket(name: PathLike) -> bool:
    return "://" in os.fspath(name)


def write_atomic(target: PathLike, data: bytes) -> None:
    """Replace `target` whole: readers see the old content or the new, never a part."""
    target = path(target)
    if is_bucket(target):
        target.write_bytes(data)  # an object is visible only once its upload has completed
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk that filled up keeps no half-written copy
        raise


def create_once(target: PathLike, data: bytes) -> bool:
    """Write `target` only if it does not exist; True when this call created it. Two writers
    racing: exactly one wins, the other's data is not written."""
    target = path(target)
    if is_bucket(target):
        return _create_object_once(target, data)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    tmp.write_bytes(data)
    try:
        os.link(tmp, target)  # fails when target exists, unlike a rename
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _create_object_once(target: Path, data: bytes) -> bool:
    from google.api_core import exceptions

    blob = gcs_blob(target)
    try:
        blob.upload_from_string(data, if_generation_match=0)
        return True
    except exceptions.PreconditionFailed:
        return False


def gcs_blob(target: PathLike) -> Blob:
    """The google-cloud-storage object behind a gs:// path, for what gcsfs does not offer:
    writes and deletes conditional on an object's generation."""
    from google.cloud import storage  # comes with gcsfs; imported where a bucket is used

    url = urllib.parse.urlparse(os.fspath(target))
    if url.scheme != "gs":
        raise UserError(f"{target}: lmjax writes to local folders and gs:// buckets only")
    # With STORAGE_EMULATOR_HOST set (a test server) the client needs no project or credentials.
    client = storage.Client(project="lmjax") if os.environ.get("STORAGE_EMULATOR_HOST") else storage.Client()
    return client.bucket(url.netloc).blob(url.path.lstrip("/"))


def check_writable(folder: PathLike, what: str) -> None:
    """Write a small probe file into `folder`, read it back and delete it; UserError (exit 2)
    naming `what` when any of that fails, so a bad bucket, missing credentials or a read-only
    folder stop a run before its first step rather than at its first save."""
    folder = path(folder)
    probe = folder / f".lmjax-probe-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError("it is a file")
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"lmjax")
        if probe.read_bytes() != b"lmjax":
            raise OSError("a file written there read back different")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - gcsfs, google-auth and the OS raise many types
        hint = (
            "check the bucket name and credentials (gcloud auth application-default login)"
            if is_bucket(folder)
            else "check its permissions and free space"
        )
        raise UserError(f"cannot write {what} {folder} ({describe_error(e)}); {hint}") from None


def describe_error(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message, or the
    operating system's words where tensorstore buries them (`...: No space left on device
    [os_error_code='28']`)."""
    text = str(e).strip()
    os_error = re.search(r": ([^:\[\]]+?) \[os_error_code=", text)
    if os_error:
        return f"{type(e).__name__}: {text.split(':')[0]}: {os_error.group(1)}"
    lines = text.splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def upload_folder(local: PathLike, remote: PathLike) -> None:
    """Copy every file under the local folder `local` to `remote` (a bucket folder), each
    replaced whole."""
    local, remote = path(local), path(remote)
    for folder, _, names in os.walk(local):
        for name in names:
            source = epath.Path(folder) / name
            write_atomic(remote / source.relative_to(local).as_posix(), source.read_bytes())


def move_folder(source: PathLike, target: PathLike) -> None:
    """Rename a folder; on a bucket, copy its objects and delete the originals."""
    source, target = path(source), path(target)
    if is_bucket(source):
        filesystem(source).mv(object_name(source), object_name(target), recursive=True)
    else:
        source.rename(target)


def filesystem(url: PathLike) -> fsspec.AbstractFileSystem:
    """The fsspec file system of a bucket URL, for what epath does not offer (`**` globs, bulk
    copies); its listings are not cached (above)."""
    return fsspec.filesystem(urllib.parse.urlsplit(os.fspath(url)).scheme)


def object_name(url: PathLike) -> str:
    """A bucket path as fsspec names it: without the scheme."""
    return os.fspath(url).split("://", 1)[1]


def staging_folder() -> Path:
    """A new local folder that stands in for a bucket folder while files there grow: they are
    written here and uploaded whole (`upload_folder`)."""
    return epath.Path(tempfile.mkdtemp(prefix="lmjax-staging-"))


def temporary_name(target: PathLike) -> Path:
    """A name beside `target` to write it under before renaming it into place."""
    target = path(target)
    # Unique across hosts too: processes on several hosts may write the same file (the same
    # bytes) on a shared file system, and containers often share process ids.
    return target.with_name(f".{target.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
