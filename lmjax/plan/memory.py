"""The planner's memory estimate (`memory_per_device`): bytes per device of the compiled train
step, in parts (parameters, optimizer state, gradients, activations), which `lmjax.plan` checks
against the devices' usable memory.

It is counted against XLA's own analysis of the compiled train step
(`compiled.memory_analysis()`). The state is donated, so XLA's peak per device is
`argument + output - alias + temp` bytes. Here:

- parameters and optimizer state: every leaf's shard under `mesh.rules` (the optimizer's leaves
  from `jax.eval_shape` of the experiment's own optax transformation: AdamW's two moments,
  Muon's one momentum for the hidden matrices, nothing guessed); with weights split over the
  batch axes (FSDP), one layer's weights all-gathered in the compute dtype on top;
- gradients: one parameter-shaped copy in param_dtype, two with micro-batches (the sum, and the
  micro-batch's own); with FSDP, one layer's whole gradient before its reduce-scatter on top;
- activations: what the backward pass keeps, read off the train step's own objective
  (`loss.loss_terms`, z-loss included) with `jax._src.ad_checkpoint.saved_residuals` (private:
  a jax without it is one error line) under the remat policy, the attention kernel the target
  device would run, scanned or unrolled, the chunked loss; for one micro-batch's rows on one
  device. Each residual is split over the mesh axes its dimensions'
  logical axes map to (act_heads, act_mlp, act_vocab... read off a second trace of the model at
  probe sizes; the residual stream, act_embed, is not split over tensor by default). On top:
  part of one layer's residuals that its backward pass holds (BACKWARD_LIVE: gradients, and
  with remat what it recomputes), and with `model.loss_chunk` a chunk's recomputed logits and
  their gradient. Unrolled layers without remat: UNROLLED_KEPT of the layers' residuals (XLA
  fuses elementwise ones away). Both constants are fitted to XLA's analysis on CPU (fp32).

Left out: XLA's fusion and scheduling choices beyond those (on GPU it may keep less or more),
collective buffers, the batch itself (12 bytes a token), the compiled code, the runtime's own
reservation, packed batches (segment ids) and the evaluation step. cuDNN attention cannot be
traced off a GPU: the Pallas flash kernel, which keeps the same (q, k, v, output, softmax
statistics), stands in for it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax import attention, config, loss, optim, sharding, step
from lmjax.attention import kernels as attention_kernels
from lmjax.config import UserError

AxisRules = dict[str, str | tuple[str, ...] | None]  # `mesh.rules` as a dict: logical -> mesh axes

# The share of one layer's residuals (beyond its input) that its backward pass holds at once on
# top of all the residuals: the activations' gradients, and with remat what it recomputes (XLA
# frees them as it goes). Measured on CPU (fp32, scanned layers; plan_check.py): about 0.5
# without remat, 0.75 to 1.0 with remat=full (the matmul outputs are recomputed too), about 1.1
# with dots (the MLP activation, recomputed in every mode, is no traced residual, so the
# share of what the backward pass rebuilds is larger); named is not measured and takes dots'.
BACKWARD_LIVE = {"none": 0.5, "full": 0.85, "dots": 1.1, "named": 1.1}
# Unrolled layers without remat: the share of the layers' traced residuals XLA keeps (it fuses
# elementwise ones into their consumers, which a scan's stacked residuals rule out). CPU: 0.6-0.7.
UNROLLED_KEPT = 0.6


def memory_per_device(
    exp: config.Experiment,
    n_devices: int,
    backend: str = "cpu",
    capability: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Bytes per device of the train step (module docstring): params, optimizer, gradients,
    activations (`lmjax.plan.PARTS`) and their "total".
    `backend`/`capability` pick the attention kernel as `model.attention=auto` would there."""
    data, fsdp, tensor = sharding.mesh_shape(exp, n_devices)
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
    _, abstract_params = _abstract_params(exp.model)
    fractions = _local_fractions(abstract_params, dict(exp.mesh.rules), sizes)
    nbytes = lambda leaf: leaf.size * leaf.dtype.itemsize  # noqa: E731
    param_bytes = sum(
        nbytes(p) * f
        for p, f in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(fractions), strict=True)
    )
    # Each optimizer leaf that belongs to a parameter (AdamW's moments, Muon's momentum) is
    # sharded like it, paired as step.state_shardings pairs them; the rest (step counts) are
    # small and replicated.
    tx = optim.make(exp.optim, exp.train.steps)
    opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_fractions = optim.tree_map_params(
        tx, lambda _, f: f, opt_state, fractions, transform_non_params=lambda _: 1.0
    )
    opt_bytes = sum(
        nbytes(leaf) * f
        for leaf, f in zip(jax.tree.leaves(opt_state), jax.tree.leaves(opt_fractions), strict=True)
    )
    return float(param_bytes), float(opt_bytes)


def _gathered_layer_bytes(cfg: config.Model, rules: AxisRules, sizes: dict[str, int]) -> float:
    """One layer's weights in the compute dtype as the matmuls use them: gathered over the
    batch axes (data, fsdp), still split over tensor. 0 when no layer weight is split over
    the batch axes (nothing is gathered)."""
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


def _local_fractions(abstract_params: nnx.State, rules: AxisRules, sizes: dict[str, int]) -> nnx.State:
    """The parameters' tree with each leaf's value the share of it one device holds."""

    def local_fraction(var: nnx.Variable) -> nnx.Variable:
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


def _is_variable(x: object) -> bool:
    return isinstance(x, nnx.Variable)


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg: config.Model) -> tuple[nnx.GraphDef, nnx.State]:
    return step.abstract_model(cfg)


def _traceable_attention(cfg: config.Model, backend: str, capability: tuple[int, int] | None) -> str:
    """The kernel `auto` picks on the target (plain causal batches); cuDNN's, which cannot be
    traced off a GPU, replaced by the Pallas flash kernel that keeps the same residuals."""
    q_shape = (1, cfg.seq_len, cfg.n_heads, cfg.head_dim)
    impl = attention.resolve(
        cfg.attention,
        q_shape,
        jnp.dtype(cfg.dtype),
        False,
        kv_heads=cfg.kv_heads,
        backend=backend,
        capability=capability,
        window=cfg.sliding_window,
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


def _activation_bytes(cfg: config.Model, rows: int, rules: AxisRules, sizes: dict[str, int]) -> float:
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


def _loss_working_set(cfg: config.Model, rows: int, rules: AxisRules, sizes: dict[str, int]) -> float:
    """What the loss's backward pass holds beyond the residuals: the gradient of the logits, in
    the compute dtype (`loss.cross_entropy_sums` writes it in one pass from the logits, which
    stay alive until it is written); with `model.loss_chunk`, per chunk, and a chunk's logits
    recomputed beside it."""
    vocab = cfg.padded_vocab / _axes_size(rules["act_vocab"], sizes)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    if not cfg.loss_chunk:  # the logits themselves are a traced residual
        return rows * cfg.seq_len * vocab * itemsize
    return rows * cfg.loss_chunk * vocab * 2 * itemsize


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


def _trace(cfg: config.Model, rows: int) -> list[jax.core.ShapedArray]:
    """The avals of the residuals the train step's objective keeps for `rows` rows."""
    graphdef, abstract_params = _abstract_params(cfg)
    batch = {
        "inputs": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
        "targets": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.int32),
        "loss_mask": jax.ShapeDtypeStruct((rows, cfg.seq_len), jnp.float32),
    }

    def objective(p: nnx.State, b: dict[str, jax.Array]) -> jax.Array:  # as step.make_train_step does
        ce_sum, z_sum, _ = loss.loss_terms(nnx.merge(graphdef, p), b)
        return ce_sum + cfg.z_loss * z_sum if cfg.z_loss else ce_sum

    kept = _saved_residuals()(objective, abstract_params, batch)
    return [aval for aval, why in kept if "argument" not in why]


def _saved_residuals() -> Callable[..., list[tuple[jax.core.ShapedArray, str]]]:
    """jax's `saved_residuals`, or one clear error."""
    try:  # private: guarded against a jax that moves it
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError as e:
        raise UserError(
            f"jax {jax.__version__} has no jax._src.ad_checkpoint.saved_residuals, which the "
            "planner reads activations with; install the jax version pyproject.toml pins"
        ) from e
    return saved_residuals
