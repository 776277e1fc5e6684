"""The fused attention kernels that take packed documents: cuDNN's packed layout and the Pallas
kernels (GPU Triton `mha`, TPU splash). `dispatch` chooses among them and shards them.

Their jax modules are imported where a kernel runs, not at the top: they are experimental (Pallas)
or private (cuDNN's), a jaxlib build may lack them, and only the backend a kernel is for needs
them. Without the cuDNN one `cudnn_packed_api` gives None and `resolve` picks another kernel.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

from lmjax import sharding

# --- cuDNN, packed documents ------------------------------------------------------------------


def max_packed_segments(T: int) -> int:
    """The most segments a row of T tokens from lmjax's packer can hold.

    The packer cuts windows from documents framed as `<s> text </s>` with non-empty text, so a
    whole document is >= 3 tokens; only the first segment (a tail) and the last (a head) can be
    cut short, to >= 1 token each. n >= 2 segments need T >= 1 + 3 (n - 2) + 1, so
    n <= (T + 4) / 3, and n = 1 fits that too: the bound is (T + 4) // 3, reached when
    T % 3 == 2 (1-token tail, 3-token documents, 1-token head). A row with more segments (other
    packers, or a custom tokenizer that gives empty texts no tokens) makes cudnn_packed return NaN.
    """
    return (T + 4) // 3


def packed_seqlens_offsets(segment_ids_BT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Per-row document lengths and start offsets in the layout JAX's cuDNN packed attention takes:
    seqlen_BM [B, M] and offsets_BM1 [B, M + 1], int32, -1 past a row's last segment (offsets'
    last column is always -1: JAX lists starts only). M = max_segments; segments beyond M are
    left out (see `segment_counts`)."""
    T = segment_ids_BT.shape[1]
    starts_BT = segment_starts(segment_ids_BT)
    # Start positions ascending, then T for every non-start: bounds_BT[:, m + 1] ends segment m.
    bounds_BT = jnp.sort(jnp.where(starts_BT, jnp.arange(T, dtype=jnp.int32), T), axis=1)
    bounds_BT = jnp.pad(bounds_BT, ((0, 0), (0, max(0, max_segments + 1 - T))), constant_values=T)
    starts_BM, ends_BM = bounds_BT[:, :max_segments], bounds_BT[:, 1 : max_segments + 1]
    real_BM = starts_BM < T
    seqlen_BM = jnp.where(real_BM, ends_BM - starts_BM, -1)
    offsets_BM1 = jnp.pad(jnp.where(real_BM, starts_BM, -1), ((0, 0), (0, 1)), constant_values=-1)
    return seqlen_BM.astype(jnp.int32), offsets_BM1.astype(jnp.int32)


def segment_counts(segment_ids_BT: jax.Array) -> jax.Array:
    """Number of segments in each row, n_B."""
    return segment_starts(segment_ids_BT).sum(axis=1, dtype=jnp.int32)


def cudnn_packed(
    q_BTHE: jax.Array, k_BTKE: jax.Array, v_BTKE: jax.Array, segment_ids_BT: jax.Array, max_segments: int
) -> jax.Array:
    """cuDNN fused attention over the documents of each row, sized for `max_segments` of them."""
    api = cudnn_packed_api()
    if api is None:
        raise NotImplementedError(
            f"jax {jax.__version__} lacks the private cuDNN packed-attention API lmjax uses; "
            "use model.attention=pallas"
        )
    if k_BTKE.shape[2] != q_BTHE.shape[2] and not cudnn_packed_strides_kv_heads():
        raise ValueError(
            f"jax {jax.__version__}'s cuDNN packed attention mis-strides grouped-query k/v (fixed in "
            "0.11); upgrade jax or use model.attention=pallas"
        )
    dot_product_attention, mask_type = api
    E = q_BTHE.shape[3]
    M = max_segments
    seqlen_BM, offsets_BM1 = packed_seqlens_offsets(segment_ids_BT, M)
    # Pinned to q's batch sharding: each device's kernel reads the rows it holds.
    seqlen_BM = sharding.constrain(seqlen_BM, ("act_batch", None))
    offsets_BM1 = sharding.constrain(offsets_BM1, ("act_batch", None))
    o_BTHE = dot_product_attention(
        q_BTHE,
        k_BTKE,
        v_BTKE,
        q_seqlen=seqlen_BM,
        kv_seqlen=seqlen_BM,
        q_offsets=offsets_BM1,
        kv_offsets=offsets_BM1,
        scale=1.0 / math.sqrt(E),
        mask_type=mask_type,
    )
    # Segments past M would silently go unattended: poison such rows so the loss shows it.
    overflow_B = segment_counts(segment_ids_BT) > M
    return jnp.where(overflow_B[:, None, None, None], jnp.nan, o_BTHE).astype(q_BTHE.dtype)


@functools.cache
def cudnn_packed_api() -> tuple | None:
    """(dot_product_attention, PADDING_CAUSAL) from JAX's private cuDNN module, or None when this
    jax lacks it or its signature no longer takes per-segment lengths and offsets (checked
    for 0.10.2; the keyword names are what we rely on, not positions)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:
        return None
    fn, mask_type = getattr(fa, "dot_product_attention", None), getattr(fa, "MaskType", None)
    if fn is None or mask_type is None or not hasattr(mask_type, "PADDING_CAUSAL"):
        return None
    needed = {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type"}
    if not needed <= set(inspect.signature(fn).parameters):
        return None
    return fn, mask_type.PADDING_CAUSAL


# --- Pallas kernels ---------------------------------------------------------------------------


def pallas(
    q_BTHE: jax.Array, k_BTKE: jax.Array, v_BTKE: jax.Array, segment_ids_BT: jax.Array | None
) -> jax.Array:
    """The Pallas GPU (Triton) flash kernel `mha`, which takes segment ids; one device's shard."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    _, T, H, E = q_BTHE.shape
    if T % 16:
        raise ValueError(f"pallas attention needs T % 16 == 0 (Triton blocks), got T={T}")
    # mha has no grouped-query support: give every query head its own copy of its k/v head.
    G = H // k_BTKE.shape[2]
    k_BTHE, v_BTHE = jnp.repeat(k_BTKE, G, axis=2), jnp.repeat(v_BTKE, G, axis=2)
    # Blocks must divide T; the defaults are 128 (forward) and 32 (backward).
    fwd, bwd = math.gcd(T, 128), math.gcd(T, 32)
    blocks = pallas_gpu.BlockSizes(
        block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd
    )
    return pallas_gpu.mha(
        q_BTHE,
        k_BTHE,
        v_BTHE,
        segment_ids_BT,
        sm_scale=1.0 / math.sqrt(E),
        causal=True,
        block_sizes=blocks,
        interpret=interpret_mode("pallas", "gpu"),
    )


def splash(
    q_BTHE: jax.Array, k_BTKE: jax.Array, v_BTKE: jax.Array, segment_ids_BT: jax.Array | None
) -> jax.Array:
    """The Pallas TPU splash kernel with SegmentIds, per example and k/v head; one device's shard."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash_ops

    B, T, H, E = q_BTHE.shape
    K = k_BTKE.shape[2]
    if not splash_fits(T):
        raise ValueError(f"splash attention needs T % 128 == 0, got T={T}")
    kernel = _splash_kernel(T, H // K, interpret_mode("splash", "tpu"))
    # Splash does not scale q, and wants heads before time: q_BKGTE, k_BKTE.
    q_BKGTE = (q_BTHE * (1.0 / math.sqrt(E))).reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
    k_BKTE, v_BKTE = k_BTKE.transpose(0, 2, 1, 3), v_BTKE.transpose(0, 2, 1, 3)

    def one_row(q_KGTE, k_KTE, v_KTE, segment_ids_T):
        ids = None if segment_ids_T is None else splash_ops.SegmentIds(q=segment_ids_T, kv=segment_ids_T)
        # One multi-query kernel call per k/v head: its G query heads share that head.
        return jax.vmap(lambda q_GTE, k_TE, v_TE: kernel(q_GTE, k_TE, v_TE, segment_ids=ids))(
            q_KGTE, k_KTE, v_KTE
        )

    o_BKGTE = jax.vmap(one_row)(q_BKGTE, k_BKTE, v_BKTE, segment_ids_BT)
    return o_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHE.dtype)


def _splash_kernel(T: int, heads: int, interpret: bool):
    """A causal multi-query splash kernel for `heads` query heads of length T. Built per trace, not
    cached here: it holds arrays, which would leak out of the trace; splash caches the costly part
    (the numpy block mask) itself."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash_ops

    mask = splash_ops.MultiHeadMask([splash_ops.CausalMask((T, T))] * heads)
    return splash_ops.make_splash_mqa_single_device(mask, interpret=interpret)


# --- helpers ----------------------------------------------------------------------------------


def segment_starts(segment_ids_BT: jax.Array) -> jax.Array:
    """True where a token begins a segment (the first token of each row does)."""
    first_B1 = jnp.ones((segment_ids_BT.shape[0], 1), bool)
    return jnp.concatenate([first_B1, segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)


def interpret_mode(name: str, native: str) -> bool:
    """Whether kernel `name`, written for backend `native`, runs in Pallas interpret mode (plain
    XLA ops): on CPU, for tests. On the other accelerator it cannot run at all."""
    backend = jax.default_backend()
    if backend not in ("cpu", native):
        raise ValueError(
            f"{name} attention is a {native.upper()} kernel; on {backend} use model.attention=auto"
        )
    return backend == "cpu"


def pallas_fits(T: int, E: int) -> bool:
    return T % 16 == 0 and E >= 16  # Triton's dot wants every block dim >= 16


def splash_fits(T: int) -> bool:
    return T % 128 == 0


@functools.cache
def cudnn_packed_strides_kv_heads() -> bool:
    """jax < 0.11 strides packed k/v by the query head count: wrong for grouped-query attention."""
    major, minor = (int(x) for x in jax.__version__.split(".")[:2])
    return (major, minor) >= (0, 11)
