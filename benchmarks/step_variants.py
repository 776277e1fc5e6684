"""One experiment's train step timed in several variants in one process, against the same
measured matmul ceiling: which change moves tokens/s, and by how much.

    python benchmarks/step_variants.py --experiment gpt2_124m [--set key=value ...] \\
        --variant base= --variant no_triton_gemm=xla:xla_gpu_enable_triton_gemm=false \\
        --variant batch32=train.batch_size=32 [--steps N] [--warmup N] [--out DIR]

A variant is NAME=ITEM,ITEM,... where an item is a config override (`model.remat=dots`) or an
XLA compile option (`xla:xla_gpu_enable_triton_gemm=false`, applied to this step's compile
only); an empty list is the experiment as given. Each variant is measured exactly as
`throughput.py` measures a run (random tokens, batches pre-placed). The record
`OUT/variants-<experiment>-<platform><devices>.json` is rewritten after every variant, so a
run cut short keeps what it measured; a variant that fails (out of memory, an option this
jaxlib lacks) is recorded with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
from pathlib import Path
from typing import Any

import jax

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import measure  # noqa: E402
import throughput  # noqa: E402

from lmjax.config import UserError  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str], list[str]]:
    """'NAME=a=1,xla:b=2' -> (NAME, config overrides, XLA options)."""
    name, sep, items = text.partition("=")
    if not sep or not name:
        raise UserError(f"--variant {text!r}: use NAME=key=value,xla:option=value,... (NAME= for none)")
    overrides, options = [], []
    for item in filter(None, items.split(",")):
        (options if item.startswith("xla:") else overrides).append(item.removeprefix("xla:"))
    return name, overrides, options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ITEMS", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(throughput.RESULTS))
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v) for v in args.variant]
        runs = []
        for name, overrides, options in variants:  # every variant checked before jax starts
            run_args = throughput.parse_args(
                ["--experiment", args.experiment, "--steps", str(args.steps), "--warmup", str(args.warmup)]
                + [f"--set={s}" for s in (*args.set, *overrides)]
                + [f"--xla={o}" for o in options]
            )
            runs.append((name, overrides, run_args, *throughput.resolve(run_args)))
    except UserError as e:
        print(f"step_variants: error: {e}", file=sys.stderr)
        return 2
    path = Path(args.out) / f"variants-{runs[0][3].name}-{jax.devices()[0].platform}{jax.device_count()}.json"
    record: dict[str, Any] = {
        "benchmark": "step_variants",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "experiment": runs[0][3].name,
        "device_kind": jax.devices()[0].device_kind,
        "versions": measure.versions(),
        "timing": throughput.TIMING,
        "base_overrides": args.set,
        "variants": {},
    }
    record |= throughput.ceiling(runs[0][2], runs[0][3])
    for name, overrides, run_args, exp, vocab_source in runs:
        result: dict[str, Any] = {"overrides": overrides, "compiler_options": run_args.compiler_options}
        try:
            result["record"] = throughput.run_step(run_args, exp, vocab_source)
        except Exception as e:  # recorded; the next variant still runs
            result["error"] = f"{type(e).__name__}: {e}"[:2000]
        gc.collect()  # the last variant's state goes before the next one's is made
        record["variants"][name] = _brief(result, record["ceiling_tflops"])
        throughput.write(path, record)
        print(f"{name}: {_line(record['variants'][name])}", flush=True)
    print(f"-> {path}")
    return 0


def _brief(result: dict[str, Any], ceiling_tflops: float) -> dict[str, Any]:
    """A variant's numbers against the shared ceiling (its whole throughput record kept too)."""
    r = result.get("record")
    if r is None or "tokens_per_s" not in r:
        return result
    return result | {
        "tokens_per_s": r["tokens_per_s"],
        "step_ms": r["step_ms"],
        "compile_s": r["compile_s"],
        "mfu_vs_measured": throughput.mfu_vs_measured(r, ceiling_tflops),
        "peak_memory_bytes": r["peak_memory_bytes"],
    }


def _line(v: dict[str, Any]) -> str:
    if "tokens_per_s" not in v:
        return f"failed: {v.get('error', '?')[:300]}"
    return (
        f"{v['tokens_per_s']:,.0f} tok/s, {v['step_ms']:.2f} ms/step, {100 * v['mfu_vs_measured']:.1f}% of "
        f"measured, compile {v['compile_s']:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
