"""`python -m lmjax.plan --experiment NAME_OR_PATH [--devices 8xH100|v5p-64|cpu] [--set k=v ...] [--json]`

What a run costs before it starts, from the experiment file it trains from: parameters, FLOPs
per token and for the run, the compute-optimal token count (20 per parameter, Chinchilla) beside
the run's own, memory per device (parameters, optimizer state, gradients, activations), the wall
time at a stated MFU, and the fastest mesh and micro-batch split that fit.

Exit status: 0 when the plan fits the devices, 1 when it does not (the part that overflows is
named) or when the experiment's own mesh/batch does not fit the device count (one note line; the
plan is then of the fastest mesh and micro-batch count that does), 2 for bad input (one line
naming the problem and the fix).

How memory is counted, per device, against XLA's own analysis of the compiled train step
(`compiled.memory_analysis()`). The state is donated, so XLA's peak per device is
`argument + output - alias + temp` bytes. Here:

- parameters and optimizer state: every leaf's shard under `mesh.rules` (the optimizer's leaves
  from `jax.eval_shape` of the experiment's own optax transformation: AdamW's two moments,
  Muon's one momentum for the hidden matrices, nothing guessed); with weights split over the
  batch axes (FSDP), one layer's weights all-gathered in the compute dtype on top;
- gradients: one parameter-shaped copy in param_dtype, two with micro-batches (the sum, and the
  micro-batch's own); with FSDP, one layer's whole gradient before its reduce-scatter on top;
- activations: what the backward pass keeps, read off the train step's own objective
  (`model.loss_terms`, z-loss included) with `jax._src.ad_checkpoint.saved_residuals` (private,
  present from jax 0.4 to 0.11; a jax without it is one error line) under the remat policy, the
  attention kernel the target device would run, scanned or unrolled, the chunked loss; for one
  micro-batch's rows on one device. Each residual is split over the mesh axes its dimensions'
  logical axes map to (act_heads, act_mlp, act_vocab... read off a second trace of the model at
  probe sizes; the residual stream, act_embed, is not split over tensor by default). On top:
  part of one layer's residuals that its backward pass holds (BACKWARD_LIVE: gradients, and
  with remat what it recomputes), and with `model.loss_chunk` a chunk's recomputed logits and
  their gradient. Unrolled layers without remat: UNROLLED_KEPT of the layers' residuals (XLA
  fuses elementwise ones away). Constants measured on CPU (fp32).

Usable memory: on a GPU the pool JAX preallocates, XLA_PYTHON_CLIENT_MEM_FRACTION (default 75%;
lmjax.train leaves it), with a hint when a plan fits only at 0.92; on a TPU or the host, 90%.

Left out: XLA's fusion and scheduling choices beyond those (on GPU it may keep less or more),
collective buffers, the batch itself (12 bytes a token), the compiled code, the runtime's own
reservation, packed batches (segment ids) and the evaluation step. cuDNN attention cannot be
traced off a GPU: the Pallas flash kernel, which keeps the same (q, k, v, output, softmax
statistics), stands in for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lmjax import config, flops, hardware
from lmjax.config import UserError

GiB = 2**30
USABLE = 0.9  # of a TPU's or the host's memory: what the runtime and XLA's fragmentation leave
GPU_POOL = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION: the pool it preallocates on a GPU
GPU_POOL_HINT = 0.92  # the fraction the hint suggests when a plan needs more than the default pool
DEFAULT_MFU = 0.40  # GPU/TPU, where no benchmark record of the card exists
TOKENS_PER_PARAM = 20  # compute-optimal (Hoffmann et al. 2022)
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PARTS = ("params", "optimizer", "gradients", "activations")
# The share of one layer's residuals (beyond its input) that its backward pass holds at once on
# top of all the residuals: the activations' gradients, and with remat what it recomputes (XLA
# frees them as it goes). Measured on CPU (fp32, scanned layers): about 0.5 without remat, 0.6
# to 1.0 with remat=full (the matmul outputs are recomputed too), 0.3 to 0.4 with dots/named.
BACKWARD_LIVE = {"none": 0.5, "full": 0.75, "dots": 0.4, "named": 0.4}
# Unrolled layers without remat: the share of the layers' traced residuals XLA keeps (it fuses
# elementwise ones into their consumers, which a scan's stacked residuals rule out). CPU: 0.6-0.7.
UNROLLED_KEPT = 0.6


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
    fits: bool
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
        exp = _replace(exp, "model", vocab_size=exp.data.vocab_size)
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
        config.mesh_shape(exp, devices.count)
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
    mesh = config.mesh_shape(exp, devices.count)
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
        overflow="" if fits else overflow_message(memory, usable, devices),
        hint=_pool_hint(memory["total"], devices) if not fits else "",
        mfu=mfu,
        mfu_source=source,
        peak_tflops=peak,
        hours=hours,
        fit_overrides=fit[0] if fit else None,
        fit_memory=fit[1] if fit else None,
    )


def _nearest_valid(
    exp: config.Experiment, devices: hardware.Devices, fit: tuple[list[str], dict] | None
) -> list[str] | None:
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
    rules = dict(exp.mesh.rules)
    params, optimizer = _state_bytes(exp, sizes)
    rows = exp.train.batch_size // exp.train.microbatches // (data * fsdp)
    cfg = dataclasses.replace(exp.model, attention=_traceable_attention(exp.model, backend, capability))
    activations = _activation_bytes(cfg, rows, rules, sizes)
    kept = {
        r: _activation_bytes(dataclasses.replace(cfg, remat=r), rows, rules, sizes) for r in ("none", "full")
    }
    layers = kept["none"] - kept["full"]  # the layers' residuals beyond each layer's input
    if not cfg.scan_layers and cfg.remat == "none":  # XLA fuses some away (no scan stacks them)
        activations -= (1 - UNROLLED_KEPT) * layers
    # The layer the backward pass is in: its gradients, and with remat what it recomputes.
    dropped = layers if cfg.remat in ("none", "full") else kept["none"] - activations
    activations += BACKWARD_LIVE[cfg.remat] * dropped / cfg.n_layers
    activations += _loss_working_set(cfg, rows, rules, sizes)
    gradients = params * (2 if exp.train.microbatches > 1 else 1)
    # Weights sharded over the batch axes (FSDP) are all-gathered a layer at a time, and each
    # layer's gradient exists whole before its reduce-scatter.
    gathered = _gathered_layer_bytes(cfg, rules, sizes)
    memory = {
        "params": params + gathered,
        "optimizer": optimizer,
        "gradients": gradients + gathered,
        "activations": activations,
    }
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


def _gathered_layer_bytes(cfg: config.Model, rules: dict, sizes: dict[str, int]) -> float:
    """One layer's weights in the compute dtype as the matmuls use them: gathered over the
    batch axes (data, fsdp), still split over tensor. 0 when no layer weight is split over
    the batch axes (nothing is gathered)."""
    import jax
    import jax.numpy as jnp

    _, abstract_params = _abstract_params(cfg)
    layers = abstract_params["layers"]
    unsplit = {**sizes, "data": 1, "fsdp": 1}
    held = jax.tree.leaves(_local_fractions(layers, rules, sizes))
    used = jax.tree.leaves(_local_fractions(layers, rules, unsplit))
    if all(math.isclose(h, u) for h, u in zip(held, used, strict=True)):
        return 0.0
    itemsize = jnp.dtype(cfg.dtype).itemsize
    return sum(
        p.size / cfg.n_layers * itemsize * u for p, u in zip(jax.tree.leaves(layers), used, strict=True)
    )


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


def _axes(target: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _axes_size(target: str | tuple[str, ...] | None, sizes: dict[str, int]) -> int:
    return math.prod(sizes[a] for a in _axes(target))


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


# A residual's dimension that is one of these (read off a trace of a probe model, below) is
# split like the activation axis the model constrains it to; a weight's, like the parameter axis.
ACTIVATION_AXES = ("act_heads", "act_kv_heads", "act_mlp", "act_vocab", "act_embed")
PARAM_AXIS = {
    "act_heads": "heads",
    "act_kv_heads": "kv_heads",
    "act_mlp": "mlp",
    "act_vocab": "vocab",
    "act_embed": "embed",
}


@dataclasses.dataclass(frozen=True)
class Residual:
    at2: tuple[int, ...]  # shape at 2 rows
    at3: tuple[int, ...]  # shape at 3 rows
    itemsize: int
    axes: tuple[str | None, ...]  # each dimension's logical axis (ACTIVATION_AXES) or None


def _activation_bytes(cfg: config.Model, rows: int, rules: dict, sizes: dict[str, int]) -> float:
    """Bytes the backward pass keeps for `rows` rows on one device. Residuals are linear in the
    rows (traced at 2 and 3 rows, the dimension that grows is the batch's); each is split over
    the mesh axes its other dimensions' logical axes map to. A residual without a batch
    dimension is a weight (e.g. cast to the compute dtype), split like the parameter."""
    batch_axes = set(_axes(rules["act_batch"]))
    total = 0.0
    for r in _residuals(cfg):
        grows = {i for i, (a, b) in enumerate(zip(r.at2, r.at3, strict=True)) if a != b}
        if grows:
            names = {rules[a] for i, a in enumerate(r.axes) if a and i not in grows}
        else:
            names = {rules[PARAM_AXIS[a]] for a in r.axes if a}
        split_over = {axis for target in names for axis in _axes(target)} - (batch_axes if grows else set())
        split = math.prod(sizes[a] for a in split_over)
        if not grows:
            total += math.prod(r.at2) * r.itemsize / split
            continue
        per_row = (math.prod(r.at3) - math.prod(r.at2)) * r.itemsize
        fixed = math.prod(r.at2) * r.itemsize - 2 * per_row
        total += (fixed + rows * per_row) / split
    return total


def _loss_working_set(cfg: config.Model, rows: int, rules: dict, sizes: dict[str, int]) -> float:
    """What the loss's backward pass holds beyond the residuals: the fp32 gradient of the
    logits; with `model.loss_chunk`, a chunk's logits recomputed (in the compute dtype and in
    fp32, and their exponent) beside it."""
    import jax.numpy as jnp

    vocab = cfg.padded_vocab / _axes_size(rules["act_vocab"], sizes)
    if not cfg.loss_chunk:  # the gradient takes the buffer of the logits' exponent, a residual
        return 0.0
    per_logit = 3 * 4 + (jnp.dtype(cfg.dtype).itemsize if jnp.dtype(cfg.dtype) != jnp.float32 else 0)
    return rows * cfg.loss_chunk * vocab * per_logit


@functools.lru_cache(maxsize=32)
def _residuals(cfg: config.Model) -> tuple[Residual, ...]:
    """Every residual the train step's backward pass keeps (parameters and the batch
    themselves excepted), with the logical axis of each dimension: the model is traced again
    with heads, kv heads, d_ff, vocabulary and d_model set to sizes nothing else has (the
    probe), and a dimension of that size is that axis. Where the probe's residuals do not
    line up with the model's, no dimension is taken as split (an over-estimate)."""
    two, three = _trace(cfg, 2), _trace(cfg, 3)
    if len(two) != len(three):
        raise RuntimeError("the forward pass keeps different residuals at 2 and 3 rows")
    probe, names = _probe(cfg)
    probed = _trace(probe, 2)
    real = {  # the model's own size of each axis
        "act_heads": cfg.n_heads,
        "act_kv_heads": cfg.kv_heads,
        "act_mlp": cfg.ff_dim,
        "act_vocab": cfg.padded_vocab,
        "act_embed": cfg.d_model,
    }
    lined_up = len(probed) == len(two) and all(
        p.ndim == a.ndim and p.dtype == a.dtype for p, a in zip(probed, two, strict=True)
    )
    out = []
    for i, (a, b) in enumerate(zip(two, three, strict=True)):
        axes: tuple[str | None, ...] = (None,) * a.ndim
        if lined_up:
            axes = tuple(names.get(n) for n in probed[i].shape)
            if any(
                (real[x] if x else p) != n for x, p, n in zip(axes, probed[i].shape, a.shape, strict=True)
            ):
                axes = (None,) * a.ndim  # a dimension the probe moved that is none of the axes
        out.append(Residual(a.shape, b.shape, a.dtype.itemsize, axes))
    return tuple(out)


def _probe(cfg: config.Model) -> tuple[config.Model, dict[int, str]]:
    """`cfg` with heads, kv heads, d_ff, vocabulary and d_model at sizes distinct from each
    other and from every size they leave alone; {size: the logical axis it is}."""
    group = cfg.n_heads // cfg.kv_heads
    taken = {1, 2, 3, cfg.seq_len, cfg.head_dim, cfg.n_layers, cfg.loss_chunk}
    if cfg.loss_chunk:
        taken.add(cfg.seq_len // cfg.loss_chunk)
    for k in (5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47):
        heads, kv = k * group, k
        sizes = {
            "act_heads": heads,
            "act_kv_heads": kv,
            "act_embed": heads * cfg.head_dim,
            "act_mlp": 4 * heads * cfg.head_dim + 2 * k,
            "act_vocab": 128 * (2 * heads * cfg.head_dim // 128 + 3),
        }
        values = [v for a, v in sizes.items() if a != "act_kv_heads" or group > 1]
        if len(set(values)) == len(values) and not set(values) & taken:
            probe = dataclasses.replace(
                cfg,
                n_heads=heads,
                n_kv_heads=kv if group > 1 else 0,
                d_model=sizes["act_embed"],
                d_ff=sizes["act_mlp"],
                vocab_size=sizes["act_vocab"],
            )
            names = {v: a for a, v in sizes.items() if a != "act_kv_heads" or group > 1}
            return probe, names
    return cfg, {}


def _trace(cfg: config.Model, rows: int) -> list:
    """The avals of the residuals the train step's objective keeps for `rows` rows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lmjax import model

    graphdef, abstract_params = _abstract_params(cfg)
    batch = {
        "inputs": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
        "targets": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.float32),
    }

    def objective(p: Any, b: dict) -> Any:  # as step.make_train_step differentiates it
        ce_sum, z_sum, _ = model.loss_terms(nnx.merge(graphdef, p), b)
        return ce_sum + cfg.z_loss * z_sum if cfg.z_loss else ce_sum

    kept = _saved_residuals()(objective, abstract_params, batch)
    return [aval for aval, why in kept if "argument" not in why]


def _saved_residuals() -> Any:
    """jax's `saved_residuals` (private, in jax 0.4 to 0.11 alike), or one clear error."""
    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError as e:
        import jax

        raise UserError(
            f"jax {jax.__version__} has no jax._src.ad_checkpoint.saved_residuals, which the "
            "planner reads activations with; install the jax version pyproject.toml pins"
        ) from e
    return saved_residuals


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


def fastest_fit(exp: config.Experiment, devices: hardware.Devices) -> tuple[list[str], dict] | None:
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


def _candidate_overrides(exp: config.Experiment, n: int) -> Any:
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
                    config.mesh_shape(config.apply_overrides(exp, overrides), n)
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
    kind = hardware.canonical_kind(kind)
    return next((name for name, _ in flops.PEAK_TFLOPS if name.lower() in kind.lower()), kind)


def _record_name(record: dict) -> str:
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


def _replace(exp: config.Experiment, section: str, **fields: Any) -> config.Experiment:
    return dataclasses.replace(exp, **{section: dataclasses.replace(getattr(exp, section), **fields)})


if __name__ == "__main__":
    sys.exit(main())
