"""Building a cache entry in a local folder: the tokenizer is trained (or loaded), every corpus
tokenized into shards and document starts, and meta.json written with each file's record
(cache_meta.py), all in a temporary folder that is locked while its build runs and renamed into
place when complete; a build removes any temporary folder whose lock is free."""

from __future__ import annotations

import collections
import fcntl
import functools
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmjax.config import Data, Source, UserError
from lmjax.data import chat_jinja, encode, shards, sources, tokenizer
from lmjax.data.cache_meta import FORMAT, SPLITS, entry_files, file_record, summarize, trained_name

_GROUP_BYTES = 1 << 20  # input files encoded together up to this size


def build(cfg: Data, entry: Path, log: Callable[[str], None], progress: bool) -> None:
    start = time.time()
    tok = make_tokenizer(cfg)

    def write(tmp: Path) -> None:
        meta = _write_parts(cfg, tok, tmp, progress)
        starts = [
            {s: np.load(tmp / f"c{i}/{s}-starts.npy") for s in SPLITS} for i in range(len(meta["parts"]))
        ]
        trained = [
            {
                s: np.load(tmp / f"c{i}/{trained_name(s)}") if "trained_tokens" in part[s] else None
                for s in SPLITS
            }
            for i, part in enumerate(meta["parts"])
        ]
        summarize(meta, tok.model_proto, starts, trained)  # what start-up would work out from every start
        meta["files"] = {n: file_record(tmp / n) for n in entry_files(meta)}
        meta["build"]["seconds"] = round(time.time() - start, 2)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")

    if in_temporary_folder(entry, str(os.getpid()), write, log):
        log_done(json.loads((entry / "meta.json").read_text()), log)


def make_tokenizer(cfg: Data) -> tokenizer.Tokenizer:
    """The entry's tokenizer: `data.tokenizer_path`'s, or one trained on the corpus's sample."""
    if cfg.tokenizer_path:
        return tokenizer.Tokenizer.load(cfg.tokenizer_path)
    return tokenizer.train(tokenizer.sample(cfg), cfg)


def new_meta(dtype: np.dtype, block_tokens: int, shard_blocks: int, parts: list[dict], chars: int) -> dict:
    """An entry's meta.json before its summary and file records: the token dtype, the shards'
    geometry (readers count each shard's blocks from it), each corpus's splits, the text read."""
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "block_tokens": block_tokens,
        "shard_blocks": shard_blocks,
        "parts": parts,
        "build": {"chars": chars},
    }


def empty_split_error(c: Source, split: str) -> UserError:
    return UserError(
        f"{sources.describe(c)} has no {split} text; give more documents"
        + (" or raise data.validation_percent" if split == "validation" else "")
    )


def in_temporary_folder(
    entry: Path, tag: str, write: Callable[[Path], None], log: Callable[[str], None]
) -> bool:
    """Run `write` into a new temporary folder beside `entry`, locked while it runs, then rename
    it onto `entry`: False (and the folder deleted) when another process placed it first, whose
    entry is as good. The folder is deleted when `write` fails; abandoned folders of killed
    builds are deleted first."""
    tmp = entry.with_name(f".{entry.name}.{tag}.{time.time_ns()}.tmp")
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(
            f"cannot write the token cache in {tmp.parent} ({e.strerror}); set data.cache_dir"
        ) from None
    with (tmp / ".lock").open("w") as lock:
        # held while this build runs (see remove_abandoned_builds); a POSIX lock belongs to this
        # process alone, so the encoding processes it forks do not hold it on after it is killed
        fcntl.lockf(lock, fcntl.LOCK_EX)
        remove_abandoned_builds(entry.parent, f".{entry.name}.*.tmp", keep=tmp)
        try:
            write(tmp)
            tmp.rename(entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(sys.exc_info()[1], OSError) and (entry / "meta.json").exists():
                log(f"another process built {entry} first; using it")
                return False
            raise
    return True


def log_done(meta: dict, log: Callable[[str], None]) -> None:
    log(f"tokenized {meta['build']['chars'] / 1e6:.1f}M characters in {meta['build']['seconds']:.1f}s")


def remove_abandoned_builds(folder: Path, pattern: str, keep: Path | None = None) -> None:
    """Delete the temporary build folders `pattern` in `folder` that no running process holds
    locked (a killed build's lock is released by the kernel), but `keep`, this process's own."""
    for tmp in folder.glob(pattern):
        try:
            if tmp == keep:  # this process's own lock would not stop it
                continue
            with (tmp / ".lock").open("r+") as lock:  # none yet: a build that is just starting
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # locked: a build in progress (or already gone)
            continue


def _write_parts(cfg: Data, tok: tokenizer.Tokenizer, folder: Path, progress: bool) -> dict:
    """Tokenize every corpus of `cfg` into `folder`; returns the entry's meta.json content."""
    (folder / "tokenizer.model").write_bytes(tok.model_proto)
    dtype = encode.dtype_for(tok.vocab_size)
    jinja = chat_jinja.read_source(cfg.chat_template)
    parts, chars = [], 0
    with tqdm(desc="tokenizing", unit="char", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        for i, c in enumerate(cfg.components()):
            (folder / f"c{i}").mkdir()
            writers = {s: shards.StreamWriter(folder / f"c{i}", s, dtype, sources.is_chat(c)) for s in SPLITS}
            for streams in _encoded_chunks(c, tok, cfg.validation_percent, jinja):
                for s in SPLITS:
                    writers[s].add(streams[s])
                    chars += streams[s].chars
                    bar.update(streams[s].chars)
            parts.append({s: w.close() for s, w in writers.items()})
            for s in SPLITS:
                if parts[-1][s]["tokens"] == 0:
                    raise empty_split_error(c, s)
    return new_meta(dtype, shards.BLOCK_TOKENS, shards.SHARD_BLOCKS, parts, chars)


def _encoded_chunks(
    c: Source, tok: tokenizer.Tokenizer, validation_percent: float, jinja_template: str
) -> Iterator[dict[str, encode.Stream]]:
    """Each chunk of `c` encoded (encode.py), in order. Small chunks are encoded in groups
    (fewer, larger sentencepiece batches), a few groups ahead of the one being written: on
    a pool of processes, one a core (reading, cutting text and framing are Python, which
    threads would run on one core at a time), or where JAX runs in this process (a forked
    child of its threads may deadlock, and spawning would import the user's __main__ again)
    on two threads, one's Python work running while the other's sentencepiece call does."""
    groups = list(_groups(sources.chunks(c, validation_percent)))
    workers = min(os.cpu_count() or 1, len(groups))
    if "jax" in sys.modules or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        pool: Executor = ThreadPoolExecutor(2)
        encode_group = functools.partial(_encode_group_with, tok)
    else:
        context = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(
            workers, context, initializer=_load_tokenizer, initargs=(tok.model_proto, os.getpid())
        )
        encode_group = _encode_group
    with pool:
        encoding: collections.deque[Future] = collections.deque()
        for group in groups:
            if len(encoding) == 2 * workers:
                yield from encoding.popleft().result()
            encoding.append(pool.submit(encode_group, c, group, validation_percent, jinja_template))
        while encoding:
            yield from encoding.popleft().result()


_worker_tokenizer: tokenizer.Tokenizer | None = None  # in a pool's process: the build's tokenizer


def _load_tokenizer(model_proto: bytes, parent: int) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer.Tokenizer(model_proto)
    # A build killed outright leaves its pool behind: each worker holds the task queue's pipe
    # open for the others, so none sees it close. Each leaves once its parent is gone.
    threading.Thread(target=_exit_without, args=(parent,), daemon=True).start()


def _exit_without(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode_group(
    c: Source, group: list[sources.Chunk], validation_percent: float, jinja_template: str
) -> list[dict]:
    assert _worker_tokenizer is not None, "the pool's initializer loads the tokenizer"
    return encode.encode_chunks(c, group, _worker_tokenizer, validation_percent, jinja_template)


def _encode_group_with(
    tok: tokenizer.Tokenizer,
    c: Source,
    group: list[sources.Chunk],
    validation_percent: float,
    jinja_template: str,
) -> list[dict]:
    return encode.encode_chunks(c, group, tok, validation_percent, jinja_template)


def _groups(chunks: list[sources.Chunk]) -> Iterator[list[sources.Chunk]]:
    """Consecutive chunks in groups of about `_GROUP_BYTES` (a larger chunk alone)."""
    group, size = [], 0
    for chunk in chunks:
        if group and size + chunk.size > _GROUP_BYTES:
            yield group
            group, size = [], 0
        group.append(chunk)
        size += chunk.size
    if group:
        yield group
