"""A token cache entry built by an Apache Beam pipeline: the same files as the in-process build
(cache_build.py), on any Beam runner (the DirectRunner's processes on one machine, Dataflow,
Flink or Spark for a corpus of terabytes). `python -m lmjax.data prepare --runner ...` runs it.

The stages, each a Beam transform (docs/data-at-scale.md says it for users):
- tokenizer: one worker loads `data.tokenizer_path` or trains on `tokenizer.sample`, exactly as
  the in-process build, and writes tokenizer.model; its bytes reach the others as a side input.
- encode: one element per chunk (an input file, sources.py), listed here at construction; a
  worker reads only its chunk and encodes it (encode.py). Counters of input bytes, in all and
  per worker process, show what each worker read.
- layout: per corpus and split, each chunk's token offset (the prefix sums of the token counts
  in chunk order) and the totals: a side input.
- shards: each chunk's tokens cut by the global shard ranges (`BLOCK_TOKENS * SHARD_BLOCKS`
  tokens a shard), grouped by shard, and each shard written once, pieces in offset order, in
  blocks of `BLOCK_TOKENS` with the writer's options: byte for byte the in-process shard.
- starts: per corpus and split, the chunks' document starts shifted by their offsets, in order.
- meta.json last, once every file is written: the in-process build's content, with each file's
  record and the start-up summary (cache_meta.py), and the runner's name.

A worker writes each file to a local temporary file, records it there and puts it into the
output folder, so a retried bundle rewrites the same bytes. The output is a temporary folder
beside a local entry, renamed into place when the pipeline succeeds, or on a bucket the upload
`CACHE/<key>/<build id>/`, published by the conditional create of meta.json (cache_bucket.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

from lmjax import storage
from lmjax.config import Data, Source, UserError
from lmjax.data import cache, encode, shards, sources, tokenizer
from lmjax.data.cache_bucket import create_meta
from lmjax.data.cache_build import empty_split_error, in_temporary_folder, log_done, make_tokenizer, new_meta
from lmjax.data.cache_meta import SPLITS, entry_files, file_record, summarize

METRICS_NAMESPACE = "lmjax"
INPUT_BYTES = "input_bytes"  # of all workers; of one worker process: "input_bytes@<host>:<pid>"
CHUNKS_READ = "chunks_read"
REMOTE_RUNNERS = ("DataflowRunner",)  # workers on other machines: no local paths

ChunkKey = tuple[int, int]  # (corpus index, chunk index in corpus order)
SplitKey = tuple[int, str]  # (corpus index, split)


@dataclasses.dataclass(frozen=True)
class Built:
    """What a Beam build made: the entry, and the input bytes each worker process read."""

    entry: cache.CachePath
    worker_bytes: dict[str, int]
    input_bytes: int
    chunks_read: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """Per corpus and split: each chunk's token offset, and the totals of the split."""

    offsets: dict[SplitKey, dict[int, int]]
    totals: dict[SplitKey, dict[str, int]]  # tokens, documents, bytes
    chars: int


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shard layout, read from shards.py when the pipeline is made (not on the workers)."""

    block_tokens: int
    shard_blocks: int

    @property
    def shard_tokens(self) -> int:
        return self.block_tokens * self.shard_blocks

    def shard_names(self, split: str, tokens: int) -> list[str]:
        blocks = -(-tokens // self.block_tokens)
        return [shards.shard_name(split, k) for k in range(-(-blocks // self.shard_blocks))]


def pipeline_options(flags: list[str]) -> PipelineOptions:
    """Beam's options from `flags`; UserError for a flag Beam does not know or a bad value."""
    options = PipelineOptions(flags)
    err = io.StringIO()
    quiet = logging.getLogger("apache_beam.options.pipeline_options")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the unknown flags are named below, once
    try:
        with contextlib.redirect_stderr(err):
            known = options.get_all_options()
            given = options.get_all_options(retain_unknown_options=True)
    except SystemExit:  # argparse: a value of the wrong type or choice
        lines = err.getvalue().strip().splitlines() or ["a bad option"]
        raise UserError(f"bad Beam pipeline option: {lines[-1].split('error: ')[-1]}") from None
    finally:
        quiet.setLevel(level)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UserError(
            f"--{unknown[0]} is neither an option of `prepare` nor a Beam pipeline option; check its spelling"
        )
    return options


def run(cfg: Data, beam_flags: list[str], log: Callable[[str], None]) -> Built:
    """Build the token cache entry of `cfg` with a Beam pipeline run with `beam_flags`; an entry
    that exists and opens is reused. Returns the entry and what each worker read."""
    if any(sources.is_chat(c) for c in cfg.components()):
        raise UserError(
            "the Beam pipeline prepares text corpora; build a chat corpus in-process: drop --runner"
        )
    options = pipeline_options(beam_flags)
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    pipeline = _new_pipeline(options, runner)
    entry = cache.entry_path(cfg)
    _check_paths(cfg, entry, runner)
    if cache.exists_whole(cfg, log):
        log(f"the token cache entry {entry} exists; using it")
        return Built(entry, {}, 0, 0)
    log(f"tokenizing {cfg.source} corpus into {entry} with Beam ({runner})")
    start = time.time()
    if storage.is_bucket(entry):
        result = _build_on_bucket(pipeline, cfg, entry, runner, start, log)
    else:
        result = _build_local(pipeline, cfg, entry, runner, start, log)
    return Built(entry, *_read_counters(result))


def _check_paths(cfg: Data, entry: cache.CachePath, runner: str) -> None:
    if runner not in REMOTE_RUNNERS:
        return
    local = [c.path or c.source for c in cfg.components() if not storage.is_bucket(c.path)]
    if local or not storage.is_bucket(entry):
        raise UserError(
            f"the {runner} reads the corpus and writes the cache on other machines: set data.path "
            f"(not {(local or [str(entry)])[0]}) and data.cache_dir to gs:// paths"
        )


def _build_local(
    pipeline: beam.Pipeline, cfg: Data, entry: Path, runner: str, start: float, log: Callable[[str], None]
) -> PipelineResult:
    """Run the pipeline into a temporary folder beside `entry`, renamed onto it on success."""
    results = []
    tag = f"beam-{socket.gethostname()}-{os.getpid()}"
    if in_temporary_folder(
        entry, tag, lambda tmp: results.append(_run_pipeline(pipeline, cfg, str(tmp), runner, start)), log
    ):
        log_done(json.loads((entry / "meta.json").read_text()), log)
    return results[0]


def _build_on_bucket(
    pipeline: beam.Pipeline,
    cfg: Data,
    entry: storage.Path,
    runner: str,
    start: float,
    log: Callable[[str], None],
) -> PipelineResult:
    """Run the pipeline into the upload `entry/<build id>/`, then publish it as cache_bucket does."""
    storage.check_writable(entry.parent, "the token cache")  # before the tokenizing, not after
    build_id = f"beam-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    upload = entry / build_id
    fs = storage.filesystem(entry)
    try:
        result = _run_pipeline(pipeline, cfg, str(upload), runner, start)
        meta = json.loads((upload / "meta.json").read_text())
        fs.rm(storage.object_name(upload / "meta.json"))  # readers find it at entry/meta.json
        won = create_meta(entry, build_id, meta, {n: r["size"] for n, r in meta["files"].items()})
    except BaseException:
        with contextlib.suppress(OSError):
            fs.rm(storage.object_name(upload), recursive=True)
        raise
    if won:
        log_done(meta, log)
    else:
        log(f"another process built {entry} first; using it")  # theirs is as good
    return result


def _new_pipeline(options: PipelineOptions, runner: str) -> beam.Pipeline:
    try:
        return beam.Pipeline(options=options)
    except ValueError as e:  # Beam's words for an unknown runner
        raise UserError(
            f"--runner {runner} is not a Beam runner ({str(e).split('.')[0]}); use e.g. DirectRunner "
            "or DataflowRunner"
        ) from None
    except ImportError as e:  # a runner whose extra is not installed, e.g. apache-beam[gcp]
        raise UserError(f"--runner {runner} is not available here: {' '.join(str(e).split())}") from None


def _run_pipeline(pipeline: beam.Pipeline, cfg: Data, out: str, runner: str, start: float) -> PipelineResult:
    """Add the stages writing the entry's files into `out` and run them; a UserError raised on a
    worker comes back as a UserError (its one line), whatever the runner wraps it in."""
    geometry = Geometry(shards.BLOCK_TOKENS, shards.SHARD_BLOCKS)
    _add_stages(pipeline, cfg, out, geometry, runner, start)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except UserError as e:
        raise UserError(_without_step(str(e))) from None
    except Exception as e:
        if found := re.findall(r"lmjax\.config\.UserError: (.+)", str(e)):
            raise UserError(_without_step(found[-1])) from None
        raise
    return result


def _without_step(message: str) -> str:
    return re.sub(r" \[while running '[^']*'\]", "", message).strip()


def _add_stages(
    pipeline: beam.Pipeline, cfg: Data, out: str, geometry: Geometry, runner: str, start: float
) -> None:
    components = cfg.components()
    chunk_items = [
        (i, k, chunk)
        for i, c in enumerate(components)
        for k, chunk in enumerate(sources.chunks(c, cfg.validation_percent))
    ]
    model = pipeline | "tokenizer seed" >> beam.Create([0]) | "tokenizer" >> beam.Map(_tokenizer_model, cfg)
    model_side = beam.pvalue.AsSingleton(model)
    encoded = (
        pipeline
        | "chunks" >> beam.Create(chunk_items)
        | "spread chunks" >> beam.Reshuffle()
        | "encode" >> beam.ParDo(EncodeChunk(components, cfg.validation_percent), model_side)
    )
    layout = (
        encoded
        | "sizes" >> beam.FlatMap(_sizes)
        | "all sizes" >> beam.combiners.ToList()
        | "layout" >> beam.Map(_layout)
    )
    layout_side = beam.pvalue.AsSingleton(layout)
    shard_records = (
        encoded
        | "cut into shards" >> beam.ParDo(CutIntoShards(geometry), layout_side)
        | "group by shard" >> beam.GroupByKey()
        | "write shards" >> beam.ParDo(WriteShard(out, geometry))
    )
    starts_records = (
        encoded
        | "starts of chunks" >> beam.FlatMap(_chunk_starts)
        | "group starts" >> beam.GroupByKey()
        | "write starts" >> beam.ParDo(WriteStarts(out), layout_side)
    )
    tokenizer_record = model | "write tokenizer" >> beam.Map(_write_tokenizer, out)
    records = (tokenizer_record, shard_records, starts_records) | "all files" >> beam.Flatten()
    _ = (
        pipeline
        | "meta seed" >> beam.Create([0])
        | "write meta.json"
        >> beam.ParDo(
            WriteMeta(out, components, geometry, runner, start),
            beam.pvalue.AsSingleton(model),
            layout_side,
            beam.pvalue.AsList(records),
        )
    )


def _tokenizer_model(_: int, cfg: Data) -> bytes:
    return make_tokenizer(cfg).model_proto


class EncodeChunk(beam.DoFn):
    """One chunk read and encoded: ((corpus, chunk index), {split: Stream})."""

    def __init__(self, components: tuple[Source, ...], validation_percent: float):
        self.components, self.validation_percent = components, validation_percent
        self._tok: tokenizer.Tokenizer | None = None
        self._worker = ""

    def setup(self) -> None:
        self._worker = f"{socket.gethostname()}:{os.getpid()}"  # the process this copy runs in

    def process(
        self, item: tuple[int, int, sources.Chunk], model: bytes
    ) -> Iterator[tuple[ChunkKey, dict[str, encode.Stream]]]:
        i, k, chunk = item
        if self._tok is None or self._tok.model_proto != model:
            self._tok = tokenizer.Tokenizer(model)
        streams = encode.encode_chunk(self.components[i], chunk, self._tok, self.validation_percent)
        Metrics.counter(METRICS_NAMESPACE, INPUT_BYTES).inc(chunk.size)
        Metrics.counter(METRICS_NAMESPACE, f"{INPUT_BYTES}@{self._worker}").inc(chunk.size)
        Metrics.counter(METRICS_NAMESPACE, CHUNKS_READ).inc()
        yield (i, k), streams


def _sizes(item: tuple[ChunkKey, dict[str, encode.Stream]]) -> Iterator[tuple[int, str, int, dict[str, int]]]:
    """(corpus, split, chunk index, sizes) of each split of an encoded chunk."""
    (i, k), streams = item
    for split, s in streams.items():
        size = {"tokens": len(s.tokens), "documents": len(s.starts), "bytes": s.bytes, "chars": s.chars}
        yield i, split, k, size


def _layout(sizes: list[tuple[int, str, int, dict[str, int]]]) -> Layout:
    offsets: dict[SplitKey, dict[int, int]] = {}
    totals: dict[SplitKey, dict[str, int]] = {}
    chars = 0
    for i, split, k, size in sorted(sizes, key=lambda s: (s[0], s[1], s[2])):
        total = totals.setdefault((i, split), {"tokens": 0, "documents": 0, "bytes": 0})
        offsets.setdefault((i, split), {})[k] = total["tokens"]
        for name in total:
            total[name] += size[name]
        chars += size["chars"]
    return Layout(offsets, totals, chars)


class CutIntoShards(beam.DoFn):
    """A chunk's tokens per split cut by the global shard ranges: ((corpus, split, shard),
    (global offset, tokens)) for each shard the chunk's tokens reach into."""

    def __init__(self, geometry: Geometry):
        self.geometry = geometry

    def process(
        self, item: tuple[ChunkKey, dict[str, encode.Stream]], layout: Layout
    ) -> Iterator[tuple[tuple[int, str, int], tuple[int, np.ndarray]]]:
        (i, k), streams = item
        size = self.geometry.shard_tokens
        for split, stream in streams.items():
            begin = layout.offsets[(i, split)][k]
            end = begin + len(stream.tokens)
            for shard in range(begin // size, -(-end // size)):
                lo, hi = max(begin, shard * size), min(end, (shard + 1) * size)
                yield (i, split, shard), (lo, stream.tokens[lo - begin : hi - begin])


class WriteShard(beam.DoFn):
    """One shard: its pieces in offset order, written in records of `block_tokens` (the last one
    short) as StreamWriter writes them; yields (name in the entry, file record)."""

    def __init__(self, out: str, geometry: Geometry):
        self.out, self.geometry = out, geometry

    def process(
        self, item: tuple[tuple[int, str, int], list[tuple[int, np.ndarray]]]
    ) -> Iterator[tuple[str, dict]]:
        (i, split, shard), pieces = item
        tokens = np.concatenate([p for _, p in sorted(pieces, key=lambda piece: piece[0])])
        name = f"c{i}/{shards.shard_name(split, shard)}"
        with _local_file(self.out, name) as path:
            shards.write_shard(path, tokens, self.geometry.block_tokens)
            record = file_record(path)
        yield name, record  # once the file is in place


def _chunk_starts(
    item: tuple[ChunkKey, dict[str, encode.Stream]],
) -> Iterator[tuple[SplitKey, tuple[int, np.ndarray]]]:
    (i, k), streams = item
    for split, stream in streams.items():
        yield (i, split), (k, stream.starts)


class WriteStarts(beam.DoFn):
    """A split's document starts: each chunk's shifted by its offset, in chunk order."""

    def __init__(self, out: str):
        self.out = out

    def process(
        self, item: tuple[SplitKey, list[tuple[int, np.ndarray]]], layout: Layout
    ) -> Iterator[tuple[str, dict]]:
        (i, split), chunk_starts = item
        offsets = layout.offsets[(i, split)]
        shifted = [starts + offsets[k] for k, starts in sorted(chunk_starts, key=lambda s: s[0])]
        starts = np.concatenate(shifted).astype(np.int64) if shifted else np.zeros(0, np.int64)
        name = f"c{i}/{split}-starts.npy"
        with _local_file(self.out, name) as path:
            np.save(path, starts)
            record = file_record(path)
        yield name, record  # once the file is in place


def _write_tokenizer(model: bytes, out: str) -> tuple[str, dict]:
    with _local_file(out, "tokenizer.model") as path:
        path.write_bytes(model)
        return "tokenizer.model", file_record(path)


class WriteMeta(beam.DoFn):
    """meta.json, once every other file is written: the in-process build's content, with each
    file's record and the start-up summary of the document starts (read back from the output,
    all of them, as the in-process build holds them); the in-process build's UserError for a
    corpus with an empty split."""

    def __init__(
        self, out: str, components: tuple[Source, ...], geometry: Geometry, runner: str, start: float
    ):
        self.out, self.components, self.geometry = out, components, geometry
        self.runner, self.start = runner, start

    def process(self, _: int, model: bytes, layout: Layout, records: list[tuple[str, dict]]) -> Iterator[str]:
        parts = []
        for i, c in enumerate(self.components):
            parts.append({})
            for split in SPLITS:
                total = layout.totals.get((i, split), {"tokens": 0, "documents": 0, "bytes": 0})
                if total["tokens"] == 0:
                    raise empty_split_error(c, split)
                parts[-1][split] = {**total, "shards": self.geometry.shard_names(split, total["tokens"])}
        dtype = encode.dtype_for(tokenizer.Tokenizer(model).vocab_size)
        g = self.geometry
        meta = new_meta(dtype, g.block_tokens, g.shard_blocks, parts, layout.chars)
        meta["build"]["runner"] = self.runner
        summarize(meta, model, [{s: self._starts(i, s) for s in SPLITS} for i in range(len(parts))])
        written = dict(records)
        meta["files"] = {n: written[n] for n in entry_files(meta)}
        meta["build"]["seconds"] = round(time.time() - self.start, 2)
        with _local_file(self.out, "meta.json") as path:
            path.write_text(json.dumps(meta, indent=1) + "\n")
        yield "meta.json"

    def _starts(self, i: int, split: str) -> np.ndarray:
        with storage.path(f"{self.out.rstrip('/')}/c{i}/{split}-starts.npy").open("rb") as f:
            return np.load(f)


@contextlib.contextmanager
def _local_file(out: str, name: str) -> Iterator[Path]:
    """A local temporary path to write the entry's file `name` to; put into the output folder
    `out` (local or on a bucket) when the block ends without error."""
    with tempfile.TemporaryDirectory(prefix="lmjax-beam-") as folder:
        path = Path(folder) / Path(name).name
        yield path
        _put(path, out, name)


def _put(path: Path, out: str, name: str) -> None:
    if storage.is_bucket(out):
        storage.filesystem(out).put_file(str(path), storage.object_name(f"{out.rstrip('/')}/{name}"))
        return
    target = Path(out) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)


def _read_counters(result: PipelineResult) -> tuple[dict[str, int], int, int]:
    """(input bytes per worker process, input bytes in all, chunks read) from Beam's counters."""
    counters = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    values: dict[str, int] = {}
    for counter in counters:
        value = counter.committed if counter.committed is not None else counter.attempted
        values[counter.key.metric.name] = values.get(counter.key.metric.name, 0) + (value or 0)
    prefix = f"{INPUT_BYTES}@"
    per_worker = {name.removeprefix(prefix): v for name, v in values.items() if name.startswith(prefix)}
    return per_worker, values.get(INPUT_BYTES, 0), values.get(CHUNKS_READ, 0)
