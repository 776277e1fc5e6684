"""Which Hugging Face tensor holds which lmjax parameter, and how to turn one into the other.

lmjax stores layers stacked (`[L, ...]`), attention projections per head (`w_q [D, H, E]`,
`w_o [H, E, D]`) and the vocabulary padded to a multiple of 128 (model.py). Hugging Face keeps
one tensor per layer, with GPT-2's `Conv1D` weights as `[in, out]` (q, k and v side by side in
`c_attn`) and LLaMA's and Qwen2's `nn.Linear` weights as `[out, in]` (Qwen2's q/k/v biases flat,
`[H*E]`). All use the rotate-half RoPE layout that lmjax uses, so q/k need no permutation.
Padding rows are dropped on export and zeros on import (their logits are masked, so they never
matter).

Numpy only: no jax here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lmjax import config


@dataclasses.dataclass(frozen=True)
class Link:
    """One Hugging Face tensor (per layer if `layered`) and the lmjax parameters it is made of.

    `to_hf(*params)` takes one layer's slice of each of `params` (or the whole parameter when
    not layered) and gives the HF tensor; `from_hf(tensor)` gives those slices back."""

    hf: str  # "{i}" stands for the layer index
    params: tuple[str, ...]  # lmjax parameter paths, "layers.w_q"
    hf_shape: tuple[int, ...]
    to_hf: Callable[..., np.ndarray]
    from_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]

    @property
    def layered(self) -> bool:
        return self.params[0].startswith("layers.")

    def names(self, n_layers: int) -> list[str]:
        return [self.hf.format(i=i) for i in range(n_layers)] if self.layered else [self.hf]


def _same(name: str, param: str, shape: tuple[int, ...]) -> Link:
    return Link(name, (param,), shape, lambda x: x, lambda t: (t,))


def _vocab_rows(name: str, param: str, m: config.Model, transposed: bool) -> Link:
    """The embedding `[Vp, D]` (or the head `[D, Vp]`, transposed) as HF's `[V, D]`."""
    V, Vp, D = m.vocab_size, m.padded_vocab, m.d_model

    def to_hf(x: np.ndarray) -> np.ndarray:
        return (x.T if transposed else x)[:V]

    def from_hf(t: np.ndarray) -> tuple[np.ndarray, ...]:
        padded = np.concatenate([t, np.zeros((Vp - V, D), t.dtype)])
        return (padded.T if transposed else padded,)

    return Link(name, (param,), (V, D), to_hf, from_hf)


def _heads_cat(name: str, params: tuple[str, ...], m: config.Model, bias: bool) -> Link:
    """GPT-2's `c_attn`: q, k, v (`[D, N, E]`, or `[N, E]` biases) side by side as `[D, 3D]`."""
    D, E = m.d_model, m.head_dim
    widths = [m.n_heads * E, m.kv_heads * E, m.kv_heads * E]
    cuts = np.cumsum(widths)[:-1]

    def to_hf(*xs: np.ndarray) -> np.ndarray:
        return np.concatenate([x.reshape(-1) if bias else x.reshape(D, -1) for x in xs], axis=-1)

    def from_hf(t: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(p.reshape(*p.shape[:-1], -1, E) for p in np.split(t, cuts, axis=-1))

    return Link(name, params, (sum(widths),) if bias else (D, sum(widths)), to_hf, from_hf)


def _linear(name: str, param: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Link:
    """An lmjax weight `[*in, *out]` as a torch `nn.Linear` weight `[out, in]` (flattened)."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))

    def to_hf(x: np.ndarray) -> np.ndarray:
        return x.reshape(n_in, n_out).T

    def from_hf(t: np.ndarray) -> tuple[np.ndarray, ...]:
        return (t.T.reshape(*in_shape, *out_shape),)

    return Link(name, (param,), (n_out, n_in), to_hf, from_hf)


def _bias(name: str, param: str, heads: int, E: int) -> Link:
    """An lmjax per-head bias `[N, E]` as a torch `nn.Linear` bias `[N*E]` (Qwen2's q/k/v)."""
    return Link(name, (param,), (heads * E,), lambda x: x.reshape(-1), lambda t: (t.reshape(heads, E),))


def _flat_in(name: str, param: str, in_shape: tuple[int, ...], n_out: int) -> Link:
    """An lmjax weight `[*in, out]` as a GPT-2 `Conv1D` weight `[in, out]` (in flattened)."""
    n_in = int(np.prod(in_shape))
    return Link(
        name,
        (param,),
        (n_in, n_out),
        lambda x: x.reshape(n_in, n_out),
        lambda t: (t.reshape(*in_shape, n_out),),
    )


def links(m: config.Model) -> list[Link]:
    """Every HF tensor of `m`'s architecture, in the order Hugging Face lists them."""
    D, H, K, E, F = m.d_model, m.n_heads, m.kv_heads, m.head_dim, m.ff_dim
    if m.flavour == "gpt2":
        h = "transformer.h.{i}."
        out = [
            _vocab_rows("transformer.wte.weight", "embed", m, transposed=False),
            _same("transformer.wpe.weight", "pos_embed", (m.seq_len, D)),
            _same(h + "ln_1.weight", "layers.attn_norm_scale", (D,)),
            _same(h + "ln_1.bias", "layers.attn_norm_bias", (D,)),
            _heads_cat(h + "attn.c_attn.weight", ("layers.w_q", "layers.w_k", "layers.w_v"), m, bias=False),
            _heads_cat(h + "attn.c_attn.bias", ("layers.b_q", "layers.b_k", "layers.b_v"), m, bias=True),
            _flat_in(h + "attn.c_proj.weight", "layers.w_o", (H, E), D),
            _same(h + "attn.c_proj.bias", "layers.b_o", (D,)),
            _same(h + "ln_2.weight", "layers.mlp_norm_scale", (D,)),
            _same(h + "ln_2.bias", "layers.mlp_norm_bias", (D,)),
            _same(h + "mlp.c_fc.weight", "layers.w_in", (D, F)),
            _same(h + "mlp.c_fc.bias", "layers.b_in", (F,)),
            _same(h + "mlp.c_proj.weight", "layers.w_out", (F, D)),
            _same(h + "mlp.c_proj.bias", "layers.b_out", (D,)),
            _same("transformer.ln_f.weight", "final_norm_scale", (D,)),
            _same("transformer.ln_f.bias", "final_norm_bias", (D,)),
        ]
    else:
        h = "model.layers.{i}."
        a = h + "self_attn."
        qkv = [
            _linear(a + "q_proj.weight", "layers.w_q", (D,), (H, E)),
            _linear(a + "k_proj.weight", "layers.w_k", (D,), (K, E)),
            _linear(a + "v_proj.weight", "layers.w_v", (D,), (K, E)),
        ]
        if m.qkv_bias:  # Qwen2: each projection's bias after its weight, as nn.Linear lists them
            biases = [
                _bias(a + "q_proj.bias", "layers.b_q", H, E),
                _bias(a + "k_proj.bias", "layers.b_k", K, E),
                _bias(a + "v_proj.bias", "layers.b_v", K, E),
            ]
            qkv = [link for pair in zip(qkv, biases, strict=True) for link in pair]
        out = [
            _vocab_rows("model.embed_tokens.weight", "embed", m, transposed=False),
            _same(h + "input_layernorm.weight", "layers.attn_norm_scale", (D,)),
            *qkv,
            _linear(a + "o_proj.weight", "layers.w_o", (H, E), (D,)),
            _same(h + "post_attention_layernorm.weight", "layers.mlp_norm_scale", (D,)),
            _linear(h + "mlp.gate_proj.weight", "layers.w_gate", (D,), (F,)),
            _linear(h + "mlp.up_proj.weight", "layers.w_up", (D,), (F,)),
            _linear(h + "mlp.down_proj.weight", "layers.w_down", (F,), (D,)),
            _same("model.norm.weight", "final_norm_scale", (D,)),
        ]
    if not m.tied:
        out.append(_vocab_rows("lm_head.weight", "head", m, transposed=True))
    return out


def hf_tensors(m: config.Model) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every HF tensor, in Hugging Face's order (layer by layer)."""
    flat = [(lk.hf, lk.hf_shape) for lk in links(m) if not lk.layered]
    layered = [lk for lk in links(m) if lk.layered]
    per_layer = [(lk.hf.format(i=i), lk.hf_shape) for i in range(m.n_layers) for lk in layered]
    embeddings = [t for t in flat if "wte" in t[0] or "wpe" in t[0] or "embed_tokens" in t[0]]
    return embeddings + per_layer + [t for t in flat if t not in embeddings]
