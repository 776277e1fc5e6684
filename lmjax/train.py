"""`python -m lmjax.train --experiment NAME_OR_PATH --workdir DIR [--set key=value ...]`

Loads the experiment, applies overrides and checks them before jax is imported (a bad config
exits 2 in well under a second), then builds the mesh, data, sharded state and jitted step,
and trains, logging to DIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lmjax import config
from lmjax.config import UserError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.train", description=__doc__.split("\n\n")[1])
    parser.add_argument("--experiment", required=True, help="a shipped experiment name or a .py path")
    parser.add_argument("--workdir", required=True, help="run folder: config, metrics, checkpoints")
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
        exp = config.apply_overrides(config.load_experiment(args.experiment), args.set)
        config.validate(exp)
        run(exp, Path(args.workdir))
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(exp: config.Experiment, workdir: Path) -> dict[str, Any]:
    """Train `exp` in `workdir`; returns the last logged metrics and eval results."""
    # jax and the model stack load only now, after the config has been checked.
    import jax

    from lmjax import flops, optim, sharding, step
    from lmjax.data import cache, loader
    from lmjax.metrics import Logger

    workdir = workdir.absolute()
    mesh = sharding.make_mesh(exp)  # checks the mesh and batch against the devices first
    corpus = cache.load_or_build(exp.data, log=lambda m: print(m, file=sys.stderr))
    exp = _with_vocab(exp, corpus.tokenizer.vocab_size)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(exp), indent=2) + "\n")
    corpus.tokenizer.save(workdir / "tokenizer.model")

    m, t = exp.model, exp.train
    tx = optim.make(exp.optim, t.steps)
    train_batches = loader.TrainBatches(corpus.splits["train"], m.seq_len, t.batch_size, t.seed)
    val_batches = loader.eval_batches(corpus.splits["validation"], m.seq_len, t.batch_size, t.eval_batches)
    token_bytes = corpus.tokenizer.token_bytes()
    val_bytes = sum(float((token_bytes[b["targets"]] * b["loss_mask"]).sum()) for b in val_batches)

    n_devices = mesh.devices.size
    peak = flops.peak_tflops(jax.devices()[0].device_kind, t.peak_tflops)
    tokens_per_step = t.batch_size * m.seq_len
    log = Logger(workdir, t.steps, progress=t.progress)
    log.print(
        f"{exp.name}: {m.flavour} {_millions(m)}M params, mesh data*fsdp*tensor="
        f"{'x'.join(map(str, mesh.devices.shape))} on {n_devices} {jax.devices()[0].platform} devices"
    )

    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.init_state(exp, tx, mesh)
        train_step = step.make_train_step(graphdef, tx, exp, shardings, mesh)
        eval_step = step.make_eval_step(graphdef, shardings["params"], mesh)
        batch_sh = step.batch_sharding(mesh)
        val_device = [step.put_batch(b, batch_sh) for b in val_batches]

        def evaluate(done: int) -> dict[str, Any]:
            sums = [eval_step(state["params"], b) for b in val_device]
            loss_sum = sum(float(s) for s, _ in sums)
            count = sum(float(c) for _, c in sums)
            record = {
                "step": done,
                "eval_loss": loss_sum / count,
                "eval_bpb": loss_sum / math.log(2) / val_bytes,
            }
            log.write(record)
            return record

        start = time.time()
        clock = {"time": start, "tokens": 0}  # throughput is measured from the end of step 1
        last: dict[str, Any] = {}

        def report(done: int, metrics: dict[str, jax.Array]) -> None:
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now, tokens = time.time(), done * tokens_per_step
            if done == 1:
                clock.update(time=now, tokens=tokens)  # step 1 includes compilation
                return
            if done % t.log_every and done != t.steps:
                return
            tokens_per_s = (tokens - clock["tokens"]) / max(now - clock["time"], 1e-9)
            clock.update(time=now, tokens=tokens)
            record = {
                "step": done,
                **values,
                "tokens": tokens,
                "time": now - start,
                "tokens_per_s": tokens_per_s,
            }
            if peak:
                record["mfu"] = flops.mfu(tokens_per_s, m, n_devices, peak)
            log.write(record)
            last.update(record)

        pending = None  # metrics are read one step late, so the host never waits on the device
        eval_record: dict[str, Any] = {}
        for s in range(t.steps):
            batch = step.put_batch(train_batches(s), batch_sh)
            state, metrics = train_step(state, batch)
            if pending is not None:
                report(*pending)
            pending = (s + 1, metrics)
            if s == 0:
                report(*pending)
                pending = None
            log.advance()
            if (t.eval_every and (s + 1) % t.eval_every == 0) or s + 1 == t.steps:
                if pending is not None:
                    report(*pending)
                    pending = None
                eval_record = evaluate(s + 1)
        log.close()
    jax.block_until_ready(state)
    print(
        f"done: {t.steps} steps, loss {last.get('loss', float('nan')):.4f}, "
        f"eval_loss {eval_record['eval_loss']:.4f}, eval_bpb {eval_record['eval_bpb']:.4f} ({workdir})",
        file=sys.stderr,
    )
    return {**last, **eval_record}


def _with_vocab(exp: config.Experiment, tokenizer_vocab: int) -> config.Experiment:
    """Fill model.vocab_size from the tokenizer, or check an explicit one can hold it."""
    if exp.model.vocab_size == 0:
        return dataclasses.replace(exp, model=dataclasses.replace(exp.model, vocab_size=tokenizer_vocab))
    if exp.model.vocab_size < tokenizer_vocab:
        raise UserError(
            f"model.vocab_size={exp.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab} pieces; set model.vocab_size=0 to take the tokenizer's"
        )
    return exp


def _millions(m: config.Model) -> str:
    from lmjax.model import count_params

    return f"{count_params(m) / 1e6:.1f}"


if __name__ == "__main__":
    sys.exit(main())
