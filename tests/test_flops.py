import jax
import pytest
from conftest import tiny_experiment

from lmjax import flops, step


def test_flops_per_token_by_hand():
    # gpt2, D=32, L=2, H=4 (E=8), F=64, vocab 256, T=32:
    #   attention matmuls per layer: q, k, v, o = 4 * 32*32 = 4096; MLP: 2 * 32*64 = 4096
    #   N = 2 * (4096 + 4096) + head 32*256 = 16384 + 8192 = 24576;  6N = 147456
    #   attention scores and mixing: 12 * L * H*E * T = 12 * 2 * 32 * 32 = 24576
    assert flops.flops_per_token(tiny_experiment("gpt2").model) == 147456 + 24576


def test_a_sliding_window_counts_the_keys_a_query_meets():
    # 12 * L * H*E * min(T, W) = 12 * 2 * 32 * 8 for a window of 8 in T=32
    model = tiny_experiment("llama", "model.sliding_window=8").model
    assert flops.flops_per_token(model) == 6 * flops.matmul_params(model) + 12 * 2 * 32 * 8


def test_llama_gqa_counts_fewer_kv_flops():
    # llama, 2 kv heads of 8: k and v are 32*16 each; SwiGLU has three 32*64 matrices.
    # N = 2 * (2*32*32 + 2*32*16 + 3*32*64) + 32*256 = 2 * 9216 + 8192 = 26624
    assert flops.matmul_params(tiny_experiment("llama").model) == 26624


def test_mlp_option_sets_the_matrix_count():
    # gpt2 with SwiGLU: three 32*64 matrices (no MLP biases); llama with ReLU^2: two.
    gpt2 = tiny_experiment("gpt2", "model.mlp=swiglu").model
    assert flops.matmul_params(gpt2) == 2 * (4 * 32 * 32 + 3 * 32 * 64) + 32 * 256
    llama = tiny_experiment("llama", "model.mlp=relu2").model
    assert flops.matmul_params(llama) == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 2 * 32 * 64) + 32 * 256


@pytest.mark.parametrize(
    "flavour,sets",
    [
        ("gpt2", ()),
        ("llama", ()),
        ("gpt2", ("model.mlp=relu2",)),
        ("gpt2", ("model.mlp=swiglu", "model.qk_norm=true")),
        ("llama", ("model.mlp=gelu",)),
        ("llama", ("model.mlp=relu2", "model.qk_norm=true", "model.tie_embeddings=true")),
        ("gpt2", ("model.zero_init=true", "model.logit_softcap=30", "model.z_loss=1e-4")),
        ("llama", ("model.mlp=swiglu", "model.d_ff=0")),  # the 8/3 rule
    ],
)
def test_param_count_matches_the_model_tree(flavour, sets):
    """The closed form against the real parameter tree, over the recipe options."""
    cfg = tiny_experiment(flavour, *sets).model
    _, abstract = step.abstract_model(cfg)  # shapes only
    assert sum(x.size for x in jax.tree.leaves(abstract)) == flops.count_params(cfg)


@pytest.mark.parametrize(
    "kind,override,want",
    [
        ("NVIDIA H100 80GB HBM3", 0, 989.0),
        ("NVIDIA H100 PCIe", 0, 756.0),
        ("NVIDIA H200", 0, 989.0),
        ("TPU v5 lite", 0, 197.0),
        ("TPU v5p", 0, 459.0),
        ("cpu", 0, None),
        ("cpu", 2.5, 2.5),
    ],
)
def test_peak_table(kind, override, want):
    assert flops.peak_tflops(kind, override) == want


def test_mfu():
    cfg = tiny_experiment("gpt2").model
    # 1e9 tokens/s * 172032 FLOPs/token on 2 devices of 100 TFLOP/s = 0.86
    assert flops.mfu(1e9, cfg, 2, 100.0) == pytest.approx(172032e9 / 200e12)
