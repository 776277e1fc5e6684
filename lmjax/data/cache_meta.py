"""A cache entry's meta.json and the checks of its files against it.

Holds the entry's layout (`SPLITS`, `entry_files`, the `FORMAT` that the cache key names),
`Damage`, parsing meta.json with every key that reading an entry needs, and per file the record
meta.json keeps (size, and a sha256 of all of it or, for a shard, of its first and last
`ENDS_BYTES`) and what is wrong with a file that a record describes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = 2
ENDS_BYTES = 64 << 10  # ArrayRecord's block: a shard's header, and its postscript at the end
SPLITS = ("train", "validation")


class Damage(Exception):
    """A file of a cache entry that is missing, unreadable, or not what its meta.json records."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name = name  # relative to the entry


def parse_meta(text: str, n_parts: int) -> dict:
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
        raise Damage("meta.json", f"unreadable ({describe(e)})") from None
    return meta


def _are_names(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def entry_files(meta: dict) -> list[str]:
    """The files of an entry, relative to it: the tokenizer, and per corpus and split its shards
    and where its documents start."""
    names = ["tokenizer.model"]
    for i, part in enumerate(meta["parts"]):
        for s in SPLITS:
            names += [f"c{i}/{s}-starts.npy", *(f"c{i}/{shard}" for shard in part[s]["shards"])]
    return names


def records(meta: dict) -> dict[str, dict | None]:
    """Each file of the entry and what meta.json says of it: size and checksum; for entries
    written before these were recorded, the size a bucket upload lists, or nothing."""
    recorded, uploaded = meta.get("files", {}), meta.get("upload", {}).get("files", {})
    return {
        n: recorded.get(n) or ({"size": uploaded[n]} if n in uploaded else None) for n in entry_files(meta)
    }


def file_record(path: Path) -> dict:
    """`path`'s size and checksum: of a shard its first and last ENDS_BYTES (its header, and the
    postscript and index that opening it reads), of any other file all of it."""
    if path.suffix == ".array_record":
        return {
            "size": path.stat().st_size,
            "ends_bytes": ENDS_BYTES,
            "sha256_ends": _ends_sha256(path, ENDS_BYTES),
        }
    return {"size": path.stat().st_size, "sha256": _whole_sha256(path)}


def file_problem(path: Path, record: dict | None) -> str | None:
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
