"""Corpora as streams of (split, text) documents, split into train and validation by a hash.

`stdlib`: the running Python's standard library `.py` files (tests and idlelib left out), the
embedded default corpus every machine has. `files`: text files (a file, a folder or a glob),
one document each. `jsonl`: one document per line, the text in `field`. `parquet`: one
document per row, the text in column `field`. `tfds`: see tfds_source.py.

Conversations (documents that are lists of messages, see messages.py): `chat` reads JSON
Lines or Parquet files, one conversation a row in `field` (`messages` unless set); `stdlib_chat`
makes questions about the standard library's documented functions from its files
(stdlib_chat.py), keyed by the function's qualified name, so a held-out function is never seen
in training.

A document goes to validation when the hash of its key (a file's relative path, or
"path:line" / "path:row") falls below `validation_percent`, so the split is the same on every
machine with the same files. Text files too few for a fair split by file (fewer than
100 / validation_percent) give their last lines to validation instead. Folders skip names
starting with "." or "_". Bytes that are not UTF-8 become U+FFFD (documented replacement).
A text file is read whole: split a huge one into several, or use JSONL/Parquet.

`data.path` may be on a bucket (`gs://...`, see files.py): the same files give the same
documents in the same order and the same split as in a local folder. Objects are streamed
(JSONL line by line, Parquet through a seekable file object), not copied to disk first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import pathlib
import sys
from collections.abc import Iterator

from lmjax import storage
from lmjax.config import Source, UserError
from lmjax.data import messages, stdlib_chat, tfds_source
from lmjax.data.files import CorpusPath, root_name, split_of, stamp, stamped_user_files, stdlib_files

Content = str | list[dict[str, str]]  # a text, or a conversation (chat sources: messages.Message)
Document = tuple[str, Content]  # (split, content), split in ("train", "validation")
CHAT_SOURCES = ("chat", "stdlib_chat")


_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "chat": (".jsonl", ".json", ".parquet")}


def is_chat(c: Source) -> bool:
    return c.source in CHAT_SOURCES


def text_of(content: Content) -> str:
    """A document's text: a conversation's contents, a line each (what a tokenizer trains on)."""
    return content if isinstance(content, str) else "\n".join(m["content"] for m in content)


def _stamped_files(c: Source) -> tuple[CorpusPath, list[tuple[CorpusPath, str]]]:
    if c.source in ("stdlib", "stdlib_chat"):
        root, paths = stdlib_files()
        return root, [(p, stamp(p)) for p in paths]
    root, stamped = stamped_user_files(c.path, _SUFFIXES.get(c.source, ()))
    if not stamped:
        kind = "text" if c.source == "files" else c.source
        raise UserError(f"{describe(c)} matches no files; point data.path at existing {kind} files")
    return root, stamped


def describe(c: Source) -> str:
    return {
        "stdlib": "the stdlib corpus",
        "stdlib_chat": "the stdlib conversations",
        "tfds": f"tfds {c.name or c.path}",
    }.get(c.source, f"{c.source} {c.path}")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """What one worker reads of a corpus, in corpus order: one input file (`path`, a local path
    or a URL; `key` its name relative to the corpus root, which document keys start with;
    `size` in bytes), or a whole TFDS dataset (path and key ""). `by_lines`: a text file of a
    corpus with too few files for a fair hash split, which gives its last lines to validation."""

    path: str
    key: str
    size: int
    by_lines: bool = False


def chunks(c: Source, validation_percent: float) -> list[Chunk]:
    """The corpus `c` as chunks: documents(c) is their documents one chunk after another."""
    if c.source == "tfds":
        return [Chunk("", "", 0)]
    root, stamped = _stamped_files(c)
    keyed = [(str(p), _relative(p, root), int(file_stamp.split("|")[0])) for p, file_stamp in stamped]
    by_lines = False
    if c.source in ("stdlib", "files"):
        splits = {split_of(key, validation_percent) for _, key, _ in keyed}
        by_lines = len(keyed) < 100 / validation_percent or len(splits) == 1
    return [Chunk(path, key, size, by_lines) for path, key, size in keyed]


def documents(c: Source, validation_percent: float) -> Iterator[Document]:
    """The corpus `c` as (split, text) pairs, in a stable order; empty documents are skipped."""
    return itertools.chain.from_iterable(
        chunk_documents(c, chunk, validation_percent) for chunk in chunks(c, validation_percent)
    )


def chunk_documents(c: Source, chunk: Chunk, validation_percent: float) -> Iterator[Document]:
    """The documents of one chunk of `c`, in order; empty documents are skipped."""
    if c.source == "tfds":
        stream = tfds_source.documents(c.name, c.path, c.field, validation_percent)
    else:
        read = {
            "stdlib": _text_file,
            "files": _text_file,
            "jsonl": _jsonl,
            "parquet": _parquet,
            "chat": _chat,
            "stdlib_chat": _stdlib_chat,
        }[c.source]
        stream = read(c, chunk, validation_percent)
    return (doc for doc in stream if doc[1])


def _open(chunk: Chunk) -> CorpusPath:
    return storage.path(chunk.path) if storage.is_bucket(chunk.path) else pathlib.Path(chunk.path)


def fingerprint(c: Source) -> str:
    """Identifies a corpus's content cheaply: its reader, file names (from the root), sizes
    and mtimes (generations on a bucket, from one listing)."""
    h = hashlib.sha256(f"{c.source}|{c.field}|{sys.version_info[:2]}".encode())
    if c.source == "tfds":
        h.update(tfds_source.fingerprint(c.name, c.path, c.field).encode())
        return h.hexdigest()[:16]
    root, stamped = _stamped_files(c)
    h.update(root_name(root).encode())
    for p, file_stamp in stamped:
        h.update(f"{_relative(p, root)}|{file_stamp}".encode())
    return h.hexdigest()[:16]


def _relative(path: CorpusPath, root: CorpusPath) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()


def _text_file(c: Source, chunk: Chunk, percent: float) -> Iterator[Document]:
    """One document per file; with too few files for a fair hash split (`chunk.by_lines`), the
    file gives its last `percent` of lines to validation instead."""
    text = _open(chunk).read_bytes().decode("utf-8", errors="replace")
    if chunk.by_lines and "\n" in text.rstrip("\n"):  # a one-line file keeps its hash split
        yield from _split_by_lines(text, percent)
    else:
        yield split_of(chunk.key, percent), text


def _split_by_lines(text: str, percent: float) -> Iterator[Document]:
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, round(len(lines) * percent / 100)) if len(lines) > 1 else len(lines)
    yield "train", "".join(lines[:cut])
    yield "validation", "".join(lines[cut:])


def _as_text(value: object, where: str, field: str) -> str:
    """A field's value as text: None is an empty document, anything but text an error."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise UserError(
            f"{where}: {field!r} holds {type(value).__name__}, not text; set data.field to a text field"
        )
    return value


def _jsonl(c: Source, chunk: Chunk, percent: float) -> Iterator[Document]:
    for key, where, value in _jsonl_values(chunk, c.field):
        yield split_of(key, percent), _as_text(value, where, c.field)


def _jsonl_values(chunk: Chunk, field: str) -> Iterator[tuple[str, str, object]]:
    """(document key, where it is for errors, the value of `field`) for each line of a JSONL file."""
    path, rel = _open(chunk), chunk.key
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8", errors="replace"))
            except ValueError:
                raise UserError(f"{path}:{number} is not a JSON object; give JSON Lines files") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else []
                raise UserError(f"{path}:{number} has no field {field!r}; set data.field to one of {keys}")
            yield f"{rel}:{number}", f"{path}:{number}", record[field]


def _parquet(c: Source, chunk: Chunk, percent: float) -> Iterator[Document]:
    for key, where, value in _parquet_values(chunk, c.field, "parquet"):
        yield split_of(key, percent), _as_text(value, where, c.field)


def _parquet_values(chunk: Chunk, field: str, source: str) -> Iterator[tuple[str, str, object]]:
    """(document key, where it is for errors, the value of column `field`) for each row."""
    try:  # optional: lmjax[parquet]
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"data.source={source} needs pyarrow: pip install 'lmjax[parquet]'") from None
    path, rel = _open(chunk), chunk.key
    # pyarrow reads a local file by name, an object through a (seekable) file object
    with path.open("rb") if storage.is_bucket(path) else contextlib.nullcontext(path) as file:
        try:
            table = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise UserError(
                f"{path} is not a readable Parquet file ({type(e).__name__}); fix or remove it"
            ) from None
        columns = table.schema_arrow.names
        if field not in columns:
            raise UserError(f"{path} has no column {field!r}; set data.field to one of {columns}")
        rows = itertools.count()
        for batch in table.iter_batches(columns=[field], batch_size=4096):
            for value in batch.column(0).to_pylist():
                row = next(rows)
                yield f"{rel}:{row}", f"{path} row {row}", value


def _chat(c: Source, chunk: Chunk, percent: float) -> Iterator[Document]:
    """Conversations, one a row of a JSONL or Parquet file, in `field` ("text": "messages")."""
    field = "messages" if c.field == "text" else c.field
    if chunk.key.endswith(".parquet"):
        rows = _parquet_values(chunk, field, "chat")
    else:
        rows = _jsonl_values(chunk, field)
    for key, where, value in rows:
        yield split_of(key, percent), messages.check(value, where)


def _stdlib_chat(c: Source, chunk: Chunk, percent: float) -> Iterator[Document]:
    """Questions about the documented names of one stdlib file (stdlib_chat.py), keyed by name."""
    text = _open(chunk).read_bytes().decode("utf-8", errors="replace")
    for key, conversation in stdlib_chat.conversations(text, stdlib_chat.module_name(chunk.key)):
        yield split_of(key, percent), conversation
