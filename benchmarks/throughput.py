"""Train-step throughput on random tokens: tokens/s, MFU, compile time and memory of one experiment.

    python benchmarks/throughput.py --experiment gpt2_124m [--set key=value ...] [--steps N]
        [--warmup N] [--packed] [--tag T] [--out DIR] [--ceiling-size N] [--ceiling-dtype D]
    python benchmarks/throughput.py --ceiling-only [--ceiling-size N] [--out DIR]

The model, optimizer state, mesh and jitted step are built exactly as `lmjax.train` builds them;
only the batches differ: random tokens made here (no tokenizer, no data pipeline, so nothing of
grain, array_record, TFDS or sentencepiece is imported). Plain causal batches by default (one
document per row); `--packed` gives rows of several documents of random lengths (segment ids,
positions restarting), so the packed attention path is measured too. A few batches are put on
the devices before timing and reused in turn.

Measured: lower + compile time of the step (apart from running it); tokens/s over `--steps`
steps after `--warmup` steps, waiting for the devices only at the end of the timed window; MFU
against the datasheet peak (null where unknown, e.g. CPU) and against a size³ matmul measured
in this process at the model's compute dtype (8192³ on accelerators, 1024³ on CPU); the
devices' peak memory where they report it; XLA's memory analysis of the compiled step. Model
FLOPs per token are `lmjax.flops.flops_per_token` (6N + 12·L·d·T). The record goes to
`OUT/throughput-<experiment>-<platform><devices>[-packed][-tag].json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lmjax import config
from lmjax.config import UserError

RESULTS = Path(__file__).parent / "results"
# Vocabulary when the experiment leaves it to the tokenizer (0): nanoGPT's padded GPT-2 size, and
# the 32768 pieces the shipped llama experiment's tokenizer has.
DEFAULT_VOCAB = {"gpt2": 50304, "llama": 32768}
VERSIONED = ("jax", "jaxlib", "flax", "optax", "numpy", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", help="a shipped experiment name or a .py path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--packed", action="store_true", help="packed documents instead of plain causal")
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON record")
    parser.add_argument("--ceiling-size", type=int, default=0, help="0: 8192, or 1024 on CPU")
    parser.add_argument("--ceiling-dtype", default="", help="default: the model's compute dtype")
    parser.add_argument("--ceiling-only", action="store_true", help="measure only the matmul ceiling")
    args = parser.parse_args(argv)
    if not args.ceiling_only and not args.experiment:
        parser.error("--experiment is required (or pass --ceiling-only)")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        exp, vocab_source = resolve(args) if args.experiment else (None, None)
        if exp is not None and exp.train.xla_flags and importlib.util.find_spec("lmjax.xla_flags"):
            importlib.import_module("lmjax.xla_flags").apply(log=lambda m: print(m, file=sys.stderr))
        record = run(args, exp, vocab_source)
    except UserError as e:
        print(f"throughput: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = record["device"]
    stem = f"throughput-{exp.name}" if exp else "matmul_ceiling"
    suffix = ("-packed" if args.packed else "") + (f"-{args.tag}" if args.tag else "")
    path = out / f"{stem}-{dev['platform']}{dev['count']}{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(summary(record) + f" -> {path}")
    return 0


def resolve(args: argparse.Namespace) -> tuple[config.Experiment, str]:
    """The experiment with overrides, a vocabulary (no tokenizer here), checked."""
    exp = config.apply_overrides(config.load_experiment(args.experiment), args.set)
    if any(s.partition("=")[0].strip() == "model.vocab_size" for s in args.set):
        source = "--set"
    elif exp.model.vocab_size:
        source = "experiment"
    else:
        source = f"default for {exp.model.flavour} (the experiment takes the tokenizer's)"
        vocab = DEFAULT_VOCAB.get(exp.model.flavour, 32768)
        exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, vocab_size=vocab))
    config.validate(exp)
    return exp, source


def run(args: argparse.Namespace, exp: config.Experiment | None, vocab_source: str | None) -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    record: dict[str, Any] = {
        "experiment": exp.name if exp else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {
            "kind": device.device_kind,
            "platform": device.platform,
            "count": jax.device_count(),
            "processes": jax.process_count(),
            "host_cpus": os.cpu_count(),
        },
        "versions": _versions(),
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")},
    }
    if exp is not None:
        config.mesh_shape(exp, jax.device_count())
        record |= {"config": config.to_dict(exp), "overrides": args.set, "vocab_source": vocab_source}
        record |= measure_step(exp, args.steps, args.warmup, args.packed)
    size = args.ceiling_size or (1024 if device.platform == "cpu" else 8192)
    dtype = args.ceiling_dtype or (exp.model.dtype if exp else "bfloat16")
    ceiling = matmul_ceiling(size, dtype)
    record |= {"ceiling_tflops": ceiling, "ceiling_size": size, "ceiling_dtype": dtype}
    if exp is not None:
        model_flops_per_s = record["tokens_per_s"] * record["flops_per_token"]
        record["mfu_vs_measured"] = model_flops_per_s / (ceiling * 1e12 * jax.device_count())
    return record


def measure_step(exp: config.Experiment, steps: int, warmup: int, packed: bool) -> dict[str, Any]:
    """Compile the train step as `lmjax.train` does and time it on random batches."""
    import jax
    import numpy as np

    from lmjax import flops, optim, sharding, step

    m, t = exp.model, exp.train
    mesh = sharding.make_mesh(exp)
    tx = optim.make(exp.optim, t.steps)
    rng = np.random.default_rng(t.seed)
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.init_state(exp, tx, mesh)
        train_step = step.make_train_step(graphdef, tx, exp, shardings, mesh)
        batch_sh = step.batch_sharding(mesh)
        batches = [
            step.put_batch(random_batch(rng, t.batch_size, m.seq_len, m.vocab_size, packed), batch_sh)
            for _ in range(min(4, warmup + steps))
        ]
        params = sum(x.size for x in jax.tree.leaves(state["params"]))

        start = time.perf_counter()
        lowered = train_step.lower(state, batches[0])
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start

        for i in range(warmup):
            state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(state)
        start = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled(state, batches[(warmup + i) % len(batches)])
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - start

    tokens_per_s = steps * t.batch_size * m.seq_len / elapsed
    peak = flops.peak_tflops(jax.devices()[0].device_kind, t.peak_tflops)
    result = {
        "batch": "packed" if packed else "plain",
        "mesh": dict(zip(mesh.axis_names, map(int, mesh.devices.shape), strict=True)),
        "steps": steps,
        "warmup": warmup,
        "tokens_per_step": t.batch_size * m.seq_len,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * elapsed / steps,
        "mfu": flops.mfu(tokens_per_s, m, jax.device_count(), peak) if peak else None,
        "peak_tflops": peak,
        "compile_s": compile_s,
        "lower_s": lower_s,
        "final_loss": float(metrics["loss"]),
        "attention_impl": _attention_impl(m, t.batch_size, packed),
        "flops_per_token": flops.flops_per_token(m),
        "params": int(params),
        "params_matmul": flops.matmul_params(m),
        "xla_flops_per_step": _xla_flops(compiled),
        "peak_memory_bytes": peak_memory_bytes(),
        "memory_analysis": memory_analysis(compiled),
    }
    return result


def random_batch(rng: Any, batch_size: int, seq_len: int, vocab: int, packed: bool = False) -> dict[str, Any]:
    """Uniform random tokens. Plain: one document per row and no segment ids or positions, so
    attention takes its plain causal path (cuDNN on a GPU), as the peers measure. Packed: the
    loader's layout (`lmjax.data.loader.windows`), documents of lengths drawn uniformly from
    [seq_len/16, seq_len] back to back, segment ids counting from 1 and positions restarting
    at each document; the target that would predict the next document's first token is masked."""
    import numpy as np

    n = seq_len + 1  # inputs and targets
    tokens_BN = rng.integers(0, vocab, (batch_size, n), dtype=np.int32)
    if not packed:
        return {
            "inputs": tokens_BN[:, :-1],
            "targets": tokens_BN[:, 1:],
            "loss_mask": np.ones((batch_size, seq_len), np.float32),
        }
    segments_BN = np.ones((batch_size, n), np.int32)
    positions_BN = np.zeros((batch_size, n), np.int32)
    for row in range(batch_size):
        start, doc = 0, 1
        while start < n:
            end = min(n, start + int(rng.integers(max(1, seq_len // 16), seq_len + 1)))
            segments_BN[row, start:end] = doc
            positions_BN[row, start:end] = np.arange(end - start)
            start, doc = end, doc + 1
    return {
        "inputs": tokens_BN[:, :-1],
        "targets": tokens_BN[:, 1:],
        "segment_ids": segments_BN[:, :-1],
        "positions": positions_BN[:, :-1],
        "loss_mask": (segments_BN[:, 1:] == segments_BN[:, :-1]).astype(np.float32),
    }


def matmul_ceiling(size: int, dtype: str, windows: int = 5, window_s: float = 0.1) -> float:
    """Best TFLOP/s of a `size`³ matmul on the first device over a few timed windows (each at
    most 50 matmuls in flight, so outputs waiting to be freed stay bounded)."""
    import jax
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    reps = max(1, min(50, int(window_s / (time.perf_counter() - start))))
    best = float("inf")
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(reps):
            out = matmul(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * size**3 / best / 1e12


def peak_memory_bytes() -> int | None:
    """The largest `peak_bytes_in_use` over this process's devices; None where not reported."""
    import jax

    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    """Every integer field of XLA's per-device memory analysis (argument, output, alias, temp,
    generated code, ...; the fields differ between jaxlib versions and backends)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not implemented on some backends
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if analysis is None:
        return None
    names = [n for n in dir(analysis) if not n.startswith("_")]
    values = {n: getattr(analysis, n, None) for n in names}
    return {n: v for n, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}


def summary(r: dict[str, Any]) -> str:
    d = r["device"]
    ceiling = f"{r['ceiling_tflops']:.1f} TFLOP/s ({r['ceiling_size']}³ {r['ceiling_dtype']})"
    if r["experiment"] is None:
        return f"matmul ceiling on {d['count']} {d['kind']}: {ceiling}"
    mfu = f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f}, " if r["mfu"] is not None else ""
    memory = r["peak_memory_bytes"]
    return (
        f"{r['experiment']} {r['batch']} on {d['count']} {d['kind']}: {r['tokens_per_s']:,.0f} tok/s, "
        f"{r['step_ms']:.1f} ms/step, {mfu}{100 * r['mfu_vs_measured']:.1f}% of measured {ceiling}, "
        f"compile {r['compile_s']:.1f} s"
        + (f", peak memory {memory / 2**30:.2f} GiB" if memory is not None else "")
    )


def _versions() -> dict[str, str | None]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    found = {p: version(p) for p in VERSIONED}
    return {p: v for p, v in found.items() if v or p in VERSIONED[:5]} | {"python": platform.python_version()}


def _xla_flops(compiled: Any) -> float | None:
    """XLA's own count of the step's FLOPs (per device), for comparison with the model count."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if isinstance(cost, dict) and "flops" in cost else None


def _attention_impl(m: config.Model, batch_size: int, packed: bool) -> str | None:
    """The kernel `model.attention` resolves to here (plain batches carry no segment ids)."""
    from lmjax import attention

    try:
        return attention.resolve(m.attention, (batch_size, m.seq_len, m.n_heads, m.head_dim), m.dtype, packed)
    except (AttributeError, TypeError, ValueError):  # attention.resolve's signature may move
        return None


if __name__ == "__main__":
    sys.exit(main())
