"""Data pipeline speed on this host: tokenizing into the cache, and the loader reading from it.

    python benchmarks/data_throughput.py [--experiment gpt2_124m] [--set key=value ...]

Measures, on the experiment's data settings (default: the GPT-2 124M experiment's 32768-piece
tokenizer over the stdlib corpus):
- tokenizer training time on the bounded sample;
- batch encoding alone (`Tokenizer.encode_batch`, each distinct segment encoded once, from a
  fresh tokenizer each time), 1 sentencepiece thread and all threads (MB of UTF-8 per second);
- a whole in-process cache build (read, split, encode, write ArrayRecord shards) from the stdlib
  files, and from the same documents as one Parquet file and as one JSONL file, with the
  tokenizer given (MB/s);
- the training loader (shuffle, pack, batch, prefetch thread) in tokens/s for several
  (seq_len, batch) shapes, and for a two-corpus mixture.
Writes `benchmarks/results/data_throughput-<machine>.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from versions import package_versions

from lmjax import config
from lmjax.config import Source
from lmjax.data import cache, sources, tokenizer

RESULTS = Path(__file__).parent / "results"
LOADER_SHAPES = ((1024, 32), (2048, 16), (256, 128))
REPEATS = 3  # encoding and builds: the best of this many (a 2-core machine is noisy)


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def loader_tokens_per_s(
    splits: list, weights: list[float], seq_len: int, batch: int, seconds: float = 3.0
) -> float:
    # grain imports JAX, which makes a cache build encode on threads instead of forked processes
    # (cache_build.py): imported only once the builds, timed as `lmjax.data prepare` runs them, are done
    from lmjax.data import loader

    batches = loader.TrainBatches(splits, weights, seq_len, batch, seed=0)
    next(batches)  # start the prefetch thread
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(batches)["inputs"].size
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="gpt2_124m")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    data = config.apply_overrides(config.load_experiment(args.experiment), args.set).data
    with tempfile.TemporaryDirectory(prefix="lmjax-data-bench-") as work:
        record = measure(args, data, Path(work))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"data_throughput-{platform.machine()}-{os.cpu_count()}cpu.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def measure(args: argparse.Namespace, data: config.Data, work: Path) -> dict:
    import pyarrow as pa  # optional (lmjax[parquet]): only this benchmark's Parquet build needs it
    import pyarrow.parquet as pq

    docs = [text for _, text in sources.documents(Source("stdlib"), data.validation_percent)]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    sample = tokenizer.sample(data)
    tok, train_s = timed(tokenizer.train, sample, data)
    tok.save(work / "tokenizer.model")
    encode = {}
    for threads in (1, os.cpu_count()):
        # a fresh tokenizer each time: one that encoded the corpus before knows all its segments
        seconds = min(
            timed(tokenizer.Tokenizer(tok.model_proto).encode_batch, docs, threads)[1] for _ in range(REPEATS)
        )
        encode[f"{threads}_threads_mb_per_s"] = mb / seconds

    pq.write_table(pa.table({"text": docs}), work / "stdlib.parquet")
    with (work / "stdlib.jsonl").open("w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    given = {"tokenizer_path": str(work / "tokenizer.model"), "cache_dir": f"{work}/c0"}
    builds = {}
    for name, source in (
        ("stdlib_files", Source("stdlib")),
        ("parquet", Source("parquet", str(work / "stdlib.parquet"))),
        ("jsonl", Source("jsonl", str(work / "stdlib.jsonl"))),
    ):
        seconds = float("inf")
        for k in range(REPEATS):  # each into a fresh cache folder: a real build every time
            cfg = config.Data(source=source.source, path=source.path, **given | {"cache_dir": f"{work}/c{k}"})
            corpus, t = timed(cache.load_or_build, cfg, lambda m: None, False)
            seconds = min(seconds, t)
        builds[name] = {
            "mb_per_s": mb / seconds,
            "seconds": seconds,
            "tokens": len(corpus.splits("train")[0]),
        }

    corpus = cache.load_or_build(config.Data(source="stdlib", **given), lambda m: None, False)
    parquet = cache.load_or_build(
        config.Data(source="parquet", path=str(work / "stdlib.parquet"), **given), lambda m: None, False
    )
    loading = {
        f"seq{t}_batch{b}": loader_tokens_per_s(corpus.splits("train"), [1.0], t, b) for t, b in LOADER_SHAPES
    }
    two = corpus.splits("train") + parquet.splits("train")
    loading["mixture_seq1024_batch32"] = loader_tokens_per_s(two, [0.7, 0.3], 1024, 32)

    return {
        "benchmark": "data_throughput",
        "date": datetime.date.today().isoformat(),
        "device": {
            "host_cpus": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "versions": package_versions(("grain", "array_record", "sentencepiece", "numpy", "pyarrow"))
        | {"python": platform.python_version()},
        "config": {"experiment": args.experiment, "overrides": args.set, "vocab_size": tok.vocab_size},
        "corpus": {
            "documents": len(docs),
            "utf8_mb": mb,
            "bytes_per_token": mb * 1e6 / builds["stdlib_files"]["tokens"],
        },
        "tokenizer_training_s": train_s,
        "tokenizer_sample_mb": sum(len(s.encode()) for s in sample) / 1e6,
        "encode": encode,
        "cache_build": builds,
        "loader_tokens_per_s": loading,
    }


if __name__ == "__main__":
    sys.exit(main())
