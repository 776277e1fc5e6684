"""FLOPs per token and model FLOPs utilisation (MFU).

Training FLOPs per token = 6 * N + 12 * L * H * E * T, where N counts the parameters that take
part in matmuls (attention and MLP weights and the output head; not the embedding lookup,
positions, norms or biases), L is layers, H*E the attention width and T the sequence length.
6N is forward (2N) plus backward (4N); the second term is attention's QK^T and AV matmuls
(PaLM's count, causal masking not halved), the same count nanoGPT uses; with a sliding window
W (`model.sliding_window`) a query meets at most W keys, so T becomes min(T, W). The MLP has three
matrices for SwiGLU and two otherwise (model.mlp); elementwise work (activations, norms, QK-norm,
the logit soft-cap) is not counted.
"""

from __future__ import annotations

from lmjax import config

# Dense bf16 peak TFLOP/s per chip from the datasheets. Matched by substring of device_kind,
# most specific first.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("TPU v6 lite", 918.0),  # v6e
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def matmul_params(cfg: config.Model) -> int:
    """Parameters that take part in matmuls: attention, MLP and the output head."""
    L, D, H, K, E, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
    attention = D * H * E + 2 * D * K * E + H * E * D
    mlp = (3 if cfg.mlp_kind == "swiglu" else 2) * D * F
    return L * (attention + mlp) + D * cfg.padded_vocab


def count_params(cfg: config.Model) -> int:
    """All parameters in closed form: the matmul ones, plus the input embedding table when the
    head is untied, positions, norms, biases (qkv_bias's too) and QK-norm scales."""
    L, D, H, K, E, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ff_dim
    embedding = 0 if cfg.tied else cfg.padded_vocab * D
    if cfg.flavour == "gpt2":  # LayerNorms with biases, biased projections, learned positions
        mlp_biases = 0 if cfg.mlp_kind == "swiglu" else F + D  # SwiGLU has none in either flavour
        rest = L * (2 * 2 * D + (H + 2 * K) * E + D + mlp_biases) + 2 * D + cfg.seq_len * D
    else:  # RMSNorm scales only
        rest = L * 2 * D + D
    qk_norm = 2 * L * E if cfg.qk_norm else 0
    qkv_bias = L * (H + 2 * K) * E if cfg.qkv_bias else 0  # llama only (config.validate)
    return matmul_params(cfg) + embedding + rest + qk_norm + qkv_bias


def flops_per_token(cfg: config.Model) -> float:
    """Training FLOPs (forward + backward) per token; see the module docstring."""
    span = min(cfg.seq_len, cfg.sliding_window) if cfg.sliding_window else cfg.seq_len
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * span


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """Datasheet peak per device, an explicit override, or None (CPU and unknown devices)."""
    if override > 0:
        return override
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def mfu(tokens_per_s: float, cfg: config.Model, n_devices: int, peak_tflops_per_device: float) -> float:
    return tokens_per_s * flops_per_token(cfg) / (n_devices * peak_tflops_per_device * 1e12)
