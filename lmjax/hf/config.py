"""lmjax's `config.Model` as a Hugging Face `config.json` (GPT2LMHeadModel, LlamaForCausalLM,
Qwen2ForCausalLM, MistralForCausalLM) and back. Import refuses, as a UserError (exit 2), any
setting lmjax's model cannot compute.

Qwen2 (and Qwen2.5, the same class) is the llama flavour with `model.qkv_bias`: LLaMA's blocks
with biases on the q, k and v projections only, not on o_proj or the MLP. Mistral is the llama
flavour with `model.sliding_window`: LLaMA's blocks and tensors, each token attending to the last
`sliding_window` tokens (itself included) in every layer; a null window attends to all."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmjax import config
from lmjax.config import UserError

HfConfig = dict[str, Any]  # a transformers config.json: keys to JSON values of any kind

GPT2, LLAMA, QWEN2, MISTRAL = "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"
# the class -> its config's model_type
ARCHITECTURES = {GPT2: "gpt2", LLAMA: "llama", QWEN2: "qwen2", MISTRAL: "mistral"}
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}
# GPT-2's "gelu_new" is the tanh approximation, which is jax.nn.gelu's default (approximate=True).
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def architecture(m: config.Model) -> str:
    """The transformers class that computes `m`'s blocks: GPT-2's, LLaMA's, Qwen2's (LLaMA's
    with q/k/v biases) or Mistral's (LLaMA's with a sliding window)."""
    if m.flavour == "gpt2":
        return GPT2
    if m.qkv_bias:
        return QWEN2
    return MISTRAL if m.sliding_window else LLAMA


def check_exportable(m: config.Model) -> None:
    """Refuse, as one UserError naming each setting, a model that its transformers class
    (`architecture`) cannot compute. zero_init and z_loss change training, not the
    architecture: such models export."""
    arch = architecture(m)
    native_mlp = "gelu" if m.flavour == "gpt2" else "swiglu"
    problems = []
    if m.flavour == "gpt2" and m.kv_heads != m.n_heads:
        problems.append(f"model.n_kv_heads={m.n_kv_heads} ({arch} has no grouped-query attention)")
    if m.mlp_kind != native_mlp:
        problems.append(f"model.mlp={m.mlp_kind} ({arch}'s MLP is {native_mlp}, model.mlp=auto)")
    if m.qk_norm:
        problems.append(f"model.qk_norm=true ({arch} has no query/key norm)")
    if m.logit_softcap:
        problems.append(f"model.logit_softcap={m.logit_softcap} ({arch} has no logit soft-cap)")
    if m.sliding_window and arch != MISTRAL:  # Qwen2's window (use_sliding_window) is not written here
        problems.append(f"model.sliding_window={m.sliding_window} ({arch} as written has no window)")
    if problems:
        raise UserError(
            f"{'; '.join(problems)}: this model cannot be exported in the Hugging Face {arch} layout; "
            "only models trained without these settings (lmjax's defaults) export"
        )


def hf_config(m: config.Model, bos_id: int, eos_id: int, dtype: str) -> HfConfig:
    """The `config.json` of `m` for transformers; `dtype`: the stored tensors' (float32|bfloat16)."""
    check_exportable(m)
    arch = architecture(m)
    common = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": m.vocab_size,  # the tokenizer's, without lmjax's padding
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "tie_word_embeddings": m.tied,
        "initializer_range": m.init_std,
        "use_cache": True,
        "torch_dtype": TORCH_DTYPES[dtype],
    }
    if m.flavour == "gpt2":
        return common | {
            "n_layer": m.n_layers,
            "n_head": m.n_heads,
            "n_embd": m.d_model,
            "n_inner": m.ff_dim,
            "n_positions": m.seq_len,
            "n_ctx": m.seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    llama_blocks = common | {
        "hidden_size": m.d_model,
        "intermediate_size": m.ff_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
    }
    if arch == QWEN2:  # Qwen2Config has no head_dim or bias switches: q/k/v biased, nothing else
        return llama_blocks | {
            "use_sliding_window": False,
            "sliding_window": None,  # what Qwen2Config keeps when use_sliding_window is false
            "max_window_layers": m.n_layers,
            "layer_types": ["full_attention"] * m.n_layers,
        }
    if arch == MISTRAL:  # MistralConfig has no bias switches; its window is every layer's
        return llama_blocks | {"head_dim": m.head_dim, "sliding_window": m.sliding_window}
    return llama_blocks | {
        "head_dim": m.head_dim,
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
    }


def model_from_hf(cfg: HfConfig, where: str, param_dtype: str) -> config.Model:
    """The lmjax model of a Hugging Face `config.json` (read from `where`)."""
    archs = cfg.get("architectures") or []
    known = [a for a in ARCHITECTURES if a in archs]
    if not known:
        raise UserError(
            f"{where}: architectures={archs} is not one lmjax reads; it reads "
            f"{sorted(ARCHITECTURES)} checkpoints"
        )
    arch = known[0]
    if arch == GPT2:
        # Absent: GPT2Config's default, gelu_new.
        _refuse(cfg, where, "activation_function", lambda v: v is None or v in GELU_TANH, "gelu_new")
        _refuse(cfg, where, "scale_attn_weights", lambda v: v in (None, True), True)
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            _refuse(cfg, where, key, lambda v: not v, False)
        d_model = _int(cfg, where, "n_embd")
        fields = dict(
            n_layers=_int(cfg, where, "n_layer"),
            n_heads=_int(cfg, where, "n_head"),
            d_ff=cfg.get("n_inner") or 4 * d_model,
            seq_len=_int(cfg, where, "n_positions"),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )
    else:
        _refuse(cfg, where, "hidden_act", lambda v: v in (None, "silu"), "silu")
        if arch == QWEN2:
            _refuse_sliding_window(cfg, where)
        else:  # LlamaConfig's switches; Qwen2's biases are fixed (q/k/v only) and its window has its own
            for key in ("attention_bias", "mlp_bias"):
                _refuse(cfg, where, key, lambda v: not v, None)
        if arch == LLAMA:  # LlamaConfig has no window: one there is a config lmjax does not know
            _refuse(cfg, where, "sliding_window", lambda v: v is None, None)
        _refuse(cfg, where, "rope_scaling", _no_scaling, None)
        rope = cfg.get("rope_parameters") or {}
        _refuse(
            rope, where, "rope_parameters.rope_type", lambda v: v in (None, "default"), "default", "rope_type"
        )
        _refuse(cfg, where, "partial_rotary_factor", lambda v: v in (None, 1, 1.0), 1.0)
        d_model, n_heads = _int(cfg, where, "hidden_size"), _int(cfg, where, "num_attention_heads")
        _refuse(cfg, where, "head_dim", lambda v: v in (None, d_model // n_heads), d_model // n_heads)
        fields = dict(
            n_layers=_int(cfg, where, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            d_ff=_int(cfg, where, "intermediate_size"),
            seq_len=_int(cfg, where, "max_position_embeddings"),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == QWEN2,
            sliding_window=_window(cfg, where) if arch == MISTRAL else 0,
        )
    m = config.Model(
        flavour="gpt2" if arch == GPT2 else "llama",
        vocab_size=_int(cfg, where, "vocab_size"),
        d_model=d_model,
        param_dtype=param_dtype,
        init_std=float(cfg.get("initializer_range", 0.02)),
        **fields,
    )
    try:
        config.validate(config.Experiment(model=m))
    except UserError as e:
        raise UserError(f"{where} describes a model lmjax cannot build: {e}") from None
    return m


def _refuse_sliding_window(cfg: HfConfig, where: str) -> None:
    """Qwen2 attends within `sliding_window` only when `use_sliding_window` is true (then in the
    layers from `max_window_layers` on, or those `layer_types` names): lmjax attends over the
    whole context. Qwen2 and Qwen2.5 checkpoints ship it false, with a window size all the same."""
    _refuse(cfg, where, "use_sliding_window", lambda v: not v, False)
    _refuse(
        cfg,
        where,
        "layer_types",
        lambda v: v is None or set(v) <= {"full_attention"},
        "full_attention in every layer",
    )


def _window(cfg: HfConfig, where: str) -> int:
    """Mistral's `sliding_window`: null (Mistral 7B v0.2 on) attends to the whole context, 0 here."""
    if cfg.get("sliding_window") is None:
        return 0
    return _int(cfg, where, "sliding_window")


def _no_scaling(rope_scaling: object) -> bool:
    """None, {} or a "default" rope type (older configs spell it "type"): plain RoPE."""
    if not rope_scaling:
        return True
    if not isinstance(rope_scaling, dict):
        return False
    return rope_scaling.get("rope_type", rope_scaling.get("type")) == "default"


def _int(cfg: HfConfig, where: str, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"{where}: {key}={value!r} should be a positive integer")
    return value


def _refuse(
    cfg: HfConfig,
    where: str,
    shown: str,
    ok: Callable[[object], bool],
    wanted: object,
    key: str | None = None,
) -> None:
    value = cfg.get(key or shown)
    if not ok(value):
        raise UserError(
            f"{where}: {shown}={value!r} is not supported by lmjax's model (it computes {wanted!r})"
        )
