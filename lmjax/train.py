"""`python -m lmjax.train --experiment NAME_OR_PATH --workdir DIR [--set key=value ...]`

Loads the experiment, applies overrides and checks them before jax is imported (a bad config
exits 2 in well under a second), then trains it in DIR (`lmjax.loop.run`): the mesh, data,
sharded state (resumed from DIR's newest checkpoint where there is one) and jitted step, with
metrics in DIR/metrics.jsonl and checkpoints in DIR/checkpoints.

DIR may be a bucket (`gs://bucket/run`): see docs/cloud-storage.md.

Exit status: 0 trained (or already done), 2 a setting or the workdir needs fixing (a workdir
that cannot be written, or a checkpoint that could not be saved, included), 3 the loss or
gradient became non-finite (the last good checkpoint kept), 130 interrupted twice.
"""

from __future__ import annotations

import argparse
import sys

from lmjax import config
from lmjax.config import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.train", description=__doc__.split("\n\n")[1])
    parser.add_argument("--experiment", required=True, help="a shipped experiment name or a .py path")
    parser.add_argument(
        "--workdir", required=True, help="run folder or bucket (gs://...): config, metrics, checkpoints"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.steps=100 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        config.require(bool(args.workdir.strip()), "--workdir is empty; name the run's folder or bucket")
        exp = config.apply_overrides(config.load_experiment(args.experiment), args.set)
        config.validate(exp)
        return _train(exp, args.workdir)
    except UserError as e:
        return _error(e, 2)
    except OSError as e:  # no space, no permission, a file system gone: what was not written, where
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or e}; free space or fix the permissions, then run again", 2)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, the newest complete checkpoint kept
        print("lmjax: interrupted", file=sys.stderr)
        return 130


def _train(exp: config.Experiment, workdir: str) -> int:
    from lmjax import loop  # jax and the model stack: only once the config has passed

    try:
        loop.run(exp, workdir)
    except loop.Diverged as e:
        return _error(e, 3)
    return 0


def _error(e: Exception | str, status: int) -> int:
    print(f"lmjax: error: {e}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
