"""`python -m lmjax.plan --experiment NAME_OR_PATH [--devices 8xH100|v5p-64|cpu] [--set k=v ...] [--json]`

What a run costs before it starts, from the experiment file it trains from: parameters, FLOPs
per token and for the run, the compute-optimal token count (20 per parameter, Chinchilla) beside
the run's own, memory per device (parameters, optimizer state, gradients, activations), the wall
time at a stated MFU, and the fastest mesh and micro-batch split that fit.

Exit status: 0 when the plan fits the devices, 1 when it does not (the part that overflows is
named), 2 for bad input (one line naming the problem and the fix).

How memory is counted, per device, against XLA's own analysis of the compiled train step
(`compiled.memory_analysis()`). The state is donated, so XLA's peak per device is
`argument + output - alias + temp` bytes: the state and the batch (arguments), outputs that do
not reuse an argument's buffer (the metrics), and the temporaries (gradients, activations kept
for the backward pass, the optimizer's update). Here:

- parameters and optimizer state: every leaf's shard under `mesh.rules` (the optimizer's leaves
  from `jax.eval_shape` of the experiment's own optax transformation: AdamW's two moments,
  Muon's one momentum for the hidden matrices, nothing guessed);
- gradients: one parameter-shaped copy in param_dtype, two with micro-batches (the sum, and the
  micro-batch's own);
- activations: what the backward pass keeps, read off the model's real forward pass
  (`jax._src.ad_checkpoint.saved_residuals` of the loss under the remat policy, the attention
  kernel the target device would run, scanned or unrolled, the chunked loss), for one
  micro-batch's rows on one device, divided by `mesh.tensor` where heads, d_ff or the vocabulary
  are split; with remat, plus part of one layer's recomputed activations (what the backward pass
  holds while it recomputes a layer: RECOMPUTED_LIVE, measured on CPU).

Left out: XLA's fusion and scheduling choices (on GPU it may keep less or more), collective
buffers of FSDP/tensor parallelism, the batch itself (12 bytes a token), the compiled code,
the runtime's own reservation, packed batches (segment ids) and the evaluation step.
cuDNN attention cannot be traced off a GPU: the Pallas flash kernel, which keeps the same
(q, k, v, output, softmax statistics), stands in for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

from lmjax import config, flops, hardware
from lmjax.config import UserError

GiB = 2**30
USABLE = 0.9  # of each device's memory: what the runtime and XLA's fragmentation leave
DEFAULT_MFU = 0.40  # GPU/TPU, where no benchmark record of the card exists
TOKENS_PER_PARAM = 20  # compute-optimal (Hoffmann et al. 2022)
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PARTS = ("params", "optimizer", "gradients", "activations")
# The share of one layer's recomputed activations live at once in its backward pass (XLA frees
# them as it goes). Measured on CPU (fp32, scanned layers): 0.6 to 1.0 with remat=full, where
# the matmul outputs are recomputed too, and about 0.3 with dots/named.
RECOMPUTED_LIVE = {"full": 0.75, "dots": 0.4, "named": 0.4}


@dataclasses.dataclass(frozen=True)
class Plan:
    experiment: str
    devices: str
    device_kind: str
    n_devices: int
    mesh: dict[str, int]
    microbatches: int
    params: int
    flops_per_token: float
    tokens: int
    total_flops: float
    optimal_tokens: int
    memory: dict[str, float]  # bytes per device: PARTS and "total"
    memory_per_device: int
    usable: float
    fits: bool
    overflow: str  # "" when it fits
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
        config.mesh_shape(exp, devices.count)  # the mesh must fit the devices before jax starts
        result = plan(exp, devices)
    except UserError as e:
        print(f"lmjax.plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(result), indent=2) if args.json else render(result))
    return 0 if result.fits else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.plan", description=__doc__.split("\n\n")[1])
    parser.add_argument("--experiment", required=True, help="a shipped experiment name or a .py path")
    parser.add_argument("--devices", default="1xH100", help="e.g. 8xH100, H200, v5p-64, v5e-8, cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def resolve(name_or_path: str, overrides: list[str]) -> config.Experiment:
    """The experiment with overrides, checked; `model.vocab_size=0` (the tokenizer's size) is
    taken as `data.vocab_size`, the size the tokenizer is trained to (no tokenizer is built)."""
    exp = config.apply_overrides(config.load_experiment(name_or_path), overrides)
    config.validate(exp)
    if exp.model.vocab_size == 0:
        exp = _replace(exp, "model", vocab_size=exp.data.vocab_size)
    return exp


def plan(exp: config.Experiment, devices: hardware.Devices) -> Plan:
    """The whole plan of `exp` on `devices` (its mesh checked against their count)."""
    m, t = exp.model, exp.train
    mesh = config.mesh_shape(exp, devices.count)
    memory = memory_per_device(exp, devices.count, devices.backend, devices.capability)
    usable = USABLE * devices.memory_bytes
    tokens = t.steps * t.batch_size * m.seq_len
    total_flops = flops.flops_per_token(m) * tokens
    mfu, peak, source = mfu_estimate(exp, devices)
    hours = total_flops / (devices.count * peak * 1e12 * mfu) / 3600 if mfu and peak else None
    fit = fastest_fit(exp, devices)
    params = flops.count_params(m)
    return Plan(
        experiment=exp.name,
        devices=devices.spec,
        device_kind=devices.kind,
        n_devices=devices.count,
        mesh=dict(zip(("data", "fsdp", "tensor"), mesh, strict=True)),
        microbatches=t.microbatches,
        params=params,
        flops_per_token=flops.flops_per_token(m),
        tokens=tokens,
        total_flops=total_flops,
        optimal_tokens=TOKENS_PER_PARAM * params,
        memory=memory,
        memory_per_device=devices.memory_bytes,
        usable=usable,
        fits=memory["total"] <= usable,
        overflow=overflow_message(memory, usable, devices) if memory["total"] > usable else "",
        mfu=mfu,
        mfu_source=source,
        peak_tflops=peak,
        hours=hours,
        fit_overrides=fit[0] if fit else None,
        fit_memory=fit[1] if fit else None,
    )


# --- memory ------------------------------------------------------------------------------------


def memory_per_device(
    exp: config.Experiment,
    n_devices: int,
    backend: str = "cpu",
    capability: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Bytes per device of the train step (module docstring): PARTS and their "total".
    `backend`/`capability` pick the attention kernel as `model.attention=auto` would there."""
    data, fsdp, tensor = config.mesh_shape(exp, n_devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    params, optimizer = _state_bytes(exp, sizes)
    rows = exp.train.batch_size // exp.train.microbatches // (data * fsdp)
    cfg = dataclasses.replace(exp.model, attention=_traceable_attention(exp.model, backend, capability))
    rules = dict(exp.mesh.rules)
    activations = _activation_bytes(cfg, rows, rules, sizes)
    if cfg.remat != "none":  # the backward pass recomputes one layer at a time
        no_remat = dataclasses.replace(cfg, remat="none")
        dropped = _activation_bytes(no_remat, rows, rules, sizes) - activations
        activations += RECOMPUTED_LIVE[cfg.remat] * dropped / cfg.n_layers
    gradients = params * (2 if exp.train.microbatches > 1 else 1)
    memory = {"params": params, "optimizer": optimizer, "gradients": gradients, "activations": activations}
    return memory | {"total": sum(memory.values())}


def _state_bytes(exp: config.Experiment, sizes: dict[str, int]) -> tuple[float, float]:
    """(parameters, optimizer state) bytes per device: each leaf's shard under the rules."""
    import jax

    from lmjax import optim

    _, abstract_params = _abstract_params(exp.model)
    fractions = _local_fractions(abstract_params, dict(exp.mesh.rules), sizes)
    nbytes = lambda leaf: leaf.size * leaf.dtype.itemsize  # noqa: E731
    param_bytes = sum(
        nbytes(p) * f
        for p, f in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(fractions), strict=True)
    )
    # Optimizer leaves shaped like a parameter are sharded like it (AdamW's moments, Muon's
    # momentum); the rest (step counts, masked-out slots) are small and replicated.
    by_shape = {
        p.shape: f for p, f in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(fractions), strict=True)
    }
    tx = optim.make(exp.optim, exp.train.steps)
    opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_bytes = sum(nbytes(leaf) * by_shape.get(leaf.shape, 1.0) for leaf in jax.tree.leaves(opt_state))
    return float(param_bytes), float(opt_bytes)


def _local_fractions(abstract_params: Any, rules: dict, sizes: dict[str, int]) -> Any:
    """The parameters' tree with each leaf's value the share of it one device holds."""
    import jax

    def local_fraction(var: Any) -> Any:
        shape, names = var.get_value().shape, var.get_metadata()["out_sharding"]
        local = math.prod(
            math.ceil(n / _axes_size(rules[a], sizes)) for n, a in zip(shape, names, strict=True)
        )
        return var.replace(local / max(math.prod(shape), 1))

    return jax.tree.map(local_fraction, abstract_params, is_leaf=_is_variable)


def _axes_size(target: str | tuple[str, ...] | None, sizes: dict[str, int]) -> int:
    axes = () if target is None else (target,) if isinstance(target, str) else target
    return math.prod(sizes[a] for a in axes)


def _is_variable(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Variable)


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg: config.Model) -> Any:
    from lmjax import step

    return step.abstract_model(cfg)


def _traceable_attention(cfg: config.Model, backend: str, capability: tuple[int, int] | None) -> str:
    """The kernel `auto` picks on the target (plain causal batches); cuDNN's, which cannot be
    traced off a GPU, replaced by the Pallas flash kernel that keeps the same residuals."""
    import jax.numpy as jnp

    from lmjax import attention, attention_kernels

    q_shape = (1, cfg.seq_len, cfg.n_heads, cfg.head_dim)
    impl = attention.resolve(
        cfg.attention,
        q_shape,
        jnp.dtype(cfg.dtype),
        False,
        kv_heads=cfg.kv_heads,
        backend=backend,
        capability=capability,
    )
    if impl.startswith("cudnn"):
        return "pallas" if attention_kernels.pallas_fits(cfg.seq_len, cfg.head_dim) else "xla"
    return impl


def _activation_bytes(cfg: config.Model, rows: int, rules: dict, sizes: dict[str, int]) -> float:
    """Bytes the backward pass keeps for `rows` rows on one device, split `sizes["tensor"]`-way.
    Residuals are linear in the rows: traced at 2 and 3 rows, the dimension that grows is the
    batch's; a residual without one is a weight (counted as its shard)."""
    split_sizes = {cfg.n_heads, cfg.kv_heads, cfg.ff_dim, cfg.padded_vocab} - {
        cfg.seq_len,
        cfg.d_model,
        cfg.head_dim,
    }
    weights = _weight_fractions(cfg, rules, sizes)
    tensor = sizes["tensor"]
    total = 0.0
    for shape2, shape3, itemsize in _residuals(cfg):
        grows = [i for i, (a, b) in enumerate(zip(shape2, shape3, strict=True)) if a != b]
        if not grows:  # a weight (e.g. cast to the compute dtype): as sharded as the parameter
            total += math.prod(shape2) * itemsize * weights.get(tuple(sorted(shape2)), 1.0)
            continue
        per_row = (math.prod(shape3) - math.prod(shape2)) * itemsize
        fixed = math.prod(shape2) * itemsize - 2 * per_row
        split = any(n in split_sizes for i, n in enumerate(shape3) if i not in grows)
        total += (fixed + rows * per_row) / (tensor if split else 1)
    return total


def _weight_fractions(cfg: config.Model, rules: dict, sizes: dict[str, int]) -> dict[tuple[int, ...], float]:
    """Parameter shapes (sorted, so a transposed copy matches too) -> the share of a copy of
    that parameter (e.g. cast to the compute dtype) one device keeps."""
    import jax

    _, abstract_params = _abstract_params(cfg)
    fractions = _local_fractions(abstract_params, rules, sizes)
    shapes = [p.shape for p in jax.tree.leaves(abstract_params)]
    return {tuple(sorted(s)): f for s, f in zip(shapes, jax.tree.leaves(fractions), strict=True)}


@functools.lru_cache(maxsize=32)
def _residuals(cfg: config.Model) -> tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...]:
    """(shape at 2 rows, shape at 3 rows, bytes per element) of every residual the loss's
    backward pass keeps, parameters and the batch themselves excepted."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax._src.ad_checkpoint import saved_residuals

    from lmjax import model

    graphdef, abstract_params = _abstract_params(cfg)

    def trace(rows: int) -> list:
        batch = {
            "inputs": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
            "targets": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.float32),
        }
        loss = lambda p, b: model.loss_sums(nnx.merge(graphdef, p), b)[0]  # noqa: E731
        kept = saved_residuals(loss, abstract_params, batch)
        return [aval for aval, why in kept if "argument" not in why]

    two, three = trace(2), trace(3)
    if len(two) != len(three):
        raise RuntimeError("the forward pass keeps different residuals at 2 and 3 rows")
    return tuple((a.shape, b.shape, a.dtype.itemsize) for a, b in zip(two, three, strict=True))


# --- fitting -----------------------------------------------------------------------------------


def overflow_message(memory: dict[str, float], usable: float, devices: hardware.Devices) -> str:
    """Which part overflows (the biggest), by how much, and what to change."""
    part = max(PARTS, key=lambda p: memory[p])
    over = memory["total"] - usable
    if part == "activations":
        fix = "set model.remat=full, train.microbatches=N, model.loss_chunk or a larger mesh.data/fsdp"
    else:
        fix = "shard the state with mesh.fsdp=-1 (or mesh.tensor), or use more devices"
    return (
        f"{part} {_gib(memory[part])} of {_gib(usable)} usable per {devices.card} "
        f"(total {_gib(memory['total'])}, {_gib(over)} over): {fix}"
    )


def fastest_fit(exp: config.Experiment, devices: hardware.Devices) -> tuple[list[str], dict] | None:
    """The fastest mesh (data, fsdp, tensor) and micro-batch count on these devices that fits:
    fewest micro-batches first, then the least communication (data before fsdp before tensor);
    as --set overrides. None when nothing fits."""
    usable = USABLE * devices.memory_bytes
    for microbatches, tensor, fsdp in _candidates(exp, devices.count):
        data = devices.count // (tensor * fsdp)
        overrides = [
            f"mesh.data={data}",
            f"mesh.fsdp={fsdp}",
            f"mesh.tensor={tensor}",
            f"train.microbatches={microbatches}",
        ]
        try:
            candidate = config.apply_overrides(exp, overrides)
            config.mesh_shape(candidate, devices.count)
        except UserError:
            continue
        memory = memory_per_device(candidate, devices.count, devices.backend, devices.capability)
        if memory["total"] <= usable:
            return overrides, memory
    return None


def _candidates(exp: config.Experiment, n: int) -> list[tuple[int, int, int]]:
    divisors = lambda k: [d for d in range(1, k + 1) if k % d == 0]  # noqa: E731
    return [
        (micro, tensor, fsdp)
        for micro in divisors(exp.train.batch_size)
        for tensor in divisors(n)
        for fsdp in divisors(n // tensor)
    ]


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


def _newest_record(experiment: str, devices: hardware.Devices) -> dict | None:
    """The newest complete throughput record in benchmarks/results (any depth) on this card."""
    key = "mfu_vs_measured" if devices.backend == "cpu" else "mfu"
    found = []
    for path in sorted(RESULTS.glob("**/*.json")) if RESULTS.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        device = record.get("device") if isinstance(record, dict) else None
        kind = device.get("kind", "") if isinstance(device, dict) else ""
        if record.get(key) and record.get("complete", True) and _same_card(kind, devices):
            record["_path"] = str(path.relative_to(RESULTS.parent.parent))
            found.append((record.get("experiment") == experiment, str(record.get("date", "")), record))
    return max(found, key=lambda f: f[:2])[2] if found else None


def _same_card(kind: str, devices: hardware.Devices) -> bool:
    if devices.backend == "cpu":
        return kind == "cpu"
    return flops.peak_tflops(kind) is not None and _card_of(kind) == _card_of(devices.kind)


def _card_of(kind: str) -> str:
    """The PEAK_TFLOPS entry a device kind matches (H100 PCIe apart from H100 SXM)."""
    return next((name for name, _ in flops.PEAK_TFLOPS if name.lower() in kind.lower()), kind)


def _record_name(record: dict) -> str:
    return f"{record['_path']} ({record.get('experiment')}, {str(record.get('date', ''))[:10]})"


# --- output --------------------------------------------------------------------------------------


def render(p: Plan) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.items())
    rows = [
        f"plan for {p.experiment} on {p.devices} ({p.n_devices} x {p.device_kind}), mesh {mesh}, "
        f"{p.microbatches} micro-batch(es)",
        "",
        f"  parameters          {_count(p.params)}",
        f"  FLOPs per token     {p.flops_per_token / 1e9:,.3f} GFLOP (6N + 12·L·d·T)",
        f"  tokens              {_count(p.tokens)} this run; compute-optimal {_count(p.optimal_tokens)} "
        f"({TOKENS_PER_PARAM} per parameter; this run has {p.tokens / p.optimal_tokens:.2g}x that)",
        f"  FLOPs, whole run    {p.total_flops:.3e}",
        "",
        f"  memory per device   (of {_gib(p.memory_per_device)}, {USABLE:.0%} = {_gib(p.usable)} usable)",
    ]
    rows += [f"    {part:<17} {_gib(p.memory[part]):>12}" for part in PARTS]
    rows.append(f"    {'total':<17} {_gib(p.memory['total']):>12}  {'fits' if p.fits else 'DOES NOT FIT'}")
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


def _replace(exp: config.Experiment, section: str, **fields: Any) -> config.Experiment:
    return dataclasses.replace(exp, **{section: dataclasses.replace(getattr(exp, section), **fields)})


if __name__ == "__main__":
    sys.exit(main())
