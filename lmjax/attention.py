"""Causal self-attention with segment ids: one entry point, several implementations.

Shapes: q_BTHD (H query heads), k_BTKD / v_BTKD (K key/value heads, H % K == 0: grouped-query
attention), D the head dim. `segment_ids_BT` (int32, >= 1, non-decreasing along T) marks packed
documents; a token attends only to earlier-or-same tokens of its own segment. No implementation
ignores segment ids: one that cannot honour them raises ValueError.

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
D % 8 == 0 and D <= 128 (256 from Hopper on), Triton T % 16 == 0 and D >= 16. A GPU without a
CUDA compute capability (ROCm) gets xla.
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp

from lmjax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cudnn_packed", "pallas", "splash", "reference")

Capability = tuple[int, int]


def attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    *,
    implementation: str = "auto",
) -> jax.Array:
    """Causal attention; returns o_BTHD in q's dtype."""
    impl = resolve(implementation, q_BTHD.shape, q_BTHD.dtype, segment_ids_BT is not None)
    if impl not in ("pallas", "splash"):
        return _IMPLS[impl](q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)
    # Pallas kernels run per device on their shard of batch and heads (XLA cannot split them).
    q_names, kv_names = ("act_batch", None, "act_heads", None), ("act_batch", None, "act_kv_heads", None)
    if segment_ids_BT is None:
        kernel = sharding.per_shard(
            lambda q, k, v: _IMPLS[impl](q, k, v, None), (q_names, kv_names, kv_names), q_names
        )
        return kernel(q_BTHD, k_BTKD, v_BTKD)
    names = (q_names, kv_names, kv_names, ("act_batch", None))
    return sharding.per_shard(_IMPLS[impl], names, q_names)(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT)


def resolve(
    implementation: str,
    q_shape: tuple[int, ...],
    dtype: jnp.dtype,
    segmented: bool,
    *,
    backend: str | None = None,
    capability: Capability | None = None,
) -> str:
    """The implementation `attention` runs: `implementation` itself, or auto's pick (module
    docstring). `backend` and `capability` (CUDA compute capability, None off CUDA) default to
    this machine's; given a backend, the capability is taken as given."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; use one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    if backend is None:
        backend, capability = jax.default_backend(), _cuda_capability()
    _, T, _, D = q_shape
    if backend == "tpu":
        return "splash" if _splash_fits(T) else "xla"
    if backend != "gpu":
        return "xla"
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if capability is None or not half:
        return "xla"
    if not segmented and _cudnn_fits(D, capability):
        return "cudnn"
    if segmented and capability >= (9, 0) and _cudnn_fits(D, capability) and _cudnn_packed_api():
        return "cudnn_packed"
    return "pallas" if _pallas_fits(T, D) and capability >= (8, 0) else "xla"


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


def _xla(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
    mask_B1TT = None if segment_ids_BT is None else _segment_mask(segment_ids_BT)[:, None]
    return jax.nn.dot_product_attention(
        q_BTHD, k_BTKD, v_BTKD, mask=mask_B1TT, is_causal=True, implementation="xla"
    )


def _cudnn(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
    if segment_ids_BT is not None:
        raise ValueError(
            "cudnn attention cannot honour segment ids (packed documents); use model.attention="
            "cudnn_packed (Hopper or newer) or pallas, or xla (slow)"
        )
    return jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True, implementation="cudnn")


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
    starts_BT = _segment_starts(segment_ids_BT)
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
    return _segment_starts(segment_ids_BT).sum(axis=1, dtype=jnp.int32)


def _cudnn_packed(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
    if segment_ids_BT is None:  # one document per row: plain causal
        return _cudnn(q_BTHD, k_BTKD, v_BTKD, None)
    api = _cudnn_packed_api()
    if api is None:
        raise NotImplementedError(
            f"jax {jax.__version__} lacks the private cuDNN packed-attention API lmjax uses; "
            "use model.attention=pallas"
        )
    dot_product_attention, mask_type = api
    T, D = q_BTHD.shape[1], q_BTHD.shape[3]
    M = max_packed_segments(T)
    seqlen_BM, offsets_BM1 = packed_seqlens_offsets(segment_ids_BT, M)
    o_BTHD = dot_product_attention(
        q_BTHD,
        k_BTKD,
        v_BTKD,
        q_seqlen=seqlen_BM,
        kv_seqlen=seqlen_BM,
        q_offsets=offsets_BM1,
        kv_offsets=offsets_BM1,
        scale=1.0 / math.sqrt(D),
        mask_type=mask_type,
    )
    # Segments past M would silently go unattended: poison such rows so the loss shows it.
    overflow_B = segment_counts(segment_ids_BT) > M
    return jnp.where(overflow_B[:, None, None, None], jnp.nan, o_BTHD).astype(q_BTHD.dtype)


@functools.cache
def _cudnn_packed_api():
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


def _pallas(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    _, T, H, D = q_BTHD.shape
    if T % 16:
        raise ValueError(f"pallas attention needs T % 16 == 0 (Triton blocks), got T={T}")
    # mha has no grouped-query support: give every query head its own copy of its k/v head.
    G = H // k_BTKD.shape[2]
    k_BTHD, v_BTHD = jnp.repeat(k_BTKD, G, axis=2), jnp.repeat(v_BTKD, G, axis=2)
    # Blocks must divide T; the defaults are 128 (forward) and 32 (backward).
    fwd, bwd = math.gcd(T, 128), math.gcd(T, 32)
    blocks = pallas_gpu.BlockSizes(
        block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd
    )
    return pallas_gpu.mha(
        q_BTHD,
        k_BTHD,
        v_BTHD,
        segment_ids_BT,
        sm_scale=1.0 / math.sqrt(D),
        causal=True,
        block_sizes=blocks,
        interpret=_interpret("pallas", "gpu"),
    )


def _splash(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    if not _splash_fits(T):
        raise ValueError(f"splash attention needs T % 128 == 0, got T={T}")
    kernel = _splash_kernel(T, H // K, _interpret("splash", "tpu"))
    # Splash does not scale q, and wants heads before time: q_BKGTD, k_BKTD.
    q_BKGTD = (q_BTHD * (1.0 / math.sqrt(D))).reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
    k_BKTD, v_BKTD = k_BTKD.transpose(0, 2, 1, 3), v_BTKD.transpose(0, 2, 1, 3)

    def one_row(q_KGTD, k_KTD, v_KTD, segment_ids_T):
        ids = None if segment_ids_T is None else splash.SegmentIds(q=segment_ids_T, kv=segment_ids_T)
        # One multi-query kernel call per k/v head: its G query heads share that head.
        return jax.vmap(lambda q_GTD, k_TD, v_TD: kernel(q_GTD, k_TD, v_TD, segment_ids=ids))(
            q_KGTD, k_KTD, v_KTD
        )

    o_BKGTD = jax.vmap(one_row)(q_BKGTD, k_BKTD, v_BKTD, segment_ids_BT)
    return o_BKGTD.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)


def _splash_kernel(T: int, heads: int, interpret: bool):
    """A causal multi-query splash kernel for `heads` query heads of length T. Built per trace, not
    cached here: it holds arrays, which would leak out of the trace; splash caches the costly part
    (the numpy block mask) itself."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * heads)
    return splash.make_splash_mqa_single_device(mask, interpret=interpret)


# --- helpers ----------------------------------------------------------------------------------


def _segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
    return segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]


def _segment_starts(segment_ids_BT: jax.Array) -> jax.Array:
    """True where a token begins a segment (the first token of each row does)."""
    first_B1 = jnp.ones((segment_ids_BT.shape[0], 1), bool)
    return jnp.concatenate([first_B1, segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)


def _interpret(name: str, native: str) -> bool:
    """Whether kernel `name`, written for backend `native`, runs in Pallas interpret mode (plain
    XLA ops): on CPU, for tests. On the other accelerator it cannot run at all."""
    backend = jax.default_backend()
    if backend not in ("cpu", native):
        raise ValueError(
            f"{name} attention is a {native.upper()} kernel; on {backend} use model.attention=auto"
        )
    return backend == "cpu"


def _cuda_capability() -> Capability | None:
    """The first device's CUDA compute capability, e.g. (9, 0); None off CUDA (ROCm, CPU, TPU)."""
    try:
        major, minor = jax.devices()[0].compute_capability.split(".")
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return None


def _cudnn_fits(D: int, capability: Capability) -> bool:
    return D % 8 == 0 and D <= (256 if capability >= (9, 0) else 128)


def _pallas_fits(T: int, D: int) -> bool:
    return T % 16 == 0 and D >= 16  # Triton's dot wants every block dim >= 16


def _splash_fits(T: int) -> bool:
    return T % 128 == 0


_IMPLS = {
    "reference": reference,
    "xla": _xla,
    "cudnn": _cudnn,
    "cudnn_packed": _cudnn_packed,
    "pallas": _pallas,
    "splash": _splash,
}
