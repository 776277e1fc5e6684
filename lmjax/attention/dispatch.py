"""Causal self-attention with segment ids: one entry point, several implementations.

Queries q_BTHE, keys and values k_BTKE / v_BTKE, H % K == 0 (grouped-query attention); shape
letters: the package docstring (`lmjax`). `segment_ids_BT` (int32, >= 1, non-decreasing along T)
marks packed documents; a token attends only to earlier-or-same tokens of its own segment. No
implementation ignores segment ids: one that cannot honour them raises ValueError.

`window` > 0 (`model.sliding_window`, Mistral): a token attends to at most the last `window`
tokens, itself included (query t sees key s when t - window < s <= t), within its segment. Only
reference and xla take a window (auto picks xla); the fused kernels refuse it with a UserError.

Implementations (`model.attention`):
    reference     fp32 einsum; the yardstick the others are tested against.
    xla           jax.nn.dot_product_attention(implementation="xla"), segments as a dense T x T mask.
    cudnn         cuDNN flash attention through jax.nn.dot_product_attention; plain causal only.
    cudnn_packed  JAX's private cuDNN API with per-document lengths and offsets (packed layout);
                  Hopper (compute capability 9.0) or newer, bf16/fp16.
    pallas        the Pallas GPU (Triton) flash kernel `mha`, which takes segment ids.
    splash        the Pallas TPU splash-attention kernel with SegmentIds; T % 128 == 0.
pallas and splash run in Pallas interpret mode on CPU (slow: for tests); splash refuses GPUs and
pallas TPUs.

Which one "auto" picks, by card (`resolve` implements this table):

    backend  dtype      segment ids  card                       auto
    gpu      bf16/fp16  no           CUDA                       cudnn
    gpu      bf16/fp16  yes          CUDA, capability >= 9.0    cudnn_packed  (H100, H200, B200)
    gpu      bf16/fp16  yes          CUDA, capability 8.x       pallas        (A100, A10, L4, RTX 30/40)
    gpu      fp32       any          any                        xla   (the fused GPU kernels want bf16/fp16)
    tpu      any        any          T % 128 == 0               splash
    tpu      any        any          T % 128 != 0               xla
    cpu      any        any          -                          xla

A shape a kernel cannot take falls through to the next kernel that can, then to xla: cuDNN wants
E % 8 == 0 and E <= 128 (256 from Hopper on), Triton T % 16 == 0 and E >= 16. A GPU without a
CUDA compute capability (ROCm) gets xla.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp

from lmjax import config, sharding
from lmjax.attention import kernels
from lmjax.config import UserError

IMPLEMENTATIONS = typing.get_args(config.Attention)

Capability = tuple[int, int]
# The implementations that mask a sliding window (auto: by picking xla). cuDNN's and the Pallas
# kernels' masks are fixed causal (and per segment) here.
WINDOWED = ("auto", "xla", "reference")


def attention(
    q_BTHE: jax.Array,
    k_BTKE: jax.Array,
    v_BTKE: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    *,
    implementation: str = "auto",
    max_segments: int = 0,
    window: int = 0,
) -> jax.Array:
    """Causal attention; returns o_BTHE in q's dtype. `max_segments`: documents per row the
    cuDNN packed kernel is sized for (0: the most lmjax's packer can put in a row). `window`:
    the sliding window (module docstring), 0 for none."""
    segmented = segment_ids_BT is not None
    impl = resolve(
        implementation, q_BTHE.shape, q_BTHE.dtype, segmented, kv_heads=k_BTKE.shape[2], window=window
    )
    if impl == "reference":
        return reference(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, window)
    if impl == "xla":
        return _xla(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, window)
    if impl == "cudnn" or segment_ids_BT is None and impl == "cudnn_packed":
        return _cudnn(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT)
    if impl == "cudnn_packed":
        M = max_segments or kernels.max_packed_segments(q_BTHE.shape[1])
        return kernels.cudnn_packed(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, M)
    return _per_shard(
        kernels.pallas if impl == "pallas" else kernels.splash, q_BTHE, k_BTKE, v_BTKE, segment_ids_BT
    )


def _per_shard(kernel, q_BTHE, k_BTKE, v_BTKE, segment_ids_BT):
    """A Pallas kernel run per device on its shard of batch and heads: XLA cannot split it."""
    q_names, kv_names = ("act_batch", None, "act_heads", None), ("act_batch", None, "act_kv_heads", None)
    if not jax.sharding.get_abstract_mesh().empty and sharding.spec(q_names) != sharding.spec(kv_names):
        # Each shard's query heads must meet their own k/v heads: shard both alike.
        raise ValueError("Pallas attention needs mesh.rules to map act_heads and act_kv_heads alike")
    if segment_ids_BT is None:
        plain = sharding.per_shard(
            lambda q, k, v: kernel(q, k, v, None), (q_names, kv_names, kv_names), q_names
        )
        return plain(q_BTHE, k_BTKE, v_BTKE)
    names = (q_names, kv_names, kv_names, ("act_batch", None))
    return sharding.per_shard(kernel, names, q_names)(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT)


def resolve(
    implementation: str,
    q_shape: tuple[int, ...],
    dtype: jnp.dtype,
    segmented: bool,
    *,
    kv_heads: int | None = None,
    backend: str | None = None,
    capability: Capability | None = None,
    window: int = 0,
) -> str:
    """The implementation `attention` runs: `implementation` itself, or auto's pick (module
    docstring). `backend` and `capability` (CUDA compute capability, None off CUDA) default to
    this machine's; given a backend, the capability is taken as given. `kv_heads`: k/v heads
    when fewer than q's (grouped-query). `window` > 0: only reference and xla mask a sliding
    window, so auto gives xla and the fused kernels are refused."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    if window and implementation not in WINDOWED:
        raise UserError(
            f"model.attention={implementation} cannot honour model.sliding_window={window}; "
            "use model.attention=xla (or auto)"
        )
    if implementation != "auto":
        return implementation
    if window:
        return "xla"
    if backend is None:
        backend, capability = jax.default_backend(), cuda_capability()
    _, T, H, E = q_shape
    grouped = kv_heads is not None and kv_heads != H
    if backend == "tpu":
        return "splash" if kernels.splash_fits(T) else "xla"
    if backend != "gpu":
        return "xla"
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if capability is None or capability < (8, 0) or not half:  # cuDNN and Triton flash: Ampere on
        return "xla"
    if not segmented and _cudnn_fits(E, capability):
        return "cudnn"
    if segmented and capability >= (9, 0) and _cudnn_fits(E, capability) and kernels.cudnn_packed_api():
        if not grouped or kernels.cudnn_packed_strides_kv_heads():
            return "cudnn_packed"
    return "pallas" if kernels.pallas_fits(T, E) else "xla"


def reference(
    q_BTHE: jax.Array,
    k_BTKE: jax.Array,
    v_BTKE: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    window: int = 0,
) -> jax.Array:
    """Plain einsum attention in fp32: the yardstick the fast paths are tested against."""
    positions_T = jnp.arange(q_BTHE.shape[1])
    mask_TS = _causal(positions_T, positions_T, window)
    mask_BTS = mask_TS[None] if segment_ids_BT is None else mask_TS & _segment_mask(segment_ids_BT)
    return _einsum_attention(q_BTHE, k_BTKE, v_BTKE, mask_BTS)


def cached(
    q_BTHE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    slots_T: jax.Array,
    start_B: jax.Array,
    window: int = 0,
) -> jax.Array:
    """Attention of T new queries, at cache slots `slots_T`, to a KV cache of S slots: query
    slot t sees slots start_B..t of its row (rows are left-padded up to start_B), the last
    `window` of them when > 0 (a row's slots are consecutive positions, so the window counts
    slots). fp32 einsum: decoding reads the whole cache once per token, which the fused
    training kernels do not speed up."""
    slots_S = jnp.arange(k_BSKE.shape[1])
    seen_BTS = _causal(slots_T, slots_S, window)[None] & (slots_S >= start_B[:, None, None])
    return _einsum_attention(q_BTHE, k_BSKE, v_BSKE, seen_BTS)


def _einsum_attention(q_BTHE, k_BSKE, v_BSKE, seen_BTS):
    """fp32 softmax attention of queries to the keys `seen_BTS` allows, grouped-query."""
    _, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    q_BTKGE = q_BTHE.reshape(*q_BTHE.shape[:2], K, H // K, E).astype(jnp.float32)
    scores_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE.astype(jnp.float32))
    scores_BKGTS = scores_BKGTS / jnp.sqrt(E).astype(jnp.float32)
    # A finite floor, not -inf: a cache's padding query sees no slot, and must not turn into
    # NaN that the next layer would write into the cache.
    scores_BKGTS = jnp.where(seen_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    o_BTKGE = jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE.astype(jnp.float32))
    return o_BTKGE.reshape(q_BTHE.shape).astype(q_BTHE.dtype)


def _xla(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, window=0):
    mask_B1TS = None if segment_ids_BT is None else _segment_mask(segment_ids_BT)[:, None]
    if window:  # a dense mask, as for segments; is_causal below still masks the future
        positions_T = jnp.arange(q_BTHE.shape[1])
        window_11TS = _causal(positions_T, positions_T, window)[None, None]
        mask_B1TS = window_11TS if mask_B1TS is None else mask_B1TS & window_11TS
    return jax.nn.dot_product_attention(
        q_BTHE, k_BTKE, v_BTKE, mask=mask_B1TS, is_causal=True, implementation="xla"
    )


def _cudnn(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT):
    if segment_ids_BT is not None:
        raise ValueError(
            "cudnn attention cannot honour segment ids (packed documents); use model.attention="
            "cudnn_packed (Hopper or newer) or pallas, or xla (slow)"
        )
    return jax.nn.dot_product_attention(q_BTHE, k_BTKE, v_BTKE, is_causal=True, implementation="cudnn")


# --- helpers ----------------------------------------------------------------------------------


def _causal(at_T: jax.Array, at_S: jax.Array, window: int) -> jax.Array:
    """[T, S]: key position s is at or before query position t and, with a window, among the last
    `window` of them (t - s < window: Mistral's, and transformers' sliding-window mask)."""
    seen_TS = at_S[None] <= at_T[:, None]
    return seen_TS & (at_S[None] > at_T[:, None] - window) if window else seen_TS


def _segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
    return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def cuda_capability() -> Capability | None:
    """The first device's CUDA compute capability, e.g. (9, 0); None off CUDA (ROCm, CPU, TPU)."""
    try:
        major, minor = jax.devices()[0].compute_capability.split(".")
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def _cudnn_fits(E: int, capability: Capability) -> bool:
    return E % 8 == 0 and E <= (256 if capability >= (9, 0) else 128)
