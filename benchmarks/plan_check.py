"""The planner's memory estimate (`lmjax.plan.memory.memory_per_device`) against XLA's analysis of the
real train step compiled on this machine's devices.

    python benchmarks/plan_check.py [--cpu] [--out DIR] [--set key=value ...]

On a GPU/TPU: gpt2_124m (batch 16, seq 1024) and llama_1b (batch 8, seq 2048) in bf16, as
their experiment files give them, under a couple of remat policies, on all devices. `--cpu`:
tiny fp32 models with scanned layers (the CPU backend computes bf16 in fp32 and shows no remat
effect on unrolled layers) under each remat policy on one device, then on meshes of up to 8
emulated CPU devices (fsdp, tensor, data), unrolled layers and a chunked loss: the rehearsal,
and the configs tests/test_plan.py has no time for. Nothing is allocated: the step is compiled
from abstract shapes. XLA's peak per device is `argument + output - alias + temp` (the state is
donated; see lmjax/plan/planner.py). The record, `OUT/plan_check-<platform><devices>.json` (`--cpu`:
`plan_check-cpu1.json`, one host's CPU), is rewritten after each config, so a run cut short
keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lmjax import attention, config, optim, sharding, step
from lmjax.plan import planner as plan
from lmjax.plan.memory import memory_per_device

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import measure  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# (experiment, overrides) measured on an accelerator, most wanted first.
ACCELERATOR = (
    ("gpt2_124m", ("train.batch_size=16", "model.seq_len=1024", "model.remat=none")),
    ("gpt2_124m", ("train.batch_size=16", "model.seq_len=1024", "model.remat=dots")),
    ("llama_1b", ("model.remat=full",)),
    ("llama_1b", ("model.remat=none",)),
)
_TINY = (
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.d_ff=256",
    "model.seq_len=128",
    "model.vocab_size=512",
    "train.batch_size=8",
    "model.dtype=float32",
    "model.scan_layers=true",
)
CPU = tuple(
    (name, (*_TINY, *extra, f"model.remat={remat}", "mesh.data=1"))
    for name, extra in (("gpt2_124m", ()), ("llama_1b", ("model.n_kv_heads=2",)))
    for remat in ("none", "full", "dots")
)
# d_model 256, 4 layers, scanned, fp32, batch 8, on meshes of emulated CPU devices.
_D256 = tuple(
    {"model.d_model=64": "model.d_model=256", "model.n_layers=2": "model.n_layers=4"}.get(o, o)
    for o in _TINY
    if not o.startswith(("model.d_ff=", "model.seq_len=", "model.scan_layers="))
) + ("model.d_ff=1024", "model.seq_len=64")
CPU += (
    ("gpt2_124m", (*_D256, "model.scan_layers=true", "mesh.data=1", "mesh.fsdp=8")),
    ("gpt2_124m", (*_D256, "model.scan_layers=true", "mesh.data=1", "mesh.fsdp=8", "train.batch_size=32")),
    ("gpt2_124m", (*_D256, "model.scan_layers=false", "mesh.data=1", "mesh.fsdp=8")),
    ("gpt2_124m", (*_D256, "model.scan_layers=true", "mesh.data=1", "mesh.tensor=4")),
    ("gpt2_124m", (*_D256, "model.scan_layers=true", "mesh.data=1", "mesh.tensor=4", "train.batch_size=16")),
    ("gpt2_124m", (*_D256, "model.scan_layers=true", "mesh.data=8")),
    ("gpt2_124m", (*_D256, "model.scan_layers=true", "mesh.data=1", "mesh.fsdp=2", "model.remat=full")),
    (
        "llama_1b",
        (*_TINY, "model.n_kv_heads=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=16"),
    ),
    ("gpt2_124m", (*_TINY, "model.vocab_size=4096", "model.loss_chunk=16", "mesh.data=1")),
    ("gpt2_124m", (*_TINY, "model.scan_layers=false", "mesh.data=1")),
    ("gpt2_124m", (*_TINY, "train.batch_size=16", "train.microbatches=4", "model.remat=full", "mesh.data=1")),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 configs: the CPU rehearsal")
    parser.add_argument("--out", default=str(RESULTS), help="folder for the JSON record")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every config")
    parser.add_argument("--first", type=int, default=0, help="only the first N configs (0: all)")
    args = parser.parse_args(argv)
    try:
        runs = [
            (plan.resolve(name, [*sets, *args.set]), [*sets, *args.set]) for name, sets in CPU if args.cpu
        ]
        runs += [(plan.resolve(n, [*s, *args.set]), [*s, *args.set]) for n, s in ACCELERATOR if not args.cpu]
        runs = runs[: args.first or None]
    except config.UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2

    if args.cpu:  # before the backend starts: the meshes' devices, emulated on the host's cores
        jax.config.update("jax_num_cpu_devices", 8)
        jax.config.update("jax_platforms", "cpu")
    name = "cpu1" if args.cpu else f"{jax.default_backend()}{jax.device_count()}"
    path = Path(args.out) / f"plan_check-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] | None = None
    for exp, overrides in runs:
        mesh, result = check(exp)
        if record is None:
            record = measure.record_header("plan_check", exp, mesh, measure.VERSIONED)
            record.pop("config")
            record |= {"peak": "argument + output - alias + temp (bytes per device)", "results": []}
        record["results"].append(
            {"experiment": exp.name, "overrides": overrides, "mesh": dict(mesh.shape)} | result
        )
        path.write_text(json.dumps(record, indent=2) + "\n")
        own = " ".join(o for o in overrides if o not in _TINY + _D256)
        print(
            f"{exp.name} {own}: plan {result['estimate']['total'] / 2**20:.2f} MiB, "
            f"XLA {result['xla_peak_bytes'] / 2**20:.2f} MiB, ratio {result['ratio']:.3f} "
            f"(compile {result['compile_s']:.1f} s)",
            flush=True,
        )
    print(f"-> {path}")
    return 0


def check(exp: config.Experiment) -> tuple[Any, dict[str, Any]]:
    """(mesh, the planner's estimate and XLA's analysis of the compiled step on all devices)."""
    n = jax.device_count()
    if jax.default_backend() == "cpu":  # the mesh's own devices of the emulated ones
        n = exp.mesh.data * exp.mesh.fsdp * exp.mesh.tensor if exp.mesh.data > 0 else n
    estimate = memory_per_device(exp, n, jax.default_backend(), attention.cuda_capability())
    mesh = sharding.make_mesh(exp, jax.devices()[:n])
    tx = optim.make(exp.optim, exp.train.steps)
    start = time.perf_counter()
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.abstract_state(exp, tx, mesh)
        train_step = step.make_train_step(graphdef, tx, exp, shardings, mesh)
        batch_sh = sharding.batch_sharding(mesh)
        shape = (exp.train.batch_size, exp.model.seq_len)
        batch = {  # shapes only: the step is compiled, never run
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
            for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32))
        }
        compiled = train_step.lower(state, batch).compile()
    xla = measure.memory_analysis(compiled) or {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    peak = xla[keys[0]] + xla[keys[1]] - xla[keys[2]] + xla[keys[3]] if all(k in xla for k in keys) else None
    return mesh, {
        "dtype": exp.model.dtype,
        "remat": exp.model.remat,
        "scan_layers": exp.model.scan_layers,
        "estimate": estimate,
        "xla": xla,
        "xla_peak_bytes": peak,
        "ratio": estimate["total"] / peak if peak else None,
        "compile_s": time.perf_counter() - start,
    }


if __name__ == "__main__":
    sys.exit(main())
