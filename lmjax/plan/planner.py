"""`python -m lmjax.plan --experiment NAME_OR_PATH [--devices 8xH100|v5p-64|cpu] [--set k=v ...] [--json]`

What a run costs before it starts, from the experiment file it trains from: parameters, FLOPs
per token and for the run, the compute-optimal token count (20 per parameter, Chinchilla) beside
the run's own, memory per device (parameters, optimizer state, gradients, activations), the wall
time at a stated MFU, and the fastest mesh and micro-batch split that fit.

Memory is judged "fits" at most FIT_MARGIN (90%) of the usable memory, "tight" above that (exit
status 0, with a line saying what to lower), "does not fit" above all of it.

Exit status: 0 when the plan fits the devices, 1 when it does not (the part that overflows is
named) or when the experiment's own mesh/batch does not fit the device count (one note line; the
plan is then of the fastest mesh and micro-batch count that does), 2 for bad input (one line
naming the problem and the fix).

How memory is counted, per device, against XLA's own analysis of the compiled train step, and
what that leaves out: `lmjax/plan/memory.py`.

Usable memory: on a GPU the pool JAX preallocates, XLA_PYTHON_CLIENT_MEM_FRACTION (default 75%;
lmjax.train leaves it), with a hint when a plan fits only at 0.92; on a TPU or the host, 90%.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmjax import config, flops, sharding
from lmjax.config import UserError
from lmjax.plan import hardware
from lmjax.plan.hardware import GiB
from lmjax.plan.memory import memory_per_device

USABLE = 0.9  # of a TPU's or the host's memory: what the runtime and XLA's fragmentation leave
GPU_POOL = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION: the pool it preallocates on a GPU
GPU_POOL_HINT = 0.92  # the fraction the hint suggests when a plan needs more than the default pool
# "fits" only with this share of the usable memory or less: the estimate is not exact (memory.py),
# and a step using the last few percent fails on fragmentation; between it and 100% is "tight".
FIT_MARGIN = 0.9
DEFAULT_MFU = 0.40  # GPU/TPU, where no benchmark record of the card exists
TOKENS_PER_PARAM = 20  # compute-optimal (Hoffmann et al. 2022)
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
PARTS = ("params", "optimizer", "gradients", "activations")
Fit = tuple[list[str], dict[str, float]]  # (--set overrides, memory per device as in Plan.memory)
BenchmarkRecord = dict[str, Any]  # a benchmarks/results JSON file: values of any JSON kind


@dataclasses.dataclass(frozen=True)
class Plan:
    experiment: str
    devices: str
    device_kind: str
    n_devices: int
    mesh: dict[str, int]
    microbatches: int
    mesh_note: str  # "" when the experiment's own mesh and batch fit the device count
    params: int
    flops_per_token: float
    tokens: int
    total_flops: float
    optimal_tokens: int
    memory: dict[str, float]  # bytes per device: PARTS and "total"
    memory_per_device: int
    usable_fraction: float
    usable: float
    fits: bool  # within the usable memory (the exit status); `verdict` says how close
    verdict: str  # "fits" (at most FIT_MARGIN of the usable), "tight" (above it), "does not fit"
    overflow: str  # "" when it fits
    hint: str  # e.g. the GPU pool fraction it would fit with; "" if none
    mfu: float | None
    mfu_source: str
    peak_tflops: float | None
    hours: float | None
    fit_overrides: list[str] | None  # the fastest mesh/micro-batches that fit; None if none does
    fit_memory: dict[str, float] | None


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        exp = resolve(args.experiment, args.set)
        devices = hardware.parse(args.devices)
        result = plan(exp, devices)
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else render(result))
    return 0 if result.fits and not result.mesh_note else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.plan", description=__doc__.split("\n\n")[1])
    parser.add_argument("--experiment", required=True, help="a shipped experiment name or a .py path")
    parser.add_argument(
        "--devices", default="1xH100", help="e.g. 8xH100, H200, v5p-64, v5e-8 (v5litepod-8), cpu"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def resolve(name_or_path: str, overrides: list[str]) -> config.Experiment:
    """The experiment with overrides, checked; `model.vocab_size=0` (the tokenizer's size) is
    taken as `data.vocab_size`, the size the tokenizer is trained to (no tokenizer is built)."""
    exp = config.apply_overrides(config.load_experiment(name_or_path), overrides)
    config.validate(exp)
    if exp.model.vocab_size == 0:
        exp = config.apply_overrides(exp, [f"model.vocab_size={exp.data.vocab_size}"])
    return exp


def usable_fraction(backend: str) -> float:
    """The share of a device's memory a train step may use: on a GPU, the pool JAX
    preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75; lmjax.train leaves it); on a
    TPU or the host, USABLE."""
    if backend != "gpu":
        return USABLE
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        fraction = float(raw) if raw else GPU_POOL
    except ValueError:
        raise UserError(
            f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} is not a number; set it to e.g. 0.92"
        ) from None
    if not 0 < fraction <= 1:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw} is outside (0, 1]; set it to e.g. 0.92")
    return fraction


def plan(exp: config.Experiment, devices: hardware.Devices) -> Plan:
    """The whole plan of `exp` on `devices`. Where the experiment's own mesh or batch does not
    fit their count, `mesh_note` says so in one line and the plan is of the fastest mesh and
    micro-batch count that does (or, when none does, of the nearest batch size that splits)."""
    note, fit = "", fastest_fit(exp, devices)
    try:
        sharding.mesh_shape(exp, devices.count)
    except UserError as e:
        note = f"the experiment's mesh and batch do not fit {devices.count} devices ({e})"
        planned = _nearest_valid(exp, devices, fit)
        if planned is None:
            n = devices.count
            below, above = n * (exp.train.batch_size // n), n * -(-exp.train.batch_size // n)
            sizes = f"{below} or {above}" if below else f"{above}"
            note += (
                f"; train.batch_size={exp.train.batch_size} cannot be split over them at any mesh: "
                f"a multiple of {n} can, e.g. --set train.batch_size={sizes}"
            )
            exp = config.apply_overrides(exp, [f"train.batch_size={above}"])
            fit = fastest_fit(exp, devices)
            planned = _nearest_valid(exp, devices, fit)
            planned = planned and [f"train.batch_size={above}", *planned]
        if planned is None:
            raise UserError(f"{note}; no mesh of {devices.count} devices fits this model either") from None
        exp = config.apply_overrides(exp, planned)
        note += f"; planned with {' '.join(f'--set {o}' for o in planned)}"
    m, t = exp.model, exp.train
    mesh = sharding.mesh_shape(exp, devices.count)
    memory = memory_per_device(exp, devices.count, devices.backend, devices.capability)
    fraction = usable_fraction(devices.backend)
    usable = fraction * devices.memory_bytes
    fits = memory["total"] <= usable
    tokens = t.steps * t.batch_size * m.seq_len
    total_flops = flops.flops_per_token(m) * tokens
    mfu, peak, source = mfu_estimate(exp, devices)
    # Emulated CPU devices (Nxcpu) share the host's cores: the host's speed, not N times it.
    parallel = 1 if devices.backend == "cpu" else devices.count
    hours = total_flops / (parallel * peak * 1e12 * mfu) / 3600 if mfu and peak else None
    params = flops.count_params(m)
    return Plan(
        experiment=exp.name,
        devices=devices.spec,
        device_kind=devices.kind,
        n_devices=devices.count,
        mesh=dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)),
        microbatches=t.microbatches,
        mesh_note=note,
        params=params,
        flops_per_token=flops.flops_per_token(m),
        tokens=tokens,
        total_flops=total_flops,
        optimal_tokens=TOKENS_PER_PARAM * params,
        memory=memory,
        memory_per_device=devices.memory_bytes,
        usable_fraction=fraction,
        usable=usable,
        fits=fits,
        verdict=verdict(memory["total"], usable),
        overflow="" if fits else overflow_message(memory, usable, devices),
        hint=_pool_hint(memory["total"], devices) if not fits else "",
        mfu=mfu,
        mfu_source=source,
        peak_tflops=peak,
        hours=hours,
        fit_overrides=fit[0] if fit else None,
        fit_memory=fit[1] if fit else None,
    )


def verdict(total: float, usable: float) -> str:
    """ "fits" within FIT_MARGIN of the usable memory, "tight" above it, "does not fit" above all of it."""
    if total > usable:
        return "does not fit"
    return "fits" if total <= FIT_MARGIN * usable else "tight"


def _nearest_valid(exp: config.Experiment, devices: hardware.Devices, fit: Fit | None) -> list[str] | None:
    """The fastest fitting overrides, else the fastest mesh and micro-batch count that at least
    divide the batch and the model (None when none does)."""
    return fit[0] if fit else next(_candidate_overrides(exp, devices.count), None)


def _pool_hint(total: float, devices: hardware.Devices) -> str:
    if devices.backend != "gpu" or os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"):
        return ""
    if total <= GPU_POOL_HINT * devices.memory_bytes:
        return (
            f"it fits with XLA_PYTHON_CLIENT_MEM_FRACTION={GPU_POOL_HINT} in the environment "
            f"(JAX preallocates {GPU_POOL:.0%} of a GPU's memory by default)"
        )
    return ""


# --- fitting -----------------------------------------------------------------------------------


def overflow_message(memory: dict[str, float], usable: float, devices: hardware.Devices) -> str:
    """What overflows (a part bigger than the usable memory, else the total), by how much
    (total - usable), and what to change."""
    part = max(PARTS, key=lambda p: memory[p])
    over = memory["total"] - usable
    if part == "activations":
        fix = "set model.remat=full, train.microbatches=N, model.loss_chunk or a larger mesh.data/fsdp"
    else:
        fix = "shard the state with mesh.fsdp=-1 (or mesh.tensor), or use more devices"
    if memory[part] > usable:
        return (
            f"{part} {_gib(memory[part])} of {_gib(usable)} usable per {devices.card} "
            f"(total {_gib(memory['total'])}, {_gib(over)} over): {fix}"
        )
    return (
        f"total {_gib(memory['total'])} of {_gib(usable)} usable per {devices.card} ({_gib(over)} over); "
        f"largest part: {part} {_gib(memory[part])}: {fix}"
    )


def fastest_fit(exp: config.Experiment, devices: hardware.Devices) -> Fit | None:
    """The fastest mesh (data, fsdp, tensor) and micro-batch count on these devices that fits:
    fewest micro-batches first, then the least communication (data before fsdp before tensor);
    as --set overrides. None when nothing fits."""
    usable = usable_fraction(devices.backend) * devices.memory_bytes
    for overrides in _candidate_overrides(exp, devices.count):
        candidate = config.apply_overrides(exp, overrides)
        memory = memory_per_device(candidate, devices.count, devices.backend, devices.capability)
        if memory["total"] <= usable:
            return overrides, memory
    return None


def _candidate_overrides(exp: config.Experiment, n: int) -> Iterator[list[str]]:
    """Mesh and micro-batch overrides that divide the batch and the model, fastest first."""
    divisors = lambda k: [d for d in range(1, k + 1) if k % d == 0]  # noqa: E731
    for micro in divisors(exp.train.batch_size):
        for tensor in divisors(n):
            for fsdp in divisors(n // tensor):
                overrides = [
                    f"mesh.data={n // (tensor * fsdp)}",
                    f"mesh.fsdp={fsdp}",
                    f"mesh.tensor={tensor}",
                    f"train.microbatches={micro}",
                ]
                try:
                    sharding.mesh_shape(config.apply_overrides(exp, overrides), n)
                except UserError:
                    continue
                yield overrides


# --- time ----------------------------------------------------------------------------------------


def mfu_estimate(exp: config.Experiment, devices: hardware.Devices) -> tuple[float | None, float | None, str]:
    """(MFU, peak TFLOP/s per device, where they come from): the newest benchmark record of
    this card (this experiment's first), else DEFAULT_MFU of the datasheet peak. On CPU, the
    record's fraction of its measured matmul ceiling, and that ceiling as the peak."""
    record = _newest_record(exp.name, devices)
    if devices.backend == "cpu":
        if record and record.get("mfu_vs_measured") and record.get("ceiling_tflops"):
            source = f"{_record_name(record)}: {record['mfu_vs_measured']:.0%} of a measured matmul"
            return record["mfu_vs_measured"], record["ceiling_tflops"], source
        return None, None, "no CPU throughput record in benchmarks/results: no time estimate"
    if record:
        return record["mfu"], devices.peak_tflops, f"measured: {_record_name(record)}"
    return DEFAULT_MFU, devices.peak_tflops, f"default {DEFAULT_MFU:.0%}: no benchmark record of this card"


def _newest_record(experiment: str, devices: hardware.Devices) -> BenchmarkRecord | None:
    """The newest complete throughput record in benchmarks/results (any depth) on this card, of
    this experiment and on plain rows where there is one; never one whose loss says its model
    saw the future."""
    key = "mfu_vs_measured" if devices.backend == "cpu" else "mfu"
    found = []
    for path in sorted(RESULTS.glob("**/*.json")) if RESULTS.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        device = record.get("device") if isinstance(record, dict) else None
        kind = device.get("kind", "") if isinstance(device, dict) else ""
        usable = record.get(key) and record.get("complete", True) and not _saw_the_future(record)
        if usable and _same_card(kind, devices):
            record["_path"] = str(path.relative_to(RESULTS.parent.parent))
            plain = record.get("batch", "plain") == "plain"  # packed rows run a different kernel
            found.append((record.get("experiment") == experiment, plain, str(record.get("date", "")), record))
    return max(found, key=lambda f: f[:3])[3] if found else None


def _saw_the_future(record: BenchmarkRecord) -> bool:
    """A causal model's loss on random tokens stays near ln(V); one far under it attended to
    later tokens, so the step it timed is not the model's (throughput.py warns of the same)."""
    vocab = record.get("config", {}).get("model", {}).get("vocab_size", 0)
    loss = record.get("final_loss")
    return bool(vocab) and loss is not None and loss < 0.5 * math.log(vocab)


def _same_card(kind: str, devices: hardware.Devices) -> bool:
    if devices.backend == "cpu":
        return kind == "cpu"
    return flops.peak_tflops(kind) is not None and _card_of(kind) == _card_of(devices.kind)


def _card_of(kind: str) -> str:
    """The PEAK_TFLOPS entry a device kind matches (H100 PCIe apart from H100 SXM)."""
    kind = hardware.canonical_kind(kind)
    return next((name for name, _ in flops.PEAK_TFLOPS if name.lower() in kind.lower()), kind)


def _record_name(record: BenchmarkRecord) -> str:
    return f"{record['_path']} ({record.get('experiment')}, {str(record.get('date', ''))[:10]})"


# --- output --------------------------------------------------------------------------------------


def render(p: Plan) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.items())
    pool = " (JAX's GPU pool)" if p.device_kind.startswith("NVIDIA") else ""
    rows = [
        f"plan for {p.experiment} on {p.devices} ({p.n_devices} x {p.device_kind}), mesh {mesh}, "
        f"{p.microbatches} micro-batch(es)",
        *([f"  note: {p.mesh_note}"] if p.mesh_note else []),
        "",
        f"  parameters          {_count(p.params)}",
        f"  FLOPs per token     {p.flops_per_token / 1e9:,.3f} GFLOP (6N + 12·L·d·T)",
        f"  tokens              {_count(p.tokens)} this run; compute-optimal {_count(p.optimal_tokens)} "
        f"({TOKENS_PER_PARAM} per parameter; this run has {p.tokens / p.optimal_tokens:.2g}x that)",
        f"  FLOPs, whole run    {p.total_flops:.3e}",
        "",
        f"  memory per device   (of {_gib(p.memory_per_device)}, {p.usable_fraction:.0%} = "
        f"{_gib(p.usable)} usable{pool})",
    ]
    rows += [f"    {part:<17} {_gib(p.memory[part]):>12}" for part in PARTS]
    shown = {"fits": f"fits (within {FIT_MARGIN:.0%} of usable)", "does not fit": "DOES NOT FIT"}
    rows.append(f"    {'total':<17} {_gib(p.memory['total']):>12}  {shown.get(p.verdict, p.verdict.upper())}")
    rows.append("")
    if p.hours is not None:
        rows.append(
            f"  wall time           {_duration(p.hours)} at {p.mfu:.0%} MFU of {p.peak_tflops:,.4g} "
            f"TFLOP/s per device ({p.mfu_source})"
        )
    else:
        rows.append(f"  wall time           unknown ({p.mfu_source})")
    if not p.fits:
        rows.append(f"  does not fit: {p.overflow}")
    elif p.verdict == "tight":
        rows.append(
            f"  tight: {p.memory['total'] / p.usable:.0%} of the usable memory, above the {FIT_MARGIN:.0%} "
            "the estimate's error leaves; lower train.batch_size, raise train.microbatches or set model.remat"
        )
    if p.hint:
        rows.append(f"  hint: {p.hint}")
    if p.fit_overrides:
        sets = " ".join(f"--set {o}" for o in p.fit_overrides)
        rows.append(f"  fastest that fits   {sets}  ({_gib(p.fit_memory['total'])} per device)")
    else:
        rows.append(
            "  fastest that fits   none on these devices at any mesh and micro-batch count: "
            "try model.remat=full, more devices or a smaller model"
        )
    return "\n".join(rows)


def _count(n: float) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:,.1f} MiB"


def _duration(hours: float) -> str:
    return str(datetime.timedelta(seconds=round(hours * 3600)))


if __name__ == "__main__":
    sys.exit(main())
