"""Optax optimizer from the experiment: AdamW, warmup + cosine, global-norm clipping.

Weight decay applies to matrices only: never to norms or biases, and to the embedding tables
only when `optim.decay_embeddings` is set. Parameters are told apart by name, not by rank,
because stacked per-layer vectors (`[layers, D]`) are 2-D.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lmjax import config

_EMBEDDINGS = ("embed", "pos_embed")


def schedule(cfg: config.Optim, steps: int) -> optax.Schedule:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at
    `steps`. Step 0 already gets lr/warmup (optax's warmup starts from 0, wasting step 0)."""
    warmup = min(cfg.warmup_steps, steps)

    def lr(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = (step + 1) / max(warmup, 1)
        progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return cfg.lr * jnp.where(step < warmup, warm, cosine)

    return lr


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


def _param_name(path: tuple) -> str:
    """The parameter's attribute name: nnx.State paths end in a `.value` attribute key."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return names[-2] if names[-1] == "value" and len(names) > 1 else names[-1]


def make(cfg: config.Optim, steps: int) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain.append(
        optax.adamw(
            schedule(cfg, steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda params: decay_mask(params, cfg.decay_embeddings),
        )
    )
    return optax.chain(*chain)
