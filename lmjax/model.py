"""A decoder-only transformer in Flax NNX, GPT-2 or LLaMA flavour from one config.

gpt2:  LayerNorm, learned positions, GELU MLP, biases, tied embeddings.
llama: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, untied head, no biases.

Recipe options (config.Model, all off by default): `mlp` picks the MLP (gelu or relu2: two
matrices, with biases in the gpt2 flavour; swiglu: three matrices, no biases in either flavour),
`qk_norm` RMS-normalises each head's queries and keys before RoPE, `qkv_bias` gives the llama
flavour's q, k and v projections biases (Qwen2; gpt2 has them anyway), `sliding_window` lets
each token attend to the last W tokens only (Mistral; in training and in the KV-cache decode
alike, whose cache still keeps every slot), `zero_init` starts the residual output projections
at zero, and `logit_softcap` squashes the logits with tanh. The objective the logits feed
(cross-entropy, `z_loss`) is `loss.py`'s.

Layer parameters are stored stacked, `[L, ...]`, and the forward pass either unrolls a Python
loop over them or `lax.scan`s: the same parameter tree either way. Parameters are kept in
`param_dtype` (fp32 master weights) and cast to `dtype` for compute. Shape letters: the package
docstring (`lmjax`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lmjax import config
from lmjax.attention import attention
from lmjax.attention import cached as cached_attention
from lmjax.sharding import constrain

Params = dict[str, jax.Array]  # parameters by name: every layer's stacked, or one layer's
Carry = TypeVar("Carry")

_ACT_BTD = ("act_batch", "act_seq", "act_embed")
# The cache is laid out like the activations: rows over the batch axes, kv heads over tensor.
_CACHE_NAMES = ("layers", "act_batch", None, "act_kv_heads", None)


class KVCache(NamedTuple):
    """Every layer's keys and values for S slots of B rows, filled up to slot `length`. Prompts
    are left-padded: row b's tokens start at slot `start_B[b]` and its positions count from there."""

    k_LBSKE: jax.Array
    v_LBSKE: jax.Array
    length: jax.Array  # int32 scalar
    start_B: jax.Array  # int32 [B]


def init_cache(cfg: config.Model, start_B: jax.Array, slots: int) -> KVCache:
    """An empty cache of `slots` slots for rows whose prompts start at `start_B`."""
    shape = (cfg.n_layers, start_B.shape[0], slots, cfg.kv_heads, cfg.head_dim)
    k_LBSKE, v_LBSKE = (constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), _CACHE_NAMES) for _ in "kv")
    return KVCache(k_LBSKE, v_LBSKE, jnp.zeros((), jnp.int32), start_B.astype(jnp.int32))


class Layers(nnx.Module):
    """All transformer blocks' parameters, each stacked along a leading `layers` axis."""

    def __init__(self, cfg: config.Model, rngs: nnx.Rngs):
        L, D, H, K, E, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
        param = functools.partial(_param, rngs=rngs, dtype=cfg.param_dtype)
        normal = nnx.initializers.normal(cfg.init_std)
        zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
        # Residual projections scaled by 1/sqrt(2L) (GPT-2) so the stream's variance stays put;
        # zero_init: each block starts as the identity (modded-nanogpt).
        out = zeros if cfg.zero_init else nnx.initializers.normal(cfg.init_std / (2 * L) ** 0.5)
        gpt2 = cfg.flavour == "gpt2"
        # Parameters are created in a fixed order: each draws the next key, so the default
        # model's values do not move when options add parameters after them.

        self.attn_norm_scale = param(ones, (L, D), ("layers", "embed"))
        self.w_q = param(normal, (L, D, H, E), ("layers", "embed", "heads", "head_dim"))
        self.w_k = param(normal, (L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"))
        self.w_v = param(normal, (L, D, K, E), ("layers", "embed", "kv_heads", "head_dim"))
        self.w_o = param(out, (L, H, E, D), ("layers", "heads", "head_dim", "embed"))
        self.mlp_norm_scale = param(ones, (L, D), ("layers", "embed"))
        if gpt2:
            self.attn_norm_bias = param(zeros, (L, D), ("layers", "embed"))
            self.b_q = param(zeros, (L, H, E), ("layers", "heads", "head_dim"))
            self.b_k = param(zeros, (L, K, E), ("layers", "kv_heads", "head_dim"))
            self.b_v = param(zeros, (L, K, E), ("layers", "kv_heads", "head_dim"))
            self.b_o = param(zeros, (L, D), ("layers", "embed"))
            self.mlp_norm_bias = param(zeros, (L, D), ("layers", "embed"))
        if cfg.mlp_kind == "swiglu":  # no biases in either flavour
            self.w_gate = param(normal, (L, D, F), ("layers", "embed", "mlp"))
            self.w_up = param(normal, (L, D, F), ("layers", "embed", "mlp"))
            self.w_down = param(out, (L, F, D), ("layers", "mlp", "embed"))
        else:  # gelu, relu2: biased in the gpt2 flavour
            self.w_in = param(normal, (L, D, F), ("layers", "embed", "mlp"))
            if gpt2:
                self.b_in = param(zeros, (L, F), ("layers", "mlp"))
            self.w_out = param(out, (L, F, D), ("layers", "mlp", "embed"))
            if gpt2:
                self.b_out = param(zeros, (L, D), ("layers", "embed"))
        if cfg.qk_norm:
            self.q_norm_scale = param(ones, (L, E), ("layers", "head_dim"))
            self.k_norm_scale = param(ones, (L, E), ("layers", "head_dim"))
        if cfg.qkv_bias:  # llama's q/k/v biases (Qwen2): gpt2's names and axes, so _block adds either
            self.b_q = param(zeros, (L, H, E), ("layers", "heads", "head_dim"))
            self.b_k = param(zeros, (L, K, E), ("layers", "kv_heads", "head_dim"))
            self.b_v = param(zeros, (L, K, E), ("layers", "kv_heads", "head_dim"))

    def arrays(self, dtype: jnp.dtype) -> Params:
        return {k: v[...].astype(dtype) for k, v in vars(self).items() if isinstance(v, nnx.Param)}


class Transformer(nnx.Module):
    def __init__(self, cfg: config.Model, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (the tokenizer's size) before building")
        self.cfg = cfg
        D, V = cfg.d_model, cfg.padded_vocab
        param = functools.partial(_param, rngs=rngs, dtype=cfg.param_dtype)
        self.embed = param(nnx.initializers.normal(cfg.init_std), (V, D), ("vocab", "embed"))
        if cfg.flavour == "gpt2":
            self.pos_embed = param(nnx.initializers.normal(0.01), (cfg.seq_len, D), ("positions", "embed"))
            self.final_norm_bias = param(nnx.initializers.zeros, (D,), ("embed",))
        self.final_norm_scale = param(nnx.initializers.ones, (D,), ("embed",))
        if not cfg.tied:
            self.head = param(nnx.initializers.normal(cfg.init_std), (D, V), ("embed", "vocab"))
        self.layers = Layers(cfg, rngs)

    def __call__(
        self,
        tokens_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
    ) -> jax.Array:
        """Logits `[B, T, V]` in the compute dtype; padded vocabulary ids get the dtype's min."""
        return logits(self.cfg, self.hidden(tokens_BT, segment_ids_BT, positions_BT), self.head_DV())

    def hidden(
        self,
        tokens_BT: jax.Array,
        segment_ids_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
    ) -> jax.Array:
        """The final-normed hidden states `[B, T, D]` that the head turns into logits."""
        cfg = self.cfg
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD = self._embed(tokens_BT, positions_BT)
        block_fn = functools.partial(
            _block, cfg=cfg, segment_ids_BT=segment_ids_BT, positions_BT=positions_BT
        )
        if cfg.remat != "none":
            block_fn = jax.checkpoint(block_fn, policy=_remat_policy(cfg))
        layers = self.layers.arrays(jnp.dtype(cfg.dtype))
        x_BTD = _over_layers(lambda x_BTD, p: block_fn(x_BTD, p)[0], x_BTD, layers, cfg.scan_layers)
        return self._final_norm(x_BTD)

    def decode(
        self, tokens_BT: jax.Array, cache: KVCache, last_only: bool = False
    ) -> tuple[jax.Array, KVCache]:
        """Logits `[B, T, V]` of T tokens that follow the cache's (`[B, 1, V]`, the last
        position's, with `last_only`), and the cache with their keys and values added: the
        prompt at once (prefill), then one token at a time."""
        cfg = self.cfg
        slots_T = cache.length + jnp.arange(tokens_BT.shape[1])
        positions_BT = jnp.maximum(slots_T[None] - cache.start_B[:, None], 0)  # 0 on padding
        block_fn = functools.partial(_block, cfg=cfg, segment_ids_BT=None, positions_BT=positions_BT)

        # The whole cache is carried through the layers and each writes its slice in place, so
        # a step copies none of it.
        def layer(carry, p):
            x_BTD, k_LBSKE, v_LBSKE, i = carry
            x_BTD, (k_LBSKE, v_LBSKE) = block_fn(x_BTD, p, kv=(k_LBSKE, v_LBSKE, i, slots_T, cache.start_B))
            return x_BTD, k_LBSKE, v_LBSKE, i + 1

        x_BTD = self._embed(tokens_BT, positions_BT)
        layers = self.layers.arrays(jnp.dtype(cfg.dtype))
        # The layer index: traced under scan; unrolled, a Python int, so each layer's slice is static.
        first = jnp.zeros((), jnp.int32) if cfg.scan_layers else 0
        carry = (x_BTD, cache.k_LBSKE, cache.v_LBSKE, first)
        x_BTD, k_LBSKE, v_LBSKE, _ = _over_layers(layer, carry, layers, cfg.scan_layers)
        if last_only:  # a prefill needs only the next token's logits, not [B, T, V] of them
            x_BTD = x_BTD[:, -1:]
        new_cache = KVCache(
            constrain(k_LBSKE, _CACHE_NAMES),
            constrain(v_LBSKE, _CACHE_NAMES),
            cache.length + tokens_BT.shape[1],
            cache.start_B,
        )
        return logits(cfg, self._final_norm(x_BTD), self.head_DV()), new_cache

    def _embed(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embed_VD = self.embed[...].astype(dtype)
        # Gather the table whole before the lookup (as FSDP does for every weight): a lookup
        # into a vocab/fsdp-sharded table makes XLA replicate it in the backward pass anyway.
        x_BTD = constrain(embed_VD, (None, "act_embed"))[tokens_BT]
        if cfg.flavour == "gpt2":
            x_BTD = x_BTD + self.pos_embed[...].astype(dtype)[positions_BT]
        return constrain(x_BTD, _ACT_BTD)

    def _final_norm(self, x_BTD: jax.Array) -> jax.Array:
        bias = self.final_norm_bias[...] if self.cfg.flavour == "gpt2" else None
        return _norm(self.cfg, x_BTD, self.final_norm_scale[...], bias)

    def head_DV(self, dtype: str | None = None) -> jax.Array:
        """The output projection (the embedding table itself when tied), in `dtype` (default:
        the compute dtype)."""
        head_DV = self.embed[...].T if self.cfg.tied else self.head[...]
        return head_DV.astype(jnp.dtype(dtype or self.cfg.dtype))


def logits(cfg: config.Model, h_BTD: jax.Array, head_DV: jax.Array) -> jax.Array:
    """Logits in h's dtype, soft-capped with `logit_softcap`; padded vocabulary ids get the
    dtype's min (after the cap, so they never rise to -cap). Training, evaluation, the chunked
    loss and generation all come through here."""
    logits_BTV = constrain(jnp.einsum("btd,dv->btv", h_BTD, head_DV), ("act_batch", "act_seq", "act_vocab"))
    if cfg.logit_softcap:
        logits_BTV = softcap(logits_BTV, cfg.logit_softcap)
    if cfg.padded_vocab == cfg.vocab_size:  # nothing to mask: XLA would still pass over [B, T, V]
        return logits_BTV
    real_V = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
    return jnp.where(real_V, logits_BTV, jnp.finfo(logits_BTV.dtype).min)


def softcap(x: jax.Array, cap: float) -> jax.Array:
    """`cap * tanh(x / cap)`, computed in fp32 and returned in x's dtype: |result| < cap."""
    return (cap * jnp.tanh(x.astype(jnp.float32) / cap)).astype(x.dtype)


def _over_layers(
    layer_fn: Callable[[Carry, Params], Carry], carry: Carry, layers: Params, scan: bool
) -> Carry:
    """`carry = layer_fn(carry, p)` for each layer's parameters `p` in turn: one `lax.scan` over
    the stacked `[L, ...]` arrays (one compiled layer), or a Python loop (L of them)."""
    if scan:
        return jax.lax.scan(lambda c, p: (layer_fn(c, p), None), carry, layers)[0]
    for p in _unstacked(layers):
        carry = layer_fn(carry, p)
    return carry


def _unstacked(layers: Params) -> list[Params]:
    """Each layer's parameters from the stacked `[L, ...]` arrays. `jnp.unstack`, not `v[i]`:
    its gradient is one stack of the layers' gradients, where indexing's is a zero-padded
    `[L, ...]` array per layer, all added up."""
    per_layer = zip(*map(jnp.unstack, layers.values()), strict=True)  # every stack has L layers
    return [dict(zip(layers, arrays, strict=True)) for arrays in per_layer]


def _remat_policy(cfg: config.Model) -> Callable | None:
    """none/full: save nothing inside a block; dots: save matmul outputs; named: save the
    activations `model.remat_names` lists (config.RematName, tagged in `_block`)."""
    if cfg.remat == "dots":
        return jax.checkpoint_policies.dots_saveable
    if cfg.remat == "named":
        return jax.checkpoint_policies.save_only_these_names(*cfg.remat_names)
    return None


def _block(
    x_BTD: jax.Array,
    p: Params,
    *,
    cfg: config.Model,
    segment_ids_BT: jax.Array | None,
    positions_BT: jax.Array,
    kv: tuple[jax.Array, ...] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One transformer block. With `kv` = (k_LBSKE, v_LBSKE, layer index, slots_T, start_B), the
    cache: the new keys and values go into this layer's slice at `slots_T` and the queries
    attend to it; returns the block's output and the updated (k, v) cache (None without one)."""
    gpt2 = cfg.flavour == "gpt2"
    h_BTD = _norm(cfg, x_BTD, p["attn_norm_scale"], p.get("attn_norm_bias"))
    # Biased in the gpt2 flavour and with qkv_bias: added before RoPE, as Qwen2 adds them.
    q_BTHE = _plus(jnp.einsum("btd,dhe->bthe", h_BTD, p["w_q"]), p.get("b_q"))
    k_BTKE = _plus(jnp.einsum("btd,dke->btke", h_BTD, p["w_k"]), p.get("b_k"))
    v_BTKE = _plus(jnp.einsum("btd,dke->btke", h_BTD, p["w_v"]), p.get("b_v"))
    if cfg.qk_norm:  # per head, before RoPE (OLMo-2, Qwen3, modded-nanogpt); keys are cached normed
        q_BTHE = _norm(cfg, q_BTHE, p["q_norm_scale"], None)
        k_BTKE = _norm(cfg, k_BTKE, p["k_norm_scale"], None)
    if not gpt2:
        q_BTHE = rope(q_BTHE, positions_BT, cfg.rope_theta)
        k_BTKE = rope(k_BTKE, positions_BT, cfg.rope_theta)
    q_BTHE = checkpoint_name(constrain(q_BTHE, ("act_batch", "act_seq", "act_heads", None)), "qkv")
    k_BTKE = checkpoint_name(constrain(k_BTKE, ("act_batch", "act_seq", "act_kv_heads", None)), "qkv")
    v_BTKE = checkpoint_name(constrain(v_BTKE, ("act_batch", "act_seq", "act_kv_heads", None)), "qkv")
    if kv is None:
        kernel = functools.partial(
            attention,
            implementation=cfg.attention,
            max_segments=cfg.max_segments,
            window=cfg.sliding_window,
        )
        o_BTHE = kernel(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT)
        new_kv = None
    else:
        k_LBSKE, v_LBSKE, i, slots_T, start_B = kv
        at = (i, 0, slots_T[0], 0, 0)
        new_kv = (
            jax.lax.dynamic_update_slice(k_LBSKE, k_BTKE.astype(k_LBSKE.dtype)[None], at),
            jax.lax.dynamic_update_slice(v_LBSKE, v_BTKE.astype(v_LBSKE.dtype)[None], at),
        )
        o_BTHE = cached_attention(q_BTHE, new_kv[0][i], new_kv[1][i], slots_T, start_B, cfg.sliding_window)
    o_BTHE = checkpoint_name(o_BTHE, "attn_out")
    attn_BTD = jnp.einsum("bthe,hed->btd", o_BTHE, p["w_o"])
    x_BTD = constrain(x_BTD + (attn_BTD + p["b_o"] if gpt2 else attn_BTD), _ACT_BTD)

    h_BTD = _norm(cfg, x_BTD, p["mlp_norm_scale"], p.get("mlp_norm_bias"))
    return constrain(x_BTD + _mlp(cfg, h_BTD, p), _ACT_BTD), new_kv


def relu2(x: jax.Array) -> jax.Array:
    """ReLU squared (Primer; modded-nanogpt)."""
    return jnp.square(jax.nn.relu(x))


# The two-matrix MLPs' activations (model.mlp); jax.nn.gelu is the tanh form GPT-2 uses.
ACTIVATIONS = {"gelu": jax.nn.gelu, "relu2": relu2}


def _mlp(cfg: config.Model, h_BTD: jax.Array, p: Params) -> jax.Array:
    """SwiGLU (three matrices), or a two-matrix MLP with biases where the layer has them."""
    if cfg.mlp_kind == "swiglu":
        gate_BTF = checkpoint_name(jnp.einsum("btd,df->btf", h_BTD, p["w_gate"]), "mlp_in")
        up_BTF = checkpoint_name(jnp.einsum("btd,df->btf", h_BTD, p["w_up"]), "mlp_in")
        u_BTF = constrain(_recomputed(_swiglu)(gate_BTF, up_BTF), ("act_batch", "act_seq", "act_mlp"))
        return jnp.einsum("btf,fd->btd", u_BTF, p["w_down"])
    pre_BTF = checkpoint_name(_plus(jnp.einsum("btd,df->btf", h_BTD, p["w_in"]), p.get("b_in")), "mlp_in")
    u_BTF = constrain(_recomputed(ACTIVATIONS[cfg.mlp_kind])(pre_BTF), ("act_batch", "act_seq", "act_mlp"))
    return _plus(jnp.einsum("btf,fd->btd", u_BTF, p["w_out"]), p.get("b_out"))


def _swiglu(gate_BTF: jax.Array, up_BTF: jax.Array) -> jax.Array:
    return jax.nn.silu(gate_BTF) * up_BTF


def _recomputed(activation: Callable) -> Callable:
    """The activation, redone from its inputs in the backward pass. Its inputs (matmul outputs)
    are kept anyway; left alone, XLA also keeps an intermediate (GELU's tanh, a [B, T, F]
    array per layer) and reads it back: one write and one read of [B, T, F] more per layer."""
    return jax.checkpoint(activation)


def _plus(x: jax.Array, bias: jax.Array | None) -> jax.Array:
    return x if bias is None else x + bias


def _norm(cfg: config.Model, x: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """LayerNorm (with bias) or RMSNorm over x's last axis (D; E for qk_norm's per-head norm),
    computed in fp32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    if bias is not None:
        x32 = x32 - x32.mean(-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + cfg.norm_eps)
    x32 = x32 * scale.astype(jnp.float32)
    if bias is not None:
        x32 = x32 + bias.astype(jnp.float32)
    return x32.astype(x.dtype)


def rope(x_BTHE: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half layout (the Hugging Face LLaMA convention), of queries
    `[B, T, H, E]` or keys `[B, T, K, E]`. `E2`: one angle per pair of dims, E / 2 of them."""
    E = x_BTHE.shape[-1]
    inv_freq_E2 = theta ** (-jnp.arange(0, E, 2, dtype=jnp.float32) / E)
    angle_BTE2 = positions_BT[..., None].astype(jnp.float32) * inv_freq_E2
    sin_BT1E2, cos_BT1E2 = jnp.sin(angle_BTE2)[:, :, None], jnp.cos(angle_BTE2)[:, :, None]
    x1, x2 = jnp.split(x_BTHE.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1E2 - x2 * sin_BT1E2, x2 * cos_BT1E2 + x1 * sin_BT1E2], -1)
    return rotated.astype(x_BTHE.dtype)


def _param(init, shape: tuple[int, ...], names: tuple[str, ...], *, rngs: nnx.Rngs, dtype: str) -> nnx.Param:
    # No eager sharding: the jitted initialiser's out_shardings place parameters (sharding.py).
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(dtype)), out_sharding=names, eager_sharding=False)
