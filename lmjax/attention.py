"""Causal self-attention with segment ids: one entry point, several implementations.

Shapes: q_BTHD (H query heads), k_BSKD / v_BSKD (K key/value heads, H % K == 0: grouped-query
attention). `segment_ids_BT` marks packed documents; a token attends only to earlier tokens of
its own segment. No implementation may ignore segment ids: the ones that cannot honour them
raise instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "reference")


def attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    *,
    implementation: str = "auto",
) -> jax.Array:
    """Causal attention; returns o_BTHD in q's dtype."""
    impl = _choose(implementation, q_BTHD.dtype, segment_ids_BT)
    if impl == "reference":
        return reference(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
    if impl == "cudnn":
        if segment_ids_BT is not None:
            raise ValueError(
                "cudnn attention cannot honour segment ids (packed documents); "
                "use model.attention=xla for packed batches"
            )
        return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True, implementation="cudnn")
    mask_B1TT = None if segment_ids_BT is None else _segment_mask(segment_ids_BT)[:, None]
    return jax.nn.dot_product_attention(
        q_BTHD, k_BTKD, v_BTKD, mask=mask_B1TT, is_causal=True, implementation="xla"
    )


def reference(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """Plain einsum attention in fp32: the yardstick the fast paths are tested against."""
    _, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    q_BTKGD = q_BTHD.reshape(*q_BTHD.shape[:2], K, H // K, D).astype(jnp.float32)
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BTKD.astype(jnp.float32))
    scores_BKGTS = scores_BKGTS / jnp.sqrt(D).astype(jnp.float32)
    mask_TS = jnp.tril(jnp.ones((T, T), bool))
    mask_BTS = mask_TS[None] if segment_ids_BT is None else mask_TS & _segment_mask(segment_ids_BT)
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -jnp.inf)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    o_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS, v_BTKD.astype(jnp.float32))
    return o_BTKGD.reshape(q_BTHD.shape).astype(q_BTHD.dtype)


def _segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
    return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def _choose(implementation: str, dtype: jnp.dtype, segment_ids_BT: jax.Array | None) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}")
    if implementation != "auto":
        return implementation
    # cuDNN's fused kernel wants a GPU, half precision and no segment ids (speed issue adds them).
    on_gpu = jax.default_backend() == "gpu"
    half = dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if on_gpu and half and segment_ids_BT is None else "xla"
