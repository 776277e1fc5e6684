"""The next token from a row of logits: greedy, or sampled with temperature, top-k and top-p,
among the ids below a limit (the tokenizer's piece count).

All four settings are traced values, so one compiled decode step serves every setting.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def allowed(logits_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Which ids may be sampled `[B, V]`: the `top_k` highest logits (0: all), and of those the
    fewest highest whose probabilities (renormalised over the top k) reach `top_p`. Ties with
    the last allowed logit are allowed too."""
    V = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # highest first
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    in_top_k_BV = jnp.arange(V) < k
    probs_BV = jax.nn.softmax(jnp.where(in_top_k_BV, sorted_BV, -jnp.inf), axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # of the strictly better ids
    # The first id always; the next while the ones before it hold less than top_p (all at
    # top_p=1, which float rounding of the sum would not always give).
    keep_BV = in_top_k_BV & ((mass_before_BV < top_p) | (jnp.arange(V) == 0) | (top_p >= 1))
    lowest_kept_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return logits_BV >= lowest_kept_B1


def choose(
    logits_BV: jax.Array,
    key: jax.Array,
    temperature: jax.Array | float,
    top_k: jax.Array | int,
    top_p: jax.Array | float,
    n_ids: jax.Array | int | None = None,
) -> jax.Array:
    """Token ids `[B]` below `n_ids` (None: any id): the argmax where `temperature` is 0, else a
    draw from softmax(logits / temperature) over the `allowed` ids, one independent draw per
    row. The sort that top-k/top-p need (a large vocabulary's, every step) runs only when they
    are on."""
    logits_BV = logits_BV.astype(jnp.float32)
    if n_ids is not None:
        # An embedding may be larger than its tokenizer (LLaMA-family vocabularies are padded):
        # the ids past the tokenizer's pieces have logits, but no text to decode them to.
        logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < n_ids, logits_BV, -jnp.inf)

    def draw() -> jax.Array:
        scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
        masked_BV = jax.lax.cond(
            (top_k > 0) | (top_p < 1),
            lambda: jnp.where(allowed(scaled_BV, top_k, top_p), scaled_BV, -jnp.inf),
            lambda: scaled_BV,
        )
        return jax.random.categorical(key, masked_BV, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
