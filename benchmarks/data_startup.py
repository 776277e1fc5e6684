"""A host's start-up on the token cache as the corpus grows: what each host does before training.

    python benchmarks/data_startup.py [--scales 1 4 16] [--files 64] [--vocab-size 512] [--shard-blocks N]

Builds, with one small tokenizer, a cache entry of the stdlib documents repeated `scale` times
in `--files` JSON Lines files (as many files at every scale), then measures
start-up on each in a fresh process: seconds, and peak RSS above the RSS after imports, of
opening the entry (cache.load_or_build, with its checks of every file), Corpus.identity,
loader.max_segments at --seq-len, building TrainBatches and EvalBatches and reading the first
batch of each; then, for comparison, what an entry without meta.json's summaries costs (the
identity from every document start, max_segments over every window). Records each stage's
ratio of the largest scale to the smallest. `--shard-blocks` makes shards smaller, so that the
costs that grow with the number of shards show on a small corpus. Writes
`benchmarks/results/data_startup-<machine>-<cpus>cpu.json` (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stdlib_jsonl import repeated_corpus
from versions import package_versions

from lmjax import config
from lmjax.data import cache, loader, shards, tokenizer
from lmjax.data.cache_meta import SPLITS, corpus_identity

RESULTS = Path(__file__).parent / "results"
STARTUP = ("open", "identity", "max_segments", "train_batches", "train_first_batch")
STARTUP += ("eval_batches", "eval_first_batch")  # what a training host does, in order
STAGES = STARTUP + ("identity_from_starts", "max_segments_over_windows")  # and without the summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="copies of the stdlib")
    parser.add_argument("--files", type=int, default=64, help="JSON Lines files at every scale")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-blocks", type=int, default=shards.SHARD_BLOCKS, help="blocks a shard")
    parser.add_argument("--out", type=Path, help="the record's path (default: in benchmarks/results/)")
    parser.add_argument("--startup", help=argparse.SUPPRESS)  # a child process: the Data to open, as JSON
    args = parser.parse_args(argv)
    if args.startup:
        print(json.dumps(startup(config.Data(**json.loads(args.startup)), args.seq_len, args.batch_size)))
        return 0
    with tempfile.TemporaryDirectory(prefix="lmjax-startup-bench-") as work:
        record = measure(args, Path(work))
    out = args.out or RESULTS / f"data_startup-{platform.machine()}-{os.cpu_count()}cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def measure(args: argparse.Namespace, work: Path) -> dict:
    sample_cfg = config.Data(source="stdlib", vocab_size=args.vocab_size, tokenizer_sample_bytes=1_000_000)
    tokenizer.train(tokenizer.sample(sample_cfg), sample_cfg).save(work / "tokenizer.model")
    shards.SHARD_BLOCKS = args.shard_blocks  # the builds record it in meta.json; readers take it there
    scales = {}
    for scale in sorted(set(args.scales)):
        data = config.Data(
            source="jsonl",
            path=str(repeated_corpus(work / f"x{scale}", scale, args.files)),
            tokenizer_path=str(work / "tokenizer.model"),
            cache_dir=str(work / "cache"),
        )
        start = time.perf_counter()
        corpus = cache.load_or_build(data, log=lambda m: None, progress=False)
        build_s = time.perf_counter() - start
        scales[scale] = {
            "tokens": sum(len(s) for p in corpus.parts for s in p.values()),
            "documents": sum(len(s.starts) for p in corpus.parts for s in p.values()),
            "shards": sum(len(p[s]["shards"]) for p in corpus.meta["parts"] for s in SPLITS),
            "build_s": build_s,
            "startup": in_fresh_process(data, args),
        }
        scales[scale]["startup_s"] = sum(scales[scale]["startup"][stage]["seconds"] for stage in STARTUP)
    small, large = scales[min(scales)]["startup"], scales[max(scales)]["startup"]
    return {
        "benchmark": "data_startup",
        "date": datetime.date.today().isoformat(),
        "device": {
            "host_cpus": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "versions": package_versions(("grain", "array_record", "sentencepiece", "numpy"))
        | {"python": platform.python_version()},
        "config": {
            "scales": sorted(scales),
            "vocab_size": args.vocab_size,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "shard_blocks": args.shard_blocks,
            "input_files": args.files,
        },
        "scales": {str(k): v for k, v in scales.items()},
        f"startup_ratio_{max(scales)}x_to_{min(scales)}x": scales[max(scales)]["startup_s"]
        / scales[min(scales)]["startup_s"],
        f"ratio_{max(scales)}x_to_{min(scales)}x": {
            stage: {
                what: large[stage][what] / small[stage][what] if small[stage][what] else None
                for what in ("seconds", "peak_rss_mb")
            }
            for stage in STAGES
        },
    }


def in_fresh_process(data: config.Data, args: argparse.Namespace) -> dict:
    """`startup` run in a new Python process (nothing cached, RSS of its own)."""
    fields = {"source": data.source, "path": data.path, "tokenizer_path": data.tokenizer_path}
    argv = [sys.executable, __file__, "--startup", json.dumps(fields | {"cache_dir": data.cache_dir})]
    argv += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the start-up process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def startup(data: config.Data, seq_len: int, batch_size: int) -> dict:
    """Each stage of a host's start-up on the entry of `data`, in order: its seconds and the
    process's peak RSS above the RSS after imports, in MB."""
    reset_peak_rss()
    imported_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the RSS after imports
    stages: dict[str, dict] = {}

    def stage(name: str, fn: Callable[[], object]) -> object:
        start = time.perf_counter()
        out = fn()
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        stages[name] = {"seconds": time.perf_counter() - start, "peak_rss_mb": (peak_kb - imported_kb) / 1024}
        return out

    corpus = stage("open", lambda: cache.load_or_build(data, log=lambda m: None, progress=False))
    stage("identity", lambda: corpus.identity)
    splits = corpus.splits("train") + corpus.splits("validation")
    most = stage("max_segments", lambda: loader.max_segments(splits, seq_len))
    stages["max_segments"]["value"] = most
    train = stage(
        "train_batches",
        lambda: loader.TrainBatches(corpus.splits("train"), corpus.weights, seq_len, batch_size, seed=0),
    )
    stage("train_first_batch", lambda: next(train))
    evals = stage(
        "eval_batches",
        lambda: loader.EvalBatches(corpus.splits("validation"), corpus.weights, seq_len, batch_size, 1),
    )
    stage("eval_first_batch", lambda: evals[0])
    stage("identity_from_starts", lambda: identity_from_starts(corpus))
    stage("max_segments_over_windows", lambda: loader.max_segments([plain(s) for s in splits], seq_len))
    return stages


def reset_peak_rss() -> None:
    """Make the peak RSS (ru_maxrss) the RSS now, so that what the imports held for a while and
    freed does not hide what start-up adds (Linux 4.0+; elsewhere the peak stays)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def identity_from_starts(corpus: cache.Corpus) -> str:
    """The identity as an entry without it in meta.json gives it: from every document start."""
    splits = [{s: (len(p[s]), p[s].starts, p[s].trained) for s in SPLITS} for p in corpus.parts]
    return corpus_identity(corpus.tokenizer.model_proto, splits)


def plain(split: cache.Split) -> cache.Split:
    """`split` as read from an entry without recorded window counts."""
    return cache.Split(split.tokens, split.starts)


if __name__ == "__main__":
    sys.exit(main())
