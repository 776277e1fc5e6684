"""`python -m lmjax.evaluate --workdir DIR [--split validation] [--set key=value ...]`

Held-out loss, perplexity and bits per byte of the newest checkpoint in DIR over every window
of a split of the run's corpus (not a sample), written to DIR/eval.json. Bits per byte =
summed loss in nats / ln 2 / UTF-8 bytes of the predicted tokens: unlike loss, it compares
across tokenizers. The training loop reports the same three numbers (`HeldOut`), over
`train.eval_batches` batches, or the whole split when that is 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from lmjax import checkpoint, config, sharding, step, storage
from lmjax.config import UserError
from lmjax.data import cache, loader
from lmjax.data.tokenizer import Tokenizer

EvalStep = Callable[[nnx.State, step.Batch], tuple[jax.Array, jax.Array, jax.Array]]


class HeldOut:
    """Loss, perplexity and bits per byte of parameters over a sequence of batches (this host's
    rows of each, `placement.rows`), each put on the devices while the one before it is evaluated."""

    def __init__(
        self, batches: Sequence[loader.Batch], eval_step: EvalStep, placement: sharding.BatchPlacement
    ):
        self._batches, self._eval_step, self._placement = batches, eval_step, placement

    def first_batch_loss(self, params: nnx.State) -> float:
        """The mean loss of `params` over the first batch alone: a cheap check that parameters
        still give a finite loss (NaN or inf otherwise)."""
        loss_sum, count, _ = jax.device_get(self._eval_step(params, self._placement.put(self._batches[0])))
        return float(loss_sum) / max(float(count), 1.0)

    def __call__(self, params: nnx.State) -> dict[str, float]:
        sums = [
            self._eval_step(params, self._placement.put(b))
            for b in self._batches  # dispatch is async: the next batch is built meanwhile
        ]
        loss_sum, count, n_bytes = np.asarray(jax.device_get(sums), np.float64).sum(axis=0).tolist()
        loss = loss_sum / max(count, 1.0)
        return {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 700.0)),
            "eval_bpb": loss_sum / math.log(2) / max(n_bytes, 1.0),
            "eval_tokens": count,
            "eval_bytes": n_bytes,
        }


def held_out(
    exp: config.Experiment,
    corpus: cache.Corpus,
    graphdef: nnx.GraphDef,
    param_shardings: nnx.State,
    placement: sharding.BatchPlacement,
    split: str,
    n_batches: int,
) -> HeldOut:
    """The evaluation of `exp`'s run on `n_batches` batches of `split` of `corpus` (0: all of
    it), placed like the training batches (`placement`: each host builds only its own rows)."""
    batches = loader.EvalBatches(
        corpus.splits(split),
        corpus.weights,
        exp.model.seq_len,
        placement.batch_size,
        n_batches,
        placement.rows,
    )
    mesh = placement.sharding.mesh
    eval_step = step.make_eval_step(graphdef, param_shardings, mesh, corpus.tokenizer.token_bytes())
    return HeldOut(batches, eval_step, placement)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", required=True, help="a run folder with a checkpoint")
    parser.add_argument("--split", default="validation", choices=("validation", "train"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override the run's config (mesh.*)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        result = evaluate(args.workdir, args.split, args.set)
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    print(
        f"step {result['step']}, {result['split']}: loss {result['loss']:.4f}, perplexity "
        f"{result['perplexity']:.2f}, {result['bits_per_byte']:.4f} bits/byte over {result['tokens']:.0f} "
        f"tokens ({args.workdir}/eval.json)"
    )
    return 0


def evaluate(
    workdir: storage.PathLike, split: str = "validation", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Evaluate the newest checkpoint in `workdir` (a folder or a bucket) on every window of
    `split`; the result is also written to `workdir/eval.json`."""
    workdir = storage.path(workdir)
    exp = _own_tokenizer(checkpoint.saved_experiment(workdir, list(overrides), log=_print).exp, workdir)
    run_tokenizer = Tokenizer.load(workdir / "tokenizer.model")
    corpus = cache.load_or_build(exp.data, log=_print)
    if corpus.tokenizer.model_proto != run_tokenizer.model_proto:
        raise UserError(
            f"the token cache of this run's data ({corpus.entry}) was made with another tokenizer than "
            f"{workdir}/tokenizer.model; delete that cache entry to rebuild it"
        )
    mesh = sharding.make_mesh(exp)
    started = time.time()
    with sharding.use(mesh, exp.mesh.rules):
        params, saved = checkpoint.load_newest(workdir, mesh, log=_print)
        graphdef, _ = step.abstract_model(exp.model)
        shardings = jax.tree.map(lambda a: a.sharding, params)
        placement = sharding.BatchPlacement(mesh, exp.train.batch_size)
        scores = held_out(exp, corpus, graphdef, shardings, placement, split, n_batches=0)(params)
    result = {
        "step": saved.step,
        "split": split,
        "loss": scores["eval_loss"],
        "perplexity": scores["eval_perplexity"],
        "bits_per_byte": scores["eval_bpb"],
        "tokens": scores["eval_tokens"],
        "bytes": scores["eval_bytes"],
        "seq_len": exp.model.seq_len,
        "data": corpus.entry.name,
        "seconds": round(time.time() - started, 2),
        "devices": f"{jax.device_count()} {jax.devices()[0].device_kind}",
        "config": config.to_dict(exp),
    }
    try:
        storage.write_atomic(workdir / "eval.json", (json.dumps(result, indent=2) + "\n").encode())
    except OSError as e:  # the evaluation is not thrown away: its numbers go into the message
        numbers = {k: result[k] for k in ("step", "split", "loss", "perplexity", "bits_per_byte")}
        raise UserError(
            f"{workdir / 'eval.json'} was not written ({e.strerror or e}); the result: {json.dumps(numbers)}"
        ) from None
    return result


def _own_tokenizer(exp: config.Experiment, workdir: storage.Path) -> config.Experiment:
    """A run whose data.tokenizer_path named its own tokenizer.model (an import, a warm start),
    read from where the run is now: copied to another folder or a bucket, it still evaluates."""
    named = exp.data.tokenizer_path
    if not named or storage.path(named).exists():
        return exp
    own = workdir / "tokenizer.model"
    data = dataclasses.replace(exp.data, tokenizer_path=os.fspath(own))
    return dataclasses.replace(exp, data=data)


def _print(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
