"""`python -m lmjax.data prepare --experiment NAME_OR_PATH [--set key=value ...] [--runner R ...]`

Builds the experiment's token cache (tokenizer and token shards) ahead of training, so a
training job, or every host of one, finds it ready. Prints where it is and what it holds.
With `--runner` (or any other Apache Beam pipeline option) an Apache Beam pipeline builds the
same entry (prepare_beam.py, docs/data-at-scale.md); the options it does not know go to Beam.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from lmjax import config
from lmjax.config import UserError
from lmjax.data import cache

if TYPE_CHECKING:  # imports apache_beam, an optional dependency
    from lmjax.data.prepare_beam import Built

# Beam's options that a run on one machine or on Dataflow most often needs, listed in --help;
# any other Beam option passes through as well.
BEAM_OPTIONS = {
    "--runner": "DirectRunner (this machine), DataflowRunner, FlinkRunner, SparkRunner, ...",
    "--direct_num_workers": "DirectRunner: worker processes (or threads)",
    "--direct_running_mode": "DirectRunner: in_memory, multi_threading or multi_processing",
    "--project": "Dataflow: the Google Cloud project",
    "--region": "Dataflow: the region its workers run in",
    "--temp_location": "Dataflow: a gs:// folder for its temporary files",
    "--max_num_workers": "Dataflow: the most workers autoscaling may start",
    "--machine_type": "Dataflow: the workers' machine type",
    "--extra_package": "a built lmjax wheel (or another package) to install on each worker",
    "--requirements_file": "a requirements.txt to install on each worker",
    "--sdk_container_image": "a worker container image with lmjax installed",
}


class _ToBeam(argparse.Action):
    """Keeps a Beam option as written, in order, for Beam's own parser."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.beam_flags = [*namespace.beam_flags, option_string, values]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmjax.data", description=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize the experiment's corpus into the cache")
    prepare.add_argument("--experiment", required=True, help="a shipped experiment name or a .py path")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    beam = prepare.add_argument_group(
        "Apache Beam (pip install 'lmjax[beam]')", "build with a Beam pipeline; any other Beam option too"
    )
    for flag, what in BEAM_OPTIONS.items():
        beam.add_argument(flag, action=_ToBeam, dest="beam_flags", default=[], metavar="VALUE", help=what)
    args, other_flags = parser.parse_known_args(argv)
    beam_flags = args.beam_flags + other_flags
    try:
        exp = config.apply_overrides(config.load_experiment(args.experiment), args.set)
        config.validate(exp)
        built = _beam_build(exp.data, beam_flags, _log) if beam_flags else None
        corpus = cache.load_or_build(exp.data, log=_log)
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    print(f"{corpus.entry}: {corpus.tokenizer.vocab_size}-piece tokenizer")
    for c, part in zip(exp.data.components(), corpus.meta["parts"], strict=True):
        for split, s in part.items():
            print(
                f"  {c.source} {c.name or c.path or ''} {split}: {s['documents']} documents, "
                f"{s['tokens']:,} tokens, {s['bytes'] / s['tokens']:.2f} bytes/token"
            )
    if built and built.worker_bytes:
        print(f"read {built.input_bytes:,} bytes in {built.chunks_read} files:")
        for worker, n in sorted(built.worker_bytes.items()):
            print(f"  worker {worker}: {n:,} bytes")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _beam_build(cfg: config.Data, beam_flags: list[str], log: Callable[[str], None]) -> Built:
    if importlib.util.find_spec("apache_beam") is None:
        raise UserError(
            f"{beam_flags[0]} builds with Apache Beam, which is not installed: pip install 'lmjax[beam]'"
        )
    from lmjax.data import prepare_beam  # imports apache_beam, an optional dependency

    return prepare_beam.run(cfg, beam_flags, log)


if __name__ == "__main__":
    sys.exit(main())
