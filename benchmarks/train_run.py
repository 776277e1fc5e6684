"""Train an experiment and record what it measured: `benchmarks/results/<name>-<device>.json`.

    python benchmarks/train_run.py --experiment stdlib_tiny [--set key=value ...] [--tag TAG]

The record holds the device, versions, resolved config, steady-state tokens/s and MFU (median
of the logged intervals, the first one left out), wall time and the final held-out loss and
bits per byte. MFU is against the datasheet peak (omitted on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
from measure import package_versions

from lmjax import config
from lmjax.loop import run

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    parser.add_argument("--workdir", default="", help="default: a temporary folder")
    args = parser.parse_args(argv)
    exp = config.apply_overrides(config.load_experiment(args.experiment), args.set)
    config.validate(exp)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"lmjax-{exp.name}-"))

    start = time.time()
    final = run(exp, workdir)
    wall = time.time() - start
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in lines if "tokens_per_s" in r][1:] or [r for r in lines if "tokens_per_s" in r]
    device = jax.devices()[0]
    record = {
        "experiment": exp.name,
        "date": datetime.date.today().isoformat(),
        "device": {
            "kind": device.device_kind,
            "platform": device.platform,
            "count": jax.device_count(),
            "host_cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "versions": package_versions(("jax", "jaxlib", "flax", "optax", "numpy", "sentencepiece"))
        | {"python": platform.python_version()},
        "config": json.loads((workdir / "config.json").read_text()),
        "overrides": args.set,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady) if "mfu" in steady[0] else None,
        "wall_s": wall,
        "final": {k: final[k] for k in ("loss", "eval_loss", "eval_bpb") if k in final},
        "eval_curve": [[r["step"], r["eval_loss"], r["eval_bpb"]] for r in lines if "eval_loss" in r],
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"{exp.name}-{device.platform}{jax.device_count()}{'-' + args.tag if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("tokens_per_s", "mfu", "wall_s", "final")}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
