"""`python -m lmjax.data prepare --experiment NAME_OR_PATH [--set key=value ...]`

Builds the experiment's token cache (tokenizer and token shards) ahead of training, so a
training job, or every host of one, finds it ready. Prints where it is and what it holds.
"""

from __future__ import annotations

import argparse
import sys

from lmjax import config
from lmjax.config import UserError
from lmjax.data import cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmjax.data", description=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize the experiment's corpus into the cache")
    prepare.add_argument("--experiment", required=True, help="a shipped experiment name or a .py path")
    prepare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    try:
        exp = config.apply_overrides(config.load_experiment(args.experiment), args.set)
        config.validate(exp)
        corpus = cache.load_or_build(exp.data, log=lambda m: print(m, file=sys.stderr))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
