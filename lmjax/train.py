"""`python -m lmjax.train --experiment NAME_OR_PATH --workdir DIR [--set key=value ...]`

Loads the experiment, applies overrides and checks them before jax is imported (a bad config
exits 2 in well under a second), then builds the mesh, data, sharded state and jitted step,
and trains, logging to DIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from lmjax import config
from lmjax.config import UserError
from lmjax.flops import count_params


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
    """Train `exp` in `workdir`; returns the last logged metrics and held-out results."""
    # jax and the model stack load only now, after the config has been checked.
    if exp.train.xla_flags:
        from lmjax import xla_flags

        xla_flags.apply(log=lambda m: print(m, file=sys.stderr))
    import jax

    from lmjax import flops, optim, sharding, step
    from lmjax.data import cache, loader
    from lmjax.evaluate import HeldOut
    from lmjax.metrics import Logger, StepTrace, Throughput

    workdir = workdir.absolute()
    if (workdir / "metrics.jsonl").exists():
        raise UserError(f"{workdir} already holds a run and resuming is not built yet; pass a new --workdir")
    config.mesh_shape(exp, jax.device_count())  # the mesh and batch, before any tokenizing
    corpus = cache.load_or_build(exp.data, log=lambda m: print(m, file=sys.stderr))
    exp = _with_vocab(exp, corpus.tokenizer.vocab_size)
    if exp.model.max_segments == 0:  # size the packed attention kernel to this data
        splits = corpus.splits("train") + corpus.splits("validation")
        most = loader.max_segments(splits, exp.model.seq_len)
        exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, max_segments=most))
    mesh = sharding.make_mesh(exp)  # checked again, now that the vocabulary is known
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(exp), indent=2) + "\n")
    corpus.tokenizer.save(workdir / "tokenizer.model")

    m, t = exp.model, exp.train
    tx = optim.make(exp.optim, t.steps)
    peak = flops.peak_tflops(jax.devices()[0].device_kind, t.peak_tflops)
    tokens_per_step = t.batch_size * m.seq_len
    log = Logger(workdir, t.steps, progress=t.progress)
    log.print(
        f"{exp.name}: {m.flavour} {count_params(m) / 1e6:.1f}M params, mesh data x fsdp x tensor = "
        f"{' x '.join(map(str, mesh.devices.shape))} on {jax.device_count()} {jax.default_backend()} devices"
    )

    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.init_state(exp, tx, mesh)
        train_step = step.make_train_step(graphdef, tx, exp, shardings, mesh)
        batch_sh = step.batch_sharding(mesh)
        train_batches = loader.DevicePrefetch(  # the next batch goes to the devices during a step
            loader.TrainBatches(
                corpus.splits("train"),
                corpus.weights,
                m.seq_len,
                t.batch_size,
                t.seed,
                rows=sharding.host_rows(batch_sh, t.batch_size),
            ),
            lambda batch: step.put_batch(batch, batch_sh, t.batch_size),
        )
        held_out = HeldOut(
            loader.eval_batches(
                corpus.splits("validation"), corpus.weights, m.seq_len, t.batch_size, t.eval_batches
            ),
            corpus.tokenizer.token_bytes(),
            step.make_eval_step(graphdef, shardings["params"], mesh),
            batch_sh,
        )
        start, throughput = time.time(), Throughput()
        last: dict[str, Any] = {}

        def report(done: int, metrics: dict[str, jax.Array]) -> None:
            """Log step `done`'s metrics; only steps that are logged wait for the device."""
            if done == 1 and t.steps > 1:
                jax.block_until_ready(metrics)
                throughput.restart(tokens_per_step)  # step 1 holds the compilation
            elif done % t.log_every == 0 or done == t.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                tokens = done * tokens_per_step
                record = {"step": done, **values, "tokens": tokens, "time": time.time() - start}
                record["tokens_per_s"] = throughput.read(tokens)
                if peak:
                    record["mfu"] = flops.mfu(record["tokens_per_s"], m, mesh.devices.size, peak)
                log.write(record)
                last.update(record)

        pending = None  # (step, metrics) read one step late: the device is busy meanwhile
        trace = StepTrace(workdir / "profile", t.profile_steps, log.print)
        try:
            for s in range(t.steps):
                done = s + 1
                trace.before(done)
                state, metrics = train_step(state, next(train_batches))
                trace.after(done, metrics)
                if pending:
                    report(*pending)
                pending = (done, metrics)
                log.advance()
                evaluate_now = (t.eval_every and done % t.eval_every == 0) or done == t.steps
                if done == 1 or evaluate_now:
                    report(*pending)
                    pending = None
                if evaluate_now:
                    last.update(held_out(state["params"]))
                    log.write({"step": done, "eval_loss": last["eval_loss"], "eval_bpb": last["eval_bpb"]})
                    throughput.restart(done * tokens_per_step)
        finally:
            trace.stop()  # a trace an error cut short
        log.close()
    print(
        f"done: {t.steps} steps, loss {last['loss']:.4f}, held-out loss {last['eval_loss']:.4f}, "
        f"{last['eval_bpb']:.4f} bits/byte ({workdir})",
        file=sys.stderr,
    )
    return last


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


if __name__ == "__main__":
    sys.exit(main())
