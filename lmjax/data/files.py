"""Which files a corpus is, and which split a document falls in: the helpers every source shares.

A document goes to validation when the hash of its key (a file's relative path, or
"path:line" / "path:row") falls below `validation_percent`, so the split is the same on every
machine with the same files.

`data.path` may name a local file, folder or glob, or the same on a bucket (`gs://b/corpus`,
`gs://b/corpus/*.jsonl`, `gs://b/corpus/**/*.jsonl`): a bucket folder is every object under its
prefix. Keys are relative to the same root either way, so the same files give the same split
and tokens in a local folder and on a bucket; a glob skips names starting with "." there too.
Bucket paths are `storage.Path`s, listed by fsspec (epath's glob has no `**`) without a listings
cache; each file's stamp (size and generation), which identifies its content for the token
cache, comes from that same listing.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import pathlib
import sysconfig
import urllib.parse

import fsspec

from lmjax import storage
from lmjax.config import UserError

_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}

CorpusPath = pathlib.Path | storage.Path  # a local file, or an object on a bucket


def stdlib_files() -> tuple[pathlib.Path, list[pathlib.Path]]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP]  # prune: test/ is 60%
        files += [pathlib.Path(folder, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def user_files(pattern: str, suffixes: tuple[str, ...] = ()) -> tuple[CorpusPath, list[CorpusPath]]:
    """(root, files) for a file, a folder or a glob. In a folder, names starting with "." or
    "_" (.git, _SUCCESS) are skipped, and only `suffixes` are taken when given. The root is the
    folder or the glob's fixed prefix: document keys are relative to it."""
    if storage.is_bucket(pattern):
        root, stamped = bucket_files(pattern, suffixes)
        return root, [path for path, _ in stamped]
    path = pathlib.Path(pattern).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and _is_taken(p.relative_to(path).parts, suffixes)]
        return path, sorted(files)
    files = sorted(pathlib.Path(p) for p in glob.glob(str(path), recursive=True) if pathlib.Path(p).is_file())
    fixed = [part for part in itertools.takewhile(lambda part: not glob.has_magic(part), path.parts)]
    return pathlib.Path(*fixed) if fixed else pathlib.Path("."), files


def stamped_user_files(
    pattern: str, suffixes: tuple[str, ...] = ()
) -> tuple[CorpusPath, list[tuple[CorpusPath, str]]]:
    """`user_files` with each file's stamp, "size|modification", which changes when its content
    does (st_mtime_ns locally, the object's generation on a bucket)."""
    if storage.is_bucket(pattern):
        return bucket_files(pattern, suffixes)
    root, files = user_files(pattern, suffixes)
    return root, [(p, stamp(p)) for p in files]


def bucket_files(
    pattern: str, suffixes: tuple[str, ...] = ()
) -> tuple[storage.Path, list[tuple[storage.Path, str]]]:
    """`stamped_user_files` of a bucket URL, from one listing."""
    url = urllib.parse.urlsplit(pattern)
    try:
        root, listed = _list_objects(
            storage.filesystem(pattern), f"{url.netloc}{url.path}".rstrip("/"), suffixes
        )
    except FileNotFoundError:
        raise UserError(
            f"{pattern}: bucket {url.netloc} does not exist; check the bucket name in data.path"
        ) from None
    except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types
        raise UserError(
            f"cannot list {pattern} ({storage.describe_error(e)}); check the bucket name and "
            "credentials (gcloud auth application-default login)"
        ) from None
    files = [(_url(url.scheme, name), _object_stamp(info)) for name, info in listed]
    return _url(url.scheme, root), sorted(files)


def stamp(path: pathlib.Path) -> str:
    st = path.stat()
    return f"{st.st_size}|{st.st_mtime_ns}"


def root_name(root: CorpusPath) -> str:
    """The root as the cache key has always named it: absolute locally, the URL on a bucket."""
    return str(root) if storage.is_bucket(root) else str(root.absolute())


def _url(scheme: str, name: str) -> storage.Path:
    return storage.path(f"{scheme}://{name}")


def _object_stamp(info: dict) -> str:
    return f"{info['size']}|{info.get('generation') or info.get('updated')}"


def _list_objects(
    fs: fsspec.AbstractFileSystem, name: str, suffixes: tuple[str, ...]
) -> tuple[str, list[tuple[str, dict]]]:
    """(root, [(object name, info)]) of an object, a prefix (a folder) or a glob, names without
    the scheme; a glob skips names starting with "." below its root, as a local glob does."""
    if glob.has_magic(name):
        parts = name.split("/")
        root = "/".join(itertools.takewhile(lambda part: not glob.has_magic(part), parts))
        found = fs.glob(name, detail=True)
        listed = [
            (n, info)
            for n, info in found.items()
            if info["type"] == "file" and not any(p.startswith(".") for p in _relative_parts(n, root))
        ]
        return root, listed
    found = fs.find(name, detail=True)
    if name in found:  # the object itself (a prefix lists its objects, not itself)
        return name.rpartition("/")[0], [(name, found[name])]
    listed = [(n, info) for n, info in found.items() if _is_taken(_relative_parts(n, name), suffixes)]
    return name, listed


def _relative_parts(name: str, root: str) -> list[str]:
    return name[len(root) :].strip("/").split("/")


def _is_taken(relative_parts: tuple[str, ...] | list[str], suffixes: tuple[str, ...]) -> bool:
    """A folder's file is taken unless a part of its relative path starts with "." or "_", and
    only with one of `suffixes` when given."""
    return not any(part[0] in "._" for part in relative_parts) and (
        not suffixes or relative_parts[-1].endswith(suffixes)
    )


def is_validation(key: str, percent: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 10_000
    return bucket < percent * 100


def split_of(key: str, percent: float) -> str:
    return "validation" if is_validation(key, percent) else "train"
