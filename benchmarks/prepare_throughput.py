"""Preparing a token cache in-process against Apache Beam's DirectRunner on this machine.

    python benchmarks/prepare_throughput.py [--copies 1] [--files 16] [--workers 1 2]

Writes the stdlib corpus `--copies` times (each copy's documents under distinct keys) as
`--files` JSON Lines files, trains the gpt2_124m experiment's tokenizer on it once, then builds
the cache from those files with the tokenizer given: in-process (`cache.load_or_build`), and
with the DirectRunner in multi-processing mode at each of `--workers` (`prepare_beam.run`),
each into a fresh cache folder. Records MB/s of UTF-8 text for each (start-up of Beam's worker
processes included: it is what a user waits for), the input bytes each Beam worker process read
(Beam's counters), and whether every build's files are the same bytes.
Writes `benchmarks/results/prepare_throughput-<machine>-<cpus>cpu.json`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from stdlib_jsonl import corpus_mb, repeated_corpus
from versions import package_versions

from lmjax import config
from lmjax.data import cache, tokenizer

RESULTS = Path(__file__).parent / "results"


def file_hashes(entry: Path) -> dict[str, str]:
    """sha256 of every file of an entry but meta.json (which records the build's seconds)."""
    return {
        p.relative_to(entry).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(entry.rglob("*"))
        if p.is_file() and p.name not in ("meta.json", ".lock")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="stdlib corpus copies (about 11 MB each); a copy's text repeats, which encoding notices",
    )
    parser.add_argument("--files", type=int, default=16, help="JSON Lines files to spread them over")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DirectRunner worker counts")
    parser.add_argument("--out", type=Path, default=None, help="the record's path")
    args = parser.parse_args(argv)
    from lmjax.data import prepare_beam  # apache_beam: lmjax[beam]

    with tempfile.TemporaryDirectory(prefix="lmjax-prepare-bench-") as tmp:
        work = Path(tmp)
        repeated_corpus(work / "corpus", args.copies, args.files)
        mb = corpus_mb(args.copies)
        exp = config.load_experiment("gpt2_124m")
        data = config.Data(source="jsonl", path=str(work / "corpus"), vocab_size=exp.data.vocab_size)
        tokenizer.train(tokenizer.sample(data), data).save(work / "tokenizer.model")
        given = dict(source="jsonl", path=str(work / "corpus"), tokenizer_path=str(work / "tokenizer.model"))

        start = time.perf_counter()
        corpus = cache.load_or_build(config.Data(**given, cache_dir=str(work / "in_process")), lambda m: None)
        builds = {"in_process": {"seconds": time.perf_counter() - start}}
        reference = file_hashes(Path(corpus.entry))
        for workers in args.workers:
            cfg = config.Data(**given, cache_dir=str(work / f"beam{workers}"))
            flags = [
                "--runner=DirectRunner",
                f"--direct_num_workers={workers}",
                "--direct_running_mode=multi_processing",
            ]
            start = time.perf_counter()
            built = prepare_beam.run(cfg, flags, lambda m: None)
            builds[f"direct_runner_{workers}_workers"] = {
                "seconds": time.perf_counter() - start,
                "input_bytes": built.input_bytes,
                "input_bytes_per_worker": sorted(built.worker_bytes.values()),
                "same_files_as_in_process": file_hashes(Path(built.entry)) == reference,
            }
        for build in builds.values():
            build["mb_per_s"] = mb / build["seconds"]

    record = {
        "benchmark": "prepare_throughput",
        "date": datetime.date.today().isoformat(),
        "device": {"host_cpus": os.cpu_count(), "machine": platform.machine()},
        "versions": package_versions(("apache-beam", "sentencepiece", "array_record", "numpy", "protobuf"))
        | {"python": platform.python_version()},
        "config": {
            "corpus": f"the stdlib corpus x{args.copies} in {args.files} JSON Lines files",
            "vocab_size": exp.data.vocab_size,
            "tokenizer": "given (trained once beforehand)",
        },
        "corpus_utf8_mb": mb,
        "corpus_tokens": len(corpus.splits("train")[0]) + len(corpus.splits("validation")[0]),
        "builds": builds,
    }
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"prepare_throughput-{platform.machine()}-{os.cpu_count()}cpu.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
