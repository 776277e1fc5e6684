"""A cache entry's meta.json and the checks of its files against it.

Holds the entry's layout (`SPLITS`, `entry_files`, the `FORMAT` that the cache key names),
`Damage`, parsing meta.json with every key that reading an entry needs, and per file the record
meta.json keeps (size, and a sha256 of all of it or, for a shard, of its first and last
`ENDS_BYTES`) and what is wrong with a file that a record describes.

`summarize` adds what start-up would otherwise work out from every document start, once when the
entry is built: per split the most documents a training window holds at each window length of
`SUMMARY_SEQ_LENS` (`most_documents`), and the corpus `identity`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = 2
ENDS_BYTES = 64 << 10  # ArrayRecord's block: a shard's header, and its postscript at the end
SPLITS = ("train", "validation")
SUMMARY_SEQ_LENS = tuple(2**k for k in range(4, 21))  # the window lengths `most_documents` covers


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
                if not isinstance(part[s].get("trained_tokens", 0), int):
                    raise ValueError(f"the trained tokens of {s} are not a number")
                if not _are_counts(part[s].get("most_documents", {})):
                    raise ValueError(f"the most documents a window of {s} holds are not numbers")
        if not isinstance(meta.get("identity", ""), str) or not isinstance(meta.get("shard_blocks", 1), int):
            raise ValueError("the identity is not text or the blocks a shard holds not a number")
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


def _are_counts(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(v, int) for v in value.values())


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def entry_files(meta: dict) -> list[str]:
    """The files of an entry, relative to it: the tokenizer, and per corpus and split its shards,
    where its documents start and, for conversations, its trained token ranges."""
    names = ["tokenizer.model"]
    for i, part in enumerate(meta["parts"]):
        for s in SPLITS:
            names += [f"c{i}/{s}-starts.npy", *(f"c{i}/{shard}" for shard in part[s]["shards"])]
            if "trained_tokens" in part[s]:
                names.append(f"c{i}/{trained_name(s)}")
    return names


def trained_name(split: str) -> str:
    """The file of a conversation split's trained token ranges (int64 start, end pairs)."""
    return f"{split}-trained.npy"


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


def summarize(
    meta: dict,
    model_proto: bytes,
    starts: list[dict[str, np.ndarray]],
    trained: list[dict[str, np.ndarray | None]] | None = None,
) -> None:
    """Add to `meta` (in place) what start-up needs from the document starts: per corpus and
    split its `most_documents` for each window length of SUMMARY_SEQ_LENS, and the corpus
    `identity`. `starts[i][split]`: where each document of corpus i's split starts;
    `trained[i][split]`: a conversation split's trained token ranges (None for text)."""
    splits = []
    for i, (part, part_starts) in enumerate(zip(meta["parts"], starts, strict=True)):
        for s in SPLITS:
            part[s]["most_documents"] = {
                str(T): most_documents(part_starts[s], part[s]["tokens"], T) for T in SUMMARY_SEQ_LENS
            }
        splits.append(
            {s: (part[s]["tokens"], part_starts[s], trained[i][s] if trained else None) for s in SPLITS}
        )
    meta["identity"] = corpus_identity(model_proto, splits)


def most_documents(starts: np.ndarray, n_tokens: int, seq_len: int) -> int:
    """The most documents any training window of a split holds (loader.max_segments of the split
    alone): of its (n_tokens - 1) // seq_len windows [w*seq_len, (w+1)*seq_len), the document
    covering a window's first token plus each starting strictly inside it. The starts off a
    window's first token are grouped by window; as `starts` are sorted, each window's are one run,
    so this takes O(documents) memory, however many windows there are."""
    starts = np.asarray(starts)
    n_windows = (n_tokens - 1) // seq_len
    window = starts[(starts % seq_len != 0) & (starts < n_windows * seq_len)] // seq_len
    if not len(window):
        return 1
    run_edges = np.concatenate([[0], np.flatnonzero(window[1:] != window[:-1]) + 1, [len(window)]])
    return int(np.diff(run_edges).max()) + 1


def corpus_identity(
    model_proto: bytes, splits: list[dict[str, tuple[int, np.ndarray, np.ndarray | None]]]
) -> str:
    """What training on a corpus depends on: the tokenizer and, per corpus and split (`splits[i]
    [split]`: its token count, document starts and, for conversations, trained token ranges),
    the token count, every document's start and every trained range. Checkpoints keep it, so a
    resumed run compares it bit for bit: never change it for text (no trained ranges)."""
    h = hashlib.sha256(model_proto)
    for part in splits:
        for name in SPLITS:
            n_tokens, starts, trained = part[name]
            h.update(f"{name}:{n_tokens}:".encode())
            h.update(np.ascontiguousarray(starts, np.int64).tobytes())
            if trained is not None:
                h.update(b"trained:" + np.ascontiguousarray(trained, np.int64).tobytes())
    return h.hexdigest()[:20]
