"""Train-step throughput on random tokens: tokens/s, MFU, compile time and memory of one experiment.

    python benchmarks/throughput.py --experiment gpt2_124m [--set key=value ...] [--steps N]
        [--warmup N] [--packed] [--tag T] [--out DIR] [--ceiling-size N] [--ceiling-dtype D]
    python benchmarks/throughput.py --ceiling-only [--ceiling-size N] [--out DIR]
    python benchmarks/throughput.py --env BACKEND    # describe jax's devices; exit 1 unless BACKEND

The model, optimizer state, mesh and jitted step are built exactly as `lmjax.train` builds them;
only the batches differ: random tokens made here (no tokenizer, no data pipeline, so nothing of
grain, array_record, TFDS or sentencepiece is imported). Plain causal batches by default (one
document per row); `--packed` gives rows of several documents of random lengths (segment ids,
positions restarting), so the packed attention path is measured too, with `model.max_segments`
(the cuDNN packed kernel's bound on documents per row) set to the most any generated row holds
unless `--set` gives it. Every step's batch is its own (up to MAX_BATCHES, then reused) and all
are put on the devices before timing, so the timing is of the device step only (no
host-to-device transfer) and a loss far under ln(V) can only mean attention that sees the future.

Measured: lower + compile time of the step (apart from running it); tokens/s over `--steps`
steps after `--warmup` steps, waiting for the devices only at the end of the timed window; MFU
against the datasheet peak (null where unknown, e.g. CPU) and against a size³ matmul measured
in this process at the model's compute dtype (8192³ on accelerators, 1024³ on CPU); the
devices' peak memory where they report it; XLA's memory analysis of the compiled step. Model
FLOPs per token are `lmjax.flops.flops_per_token` (6N + 12·L·d·T). The record goes to
`OUT/throughput-<experiment>-<platform><devices>[-packed][-tag].json`: first a partial one
(`"complete": false`: config, lower/compile time, memory and cost analysis) as soon as the step
has compiled, so a step that runs out of memory still leaves XLA's memory analysis on disk (with
the error, where Python sees it); then the full one (`"complete": true`). With a persistent
compilation cache (`JAX_COMPILATION_CACHE_DIR`), compile_s may be a cache read: the record says
whether the cache was set and whether this compile hit it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lmjax.xla_flags
from lmjax import attention, config, flops, optim, sharding, step
from lmjax.config import UserError

# Python puts this folder on sys.path only when this file is run as a script; the tests load it
# by path (importlib, runpy), so put it there for the sibling modules imported below.
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import measure  # noqa: E402
import profile_trace  # noqa: E402
from random_batches import max_segments, random_batch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Vocabulary when the experiment leaves it to the tokenizer (0): nanoGPT's padded GPT-2 size, and
# the 32768 pieces the shipped llama experiment's tokenizer has.
DEFAULT_VOCAB = {"gpt2": 50304, "llama": 32768}
TIMING = "device step only; batches pre-placed"
MAX_BATCHES = 64  # distinct random batches on the devices: no batch is seen twice in a short run


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
    parser.add_argument("--env", metavar="BACKEND", help="print versions and devices; exit 1 unless BACKEND")
    parser.add_argument(
        "--xla", action="append", default=[], metavar="OPTION=VALUE", help="an XLA compile option; repeatable"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="trace N more steps: time per kernel"
    )
    args = parser.parse_args(argv)
    if not (args.ceiling_only or args.env) and not args.experiment:
        parser.error("--experiment is required (or pass --ceiling-only or --env)")
    if args.steps < 1 or args.warmup < 0 or args.profile < 0:
        parser.error("--steps must be >= 1, --warmup and --profile >= 0")
    try:
        args.compiler_options = compiler_options(args.xla)
    except ValueError as e:
        parser.error(str(e))
    return args


def compiler_options(items: list[str]) -> dict[str, bool | int | float | str]:
    """`["xla_gpu_enable_triton_gemm=false", ...]` -> XLA compile options with typed values
    (what `Lowered.compile` takes; they apply to this step only, unlike `XLA_FLAGS`)."""
    options: dict[str, bool | int | float | str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.startswith("xla_"):
            raise ValueError(f"--xla {item!r}: use xla_<option>=<value>")
        value: bool | int | float | str = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        options[name] = value
    return options


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.env:
            return env_check(args.env)
        exp, vocab_source = resolve(args) if args.experiment else (None, None)
        if exp is not None and exp.train.xla_flags:
            lmjax.xla_flags.apply(log=lambda m: print(m, file=sys.stderr))
        path = result_path(args, exp)
        record = run(args, exp, vocab_source, lambda partial: write(path, partial))
    except UserError as e:
        print(f"throughput: error: {e}", file=sys.stderr)
        return 2
    write(path, record)
    print(summary(record) + f" -> {path}")
    return 0


def result_path(args: argparse.Namespace, exp: config.Experiment | None) -> Path:
    stem = f"throughput-{exp.name}" if exp else "matmul_ceiling"
    suffix = ("-packed" if args.packed else "") + (f"-{args.tag}" if args.tag else "")
    return Path(args.out) / f"{stem}-{jax.devices()[0].platform}{jax.device_count()}{suffix}.json"


def write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def env_check(backend: str) -> int:
    """Print this Python, jax's versions and devices and the cuDNN version (on CUDA); 0 when
    jax's default backend is `backend`, else 1. The GPU run's first stage: fast, and it stops
    the run before a CPU fallback spends the budget."""
    print(f"python {platform.python_version()} ({sys.executable})")
    print("versions:", json.dumps(measure.versions()))
    print(
        "env:", json.dumps({k: os.environ.get(k) for k in (*measure.ENV_VARS, "JAX_COMPILATION_CACHE_DIR")})
    )
    try:
        devices = jax.devices()
    except RuntimeError as e:  # e.g. JAX_PLATFORMS names a backend that failed to start
        print(f"env: error: jax cannot start a backend: {e}", file=sys.stderr)
        return 1
    print("devices:", devices)
    print(f"default backend: {jax.default_backend()}; platform version: {measure.platform_version()}")
    if jax.default_backend() != backend:
        print(
            f"env: error: jax's default backend is {jax.default_backend()}, expected {backend}",
            file=sys.stderr,
        )
        return 1
    print(f"env: ok, {len(devices)} {devices[0].device_kind} ({backend})")
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


def run(
    args: argparse.Namespace,
    exp: config.Experiment | None,
    vocab_source: str | None,
    on_partial: Callable[[dict[str, Any]], None] = lambda record: None,
) -> dict[str, Any]:
    """The full record: the step's (`run_step`) and the matmul ceiling; `on_partial` gets the
    record so far (`"complete": false`) once the step has compiled, and again with the error
    if running it fails."""
    record = run_step(args, exp, vocab_source, on_partial) | ceiling(args, exp)
    if exp is not None:
        record["mfu_vs_measured"] = mfu_vs_measured(record, record["ceiling_tflops"])
    record["complete"] = True
    return record


def ceiling(args: argparse.Namespace, exp: config.Experiment | None) -> dict[str, Any]:
    """The matmul ceiling measured here: `--ceiling-size` (default 8192, 1024 on CPU) squared
    in `--ceiling-dtype` (default the model's compute dtype)."""
    size = args.ceiling_size or (1024 if jax.devices()[0].platform == "cpu" else 8192)
    dtype = args.ceiling_dtype or (exp.model.dtype if exp else "bfloat16")
    return {
        "ceiling_tflops": measure.matmul_ceiling(size, dtype),
        "ceiling_size": size,
        "ceiling_dtype": dtype,
    }


def mfu_vs_measured(record: dict[str, Any], ceiling_tflops: float) -> float:
    """A step record's model FLOPs per second over the ceiling of all its devices."""
    flops_per_s = record["tokens_per_s"] * record["flops_per_token"]
    return flops_per_s / (ceiling_tflops * 1e12 * record["device"]["count"])


def run_step(
    args: argparse.Namespace,
    exp: config.Experiment | None,
    vocab_source: str | None,
    on_partial: Callable[[dict[str, Any]], None] = lambda record: None,
) -> dict[str, Any]:
    """The machine's description and, with an experiment, its step measured (no ceiling)."""
    device = jax.devices()[0]
    cache_dir = measure.cache_dir()
    record: dict[str, Any] = {
        "experiment": exp.name if exp else None,
        "complete": False,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {
            "kind": device.device_kind,
            "platform": device.platform,
            "platform_version": measure.platform_version(),
            "count": jax.device_count(),
            "processes": jax.process_count(),
            "host_cpus": os.cpu_count(),
        },
        "versions": measure.versions(),
        "env": {k: os.environ.get(k) for k in measure.ENV_VARS},
        "compilation_cache": {
            "dir": cache_dir,
            "enabled": cache_dir is not None,
            "note": "compile_s may be a read from this persistent cache (see compile_cache_hit)"
            if cache_dir
            else "no persistent cache: compile_s is a full compile",
        },
    }
    if exp is None:
        return record
    t = exp.train
    rng = np.random.default_rng(t.seed)
    host_batches = [
        random_batch(rng, t.batch_size, exp.model.seq_len, exp.model.vocab_size, args.packed)
        for _ in range(min(MAX_BATCHES, args.warmup + args.steps))
    ]
    if args.packed:
        in_data = max_segments(host_batches)
        if not exp.model.max_segments:  # size the packed kernel to the data (unless --set)
            exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, max_segments=in_data))
            config.validate(exp)
        record |= {"max_segments": exp.model.max_segments, "max_segments_in_data": in_data}
    record |= {
        "config": config.to_dict(exp),
        "overrides": args.set,
        "compiler_options": args.compiler_options,
        "vocab_source": vocab_source,
        "distinct_batches": len(host_batches),
    }
    profile_dir = Path(args.out) / f"trace-{exp.name}" if args.profile else None
    return record | measure_step(
        exp,
        host_batches,
        args.steps,
        args.warmup,
        lambda part: on_partial(record | part),
        args.compiler_options,
        (args.profile, profile_dir),
    )


def measure_step(
    exp: config.Experiment,
    host_batches: list[dict[str, Any]],
    steps: int,
    warmup: int,
    on_compiled: Callable[[dict[str, Any]], None] = lambda part: None,
    compiler_options: dict[str, Any] | None = None,
    profile: tuple[int, Path | None] = (0, None),
) -> dict[str, Any]:
    """Compile the train step as `lmjax.train` does (with XLA `compiler_options`, if any) and
    time it on `host_batches` (placed on the devices first, used in turn). `on_compiled` gets
    the compile-time part of the result before any step runs, and that part with an `"error"`
    if running fails. `profile` = (N, folder): then N more steps are traced into the folder and
    the record gains `profile_trace.capture`'s summary."""
    m, t = exp.model, exp.train
    packed = "segment_ids" in host_batches[0]
    mesh = sharding.make_mesh(exp)
    tx = optim.make(exp.optim, t.steps)
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.init_state(exp, tx, mesh)
        train_step = step.make_train_step(graphdef, tx, exp, shardings, mesh)
        placement = sharding.BatchPlacement(mesh, t.batch_size)
        batches = [placement.put_global(b) for b in host_batches]  # every host made every row
        params = sum(x.size for x in jax.tree.leaves(state["params"]))

        start = time.perf_counter()
        lowered = train_step.lower(state, batches[0])
        lower_s = time.perf_counter() - start
        with measure.cache_hits() as hits:
            compiled = lowered.compile(compiler_options or None)
        compile_s = time.perf_counter() - start
        part = {
            "batch": "packed" if packed else "plain",
            "mesh": dict(zip(mesh.axis_names, map(int, mesh.devices.shape), strict=True)),
            "timing": TIMING,
            "steps": steps,
            "warmup": warmup,
            "tokens_per_step": t.batch_size * m.seq_len,
            "compile_s": compile_s,
            "lower_s": lower_s,
            "compile_cache_hit": None if hits is None else bool(hits),
            "attention_impl": _attention_impl(m, t.batch_size, packed),
            "flops_per_token": flops.flops_per_token(m),
            "params": int(params),
            "params_matmul": flops.matmul_params(m),
            "xla_flops_per_step": measure.xla_flops(compiled),
            "memory_analysis": measure.memory_analysis(compiled),
        }
        on_compiled(part)

        try:
            for i in range(warmup):
                state, metrics = compiled(state, batches[i % len(batches)])
            jax.block_until_ready(state)
            start = time.perf_counter()
            for i in range(steps):
                state, metrics = compiled(state, batches[(warmup + i) % len(batches)])
            jax.block_until_ready((state, metrics))
            elapsed = time.perf_counter() - start
            final_loss = float(metrics["loss"])  # after warmup + steps, profiled or not
        except Exception as e:  # e.g. out of memory: keep the compile-time record, with the error
            on_compiled(
                part
                | {
                    "error": f"{type(e).__name__}: {e}"[:4000],
                    "peak_memory_bytes": measure.peak_memory_bytes(),
                }
            )
            raise

    profile_steps, profile_dir = profile
    if profile_steps:

        def run_traced() -> None:
            out = state
            for i in range(profile_steps):
                out, _ = compiled(out, batches[i % len(batches)])
            jax.block_until_ready(out)

        try:  # the timing above stands whatever the profiler does
            part["profile"] = profile_trace.capture(
                run_traced, profile_steps, profile_dir, 1000 * elapsed / steps
            )
        except Exception as e:
            part["profile"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    tokens_per_s = steps * t.batch_size * m.seq_len / elapsed
    peak = flops.peak_tflops(jax.devices()[0].device_kind, t.peak_tflops)
    return part | {
        "tokens_per_s": tokens_per_s,
        "step_ms": 1000 * elapsed / steps,
        "mfu": flops.mfu(tokens_per_s, m, jax.device_count(), peak) if peak else None,
        "peak_tflops": peak,
        "final_loss": final_loss,
        # Fresh random tokens every step: a model that cannot see the future stays near ln(V).
        "uniform_loss": math.log(m.vocab_size),
        "peak_memory_bytes": measure.peak_memory_bytes(),
    }


def summary(r: dict[str, Any]) -> str:
    d = r["device"]
    ceiling = f"{r['ceiling_tflops']:.1f} TFLOP/s ({r['ceiling_size']}³ {r['ceiling_dtype']})"
    if r["experiment"] is None:
        return f"matmul ceiling on {d['count']} {d['kind']}: {ceiling}"
    mfu = f"MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f}, " if r["mfu"] is not None else ""
    memory = r["peak_memory_bytes"]
    suspect = r["final_loss"] < 0.5 * r["uniform_loss"]
    return (
        f"{r['experiment']} {r['batch']} on {d['count']} {d['kind']}: {r['tokens_per_s']:,.0f} tok/s, "
        f"{r['step_ms']:.1f} ms/step, {mfu}{100 * r['mfu_vs_measured']:.1f}% of measured {ceiling}, "
        f"compile {r['compile_s']:.1f} s"
        + (f", peak memory {memory / 2**30:.2f} GiB" if memory is not None else "")
        + (
            f"; WARNING: loss {r['final_loss']:.3f} on random tokens, far under ln(V) = "
            f"{r['uniform_loss']:.2f}: does attention see the future?"
            if suspect
            else ""
        )
    )


def _attention_impl(m: config.Model, batch_size: int, packed: bool) -> str:
    """The kernel `model.attention` resolves to here (plain batches carry no segment ids)."""
    q_shape = (batch_size, m.seq_len, m.n_heads, m.head_dim)
    return attention.resolve(m.attention, q_shape, m.dtype, packed, kv_heads=m.kv_heads)


if __name__ == "__main__":
    sys.exit(main())
