"""The stdlib corpus's documents written as JSON Lines files, repeated to grow a corpus: what the
data benchmarks build caches from. Imports nothing that loads JAX (a cache build encodes on
forked processes only where JAX does not run)."""

from __future__ import annotations

import json
from pathlib import Path

from lmjax import config
from lmjax.data import sources


def repeated_corpus(folder: Path, scale: int, files: int) -> Path:
    """`folder` holding the stdlib documents `scale` times over, spread over `files` JSON Lines
    files: the corpus grows in documents and tokens while the input files stay as many (what
    grows with their number, the listing that the cache key reads, is not what is measured)."""
    docs = [text for _, text in sources.documents(config.Source("stdlib"), 2.0)]
    folder.mkdir(parents=True)
    outs = [(folder / f"part-{k:03d}.jsonl").open("w") for k in range(files)]
    for i, text in enumerate(docs * scale):
        outs[i % files].write(json.dumps({"text": text}) + "\n")
    for out in outs:
        out.close()
    return folder


def corpus_mb(copies: int) -> float:
    """MB of UTF-8 text of the stdlib documents `copies` times over."""
    return (
        sum(len(text.encode()) for _, text in sources.documents(config.Source("stdlib"), 2.0)) * copies / 1e6
    )
