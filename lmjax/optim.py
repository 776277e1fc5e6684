"""Optax optimizer from the experiment: AdamW, or Muon for the hidden matrices with AdamW for the
rest; warmup + cosine or WSD schedules; global-norm clipping.

Weight decay applies to matrices only: never to norms or biases, and to the embedding tables
only when `optim.decay_embeddings` is set. Parameters are told apart by name, not by rank,
because stacked per-layer vectors (`[layers, D]`) are 2-D.

`optim.name=muon` splits the parameters into two groups by name (`group_of`):

- **muon**: the hidden matrices `w_*` (attention and MLP kernels). Each layer's slice of a
  stacked `[L, ...]` kernel is one matrix, inputs by outputs (`MUON_AXES`): `w_q [L, D, H, E]` is
  a `D x HE` matrix per layer, `w_o [L, H, E, D]` an `HE x D` one. Nesterov momentum
  (`muon_momentum`), Newton–Schulz orthogonalisation (optax's quintic, 5 steps: singular
  values land in about [0.68, 1.13], not at 1), scaled by `sqrt(max(1, fan_out / fan_in))`
  (Keller Jordan's scaling, which `muon_lr=0.02` is tuned for), decoupled weight decay
  `weight_decay` times the Muon learning rate, at `muon_lr` on the same schedule shape.
- **adamw**: everything else (embeddings, an untied head, norm scales and biases, biases) with
  AdamW's own `lr`, `b1`, `b2`, `eps` and weight-decay mask, exactly as `optim.name=adamw`.

One global-norm clip comes before both. optax.contrib.muon is not used whole: its Adam group
shares Muon's learning rate unless told otherwise, uses Nesterov (NAdam) and Muon's `eps`, and
decays every Adam parameter or none, so the groups are composed here from optax's parts.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from lmjax import config

_EMBEDDINGS = ("embed", "pos_embed")

# Muon's matrices: (reduction axes, output axes) of each stacked kernel; the other axis (the
# leading `layers`) is a batch axis, so every layer is orthogonalised on its own.
MUON_AXES: dict[str, contrib.MuonDimensionNumbers] = {
    "w_q": contrib.MuonDimensionNumbers((1,), (2, 3)),  # [L, D, H, E]
    "w_k": contrib.MuonDimensionNumbers((1,), (2, 3)),  # [L, D, K, E]
    "w_v": contrib.MuonDimensionNumbers((1,), (2, 3)),  # [L, D, K, E]
    "w_o": contrib.MuonDimensionNumbers((1, 2), (3,)),  # [L, H, E, D]
    "w_in": contrib.MuonDimensionNumbers((1,), (2,)),  # [L, D, F]
    "w_out": contrib.MuonDimensionNumbers((1,), (2,)),  # [L, F, D]
    "w_gate": contrib.MuonDimensionNumbers((1,), (2,)),  # [L, D, F]
    "w_up": contrib.MuonDimensionNumbers((1,), (2,)),  # [L, D, F]
    "w_down": contrib.MuonDimensionNumbers((1,), (2,)),  # [L, F, D]
}
# AdamW's share under Muon: embeddings and the head (Muon is for hidden matrices), and the
# vectors (norms, biases). A name matching neither table raises, so a new parameter has to be
# placed by hand rather than land silently in a group.
ADAMW_NAMES = ("embed", "pos_embed", "head", "*_norm_scale", "*_norm_bias", "b_*")


def schedule(cfg: config.Optim, steps: int, peak: float | None = None) -> optax.Schedule:
    """The learning rate at each step, peaking at `peak` (default `cfg.lr`; Muon passes
    `cfg.muon_lr`). Linear warmup over `warmup_steps` (step 0 already gets peak/warmup: optax's
    warmup starts from 0, wasting step 0), then down to `peak * min_lr_ratio` at `steps`:
    `cosine` decays all the way; `wsd` holds the peak and decays linearly over the last
    `decay_fraction` of the steps."""
    peak = cfg.lr if peak is None else peak
    warmup = min(cfg.warmup_steps, steps)
    after_warmup = _wsd(cfg, steps, warmup) if cfg.schedule == "wsd" else _cosine(cfg, steps, warmup)

    def lr(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = (step + 1) / max(warmup, 1)
        return peak * jnp.where(step < warmup, warm, after_warmup(step))

    return lr


def _cosine(cfg: config.Optim, steps: int, warmup: int) -> optax.Schedule:
    def multiplier(step: jax.Array) -> jax.Array:
        progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))

    return multiplier


def _wsd(cfg: config.Optim, steps: int, warmup: int) -> optax.Schedule:
    """Warmup-stable-decay: 1 until the last `decay_fraction` of the steps (never before the
    warmup ends), then linearly to `min_lr_ratio` at `steps`."""
    decay_start = max(warmup, steps - round(cfg.decay_fraction * steps))

    def multiplier(step: jax.Array) -> jax.Array:
        progress = jnp.clip((step - decay_start) / max(steps - decay_start, 1), 0.0, 1.0)
        return 1 - (1 - cfg.min_lr_ratio) * progress

    return multiplier


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """True where weight decay applies: matrices (`w_*`, an untied `head`), and the embedding
    tables only if asked. With tied embeddings (gpt2) the output head *is* the embedding
    table, so it follows `decay_embeddings` (nanoGPT decays it; we default to not)."""

    def decays(path: tuple, _leaf: Any) -> bool:
        name = _param_name(path)
        if name in _EMBEDDINGS:
            return decay_embeddings
        return name.startswith("w_") or name == "head"

    return jax.tree_util.tree_map_with_path(decays, params)


def group_of(name: str) -> str:
    """`muon` or `adamw`: where a parameter goes under `optim.name=muon`."""
    if name in MUON_AXES:
        return "muon"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in ADAMW_NAMES):
        return "adamw"
    raise ValueError(
        f"optim.name=muon: parameter {name!r} is in neither Muon's table (lmjax.optim.MUON_AXES: "
        f"hidden matrices and their input/output axes) nor AdamW's ({', '.join(ADAMW_NAMES)}); "
        "add it to one of them"
    )


def muon_groups(params: Any) -> Any:
    """Each parameter's group (`group_of` its name), in the shape of `params`."""
    if _is_lone_leaf(params):
        # optax.tree_map_params probes `init` with one placeholder standing for all the
        # parameters; any group will do, the placeholder is never split.
        return "adamw"
    return jax.tree_util.tree_map_with_path(lambda path, _: group_of(_param_name(path)), params)


def _muon_dimension_numbers(updates: Any) -> Any:
    """MUON_AXES per parameter, for the Muon group's (masked) share of the tree: the other
    group's leaves are already optax.MaskedNode, which have no leaves to map."""
    return jax.tree_util.tree_map_with_path(lambda path, _: MUON_AXES[_param_name(path)], updates)


def _param_name(path: tuple) -> str:
    """The parameter's attribute name: nnx.State paths end in a `.value` attribute key."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return names[-2] if names[-1] == "value" and len(names) > 1 else names[-1]


def _is_lone_leaf(tree: Any) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree.structure(tree))


def make(cfg: config.Optim, steps: int) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    adamw = _adamw(cfg, steps)
    if cfg.name == "muon":
        chain.append(optax.partition({"muon": _muon(cfg, steps), "adamw": adamw}, muon_groups))
    else:
        chain.append(adamw)
    return optax.chain(*chain)


def _adamw(cfg: config.Optim, steps: int) -> optax.GradientTransformation:
    return optax.adamw(
        schedule(cfg, steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: decay_mask(params, cfg.decay_embeddings),
    )


def _muon(cfg: config.Optim, steps: int) -> optax.GradientTransformation:
    """optax.contrib.muon's Muon group, on MUON_AXES: Nesterov momentum, Newton–Schulz (the
    default quintic, 5 steps), width scaling, then decoupled weight decay, all times the Muon
    schedule (so a step shrinks the matrices by `muon_lr(t) * weight_decay`, as optax, PyTorch
    and Keller Jordan's Muon do). The momentum buffer takes the parameters' dtype."""
    return optax.chain(
        contrib.scale_by_muon(
            beta=cfg.muon_momentum, nesterov=True, weight_dimension_numbers=_muon_dimension_numbers
        ),
        _scale_by_width(),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule(cfg, steps, peak=cfg.muon_lr)),
    )


def _scale_by_width() -> optax.GradientTransformation:
    """Keller Jordan's `sqrt(max(1, fan_out / fan_in))` on each orthogonalised matrix (optax's
    default, `consistent_rms=None`). Singular values near 1 give an update of RMS about
    `1 / sqrt(fan_in)` per unit of learning rate for any fan_out (wide matrices are not made
    smaller): the scale `muon_lr=0.02` comes tuned for. optax's `consistent_rms=0.2` (Moonshot)
    would instead match AdamW's RMS, and want a `muon_lr` near AdamW's `lr`."""

    def scale(path: tuple, u: jax.Array) -> jax.Array:
        dims = MUON_AXES[_param_name(path)]
        fan_in = math.prod(u.shape[a] for a in dims.reduction_axis)
        fan_out = math.prod(u.shape[a] for a in dims.output_axis)
        return u * max(1.0, fan_out / fan_in) ** 0.5

    return optax.stateless(lambda updates, _params: jax.tree_util.tree_map_with_path(scale, updates))


def tree_map_params(
    tx: optax.GradientTransformation,
    f: Callable[..., Any],
    state: Any,
    *rest: Any,
    transform_non_params: Callable[[Any], Any] | None = None,
) -> Any:
    """`optax.tree_map_params` for states that hold only a share of the parameters: under
    `optim.name=muon` each group's moments (optax.partition) have an optax.MaskedNode where a
    parameter belongs to the other group. Those stay as they are; plain optax would try to pair
    them with the parameter-shaped `rest` and fail on the tree structures."""

    def at_param(leaf: Any, *args: Any) -> Any:
        return leaf if _is_masked(leaf) else f(leaf, *args)

    return optax.tree_map_params(
        tx, at_param, state, *rest, transform_non_params=transform_non_params, is_leaf=_is_masked
    )


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)
