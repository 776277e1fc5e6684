"""Mistral (`MistralForCausalLM`) in and out of lmjax: the llama flavour with `model.sliding_window`.

A tiny Mistral checkpoint with random weights and a window of 8 is written here as transformers
writes one (MistralConfig's config.json, safetensors, the stdlib sentencepiece model), imported,
and its logits at 32 positions compared with test_export's numpy forward pass of modeling_llama.py
with modeling_mistral.py's window mask; the same forward without the window must differ, so the
window is what makes them agree. Greedy generation (the KV-cache path, left-padded rows) runs
past the window and is compared with that forward's argmax token by token; the import exports
back to the same folder. A packed row of two documents gives each document's logits alone, and
the fused kernels that cannot mask a window are refused.
"""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_export import MODELS, llama_logits, llama_table, quiet, random_params, read_hf
from test_qwen2 import _changed, lmjax_logits, random_tensors, without_biases, write_hf_folder

from lmjax import checkpoint, config, generate, model, step
from lmjax.attention import attention, reference, resolve
from lmjax.data.tokenizer import Tokenizer
from lmjax.hf import config as hf_config
from lmjax.hf.export import main, model_sets

WINDOW = 8  # smaller than the 32 positions compared and than prompt + generated tokens


def mistral_config(tok: Tokenizer) -> dict:
    """config.json as transformers 4.57's `MistralConfig.save_pretrained` writes it (D=32, H=4,
    K=2, E=8, F=48, L=2, vocab 520: test_export's LLaMA shapes)."""
    return {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id, "head_dim": 8, "hidden_act": "silu", "hidden_size": 32,
        "initializer_range": 0.02, "intermediate_size": 48, "max_position_embeddings": 64,
        "model_type": "mistral", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "sliding_window": WINDOW, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.57.6", "use_cache": True, "vocab_size": 520,
    }  # fmt: skip


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, stdlib_corpus) -> Path:
    """A Mistral checkpoint: LLaMA's tensors (test_qwen2's random ones, less the biases)."""
    tok = stdlib_corpus.tokenizer
    tensors = without_biases(random_tensors(tied=False, seed=5))
    assert tensors.keys() == llama_table(tied=False).keys()
    return write_hf_folder(tmp_path_factory.mktemp("mistral") / "hf", mistral_config(tok), tensors, tok)


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lmjax") / "run"
    assert main(["--from-hf", str(hf_folder), "--to", "lmjax", str(out)]) == 0
    return out


def test_imported_mistral_logits_equal_the_hf_architecture_with_its_window(hf_folder, imported):
    cfg, tensors = read_hf(hf_folder)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 32))
    hf = llama_logits(cfg, tensors, ids, window=WINDOW)
    ours, m = lmjax_logits(imported, ids)

    assert (m.flavour, m.sliding_window, m.qkv_bias, m.tied, m.kv_heads) == ("llama", WINDOW, False, False, 2)
    assert hf.std() > 1.0  # logits that mean something
    assert np.abs(ours - hf).max() < 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), hf.argmax(-1))
    # The window counts: the whole-context forward differs past position WINDOW, and only there.
    full = llama_logits(cfg, tensors, ids)
    assert np.abs(full - hf)[:, :WINDOW].max() < 1e-9
    assert np.abs(full - hf)[:, WINDOW:].max() > 0.1
    assert np.abs(ours - full).max() > 0.1


def _greedy(cfg: dict, tensors: dict, prompt: list[int], n: int, n_ids: int, eos: int) -> list[int]:
    """The windowed numpy forward's argmax, one token at a time, over the tokenizer's ids, to </s>."""
    ids = list(prompt)
    for _ in range(n):
        best = int(llama_logits(cfg, tensors, np.array([ids]), window=WINDOW)[0, -1, :n_ids].argmax())
        if best == eos:
            break
        ids.append(best)
    return ids[len(prompt) :]


def test_greedy_generation_past_the_window_is_the_argmax_of_the_hf_architecture(hf_folder, imported):
    """Two prompts of different lengths (the shorter left-padded in the cache), 2 * WINDOW new
    tokens each: the decode path's window slides over the cache slots."""
    cfg, tensors = read_hf(hf_folder)
    generator = generate.Generator.from_workdir(imported, log=quiet)
    tok = generator.tokenizer
    prompts = [[tok.bos_id, *tok.encode("def f(x):")], [tok.bos_id, *tok.encode("import os")]]
    got = generator.generate_ids(prompts, max_tokens=2 * WINDOW, temperature=0.0)
    for prompt, ids in zip(prompts, got, strict=True):
        assert ids == _greedy(cfg, tensors, prompt, 2 * WINDOW, tok.vocab_size, tok.eos_id)
        assert len(ids) > WINDOW  # no early </s>: the window really slid


def test_import_then_export_gives_back_the_mistral_folder(hf_folder, imported, tmp_path):
    out = tmp_path / "hf"
    assert main(["--workdir", str(imported), "--to", "hf", str(out)]) == 0
    cfg, tensors = read_hf(out)
    original_cfg, original = read_hf(hf_folder)
    assert tensors.keys() == original.keys()
    for name, x in original.items():
        assert tensors[name].dtype == x.dtype and np.array_equal(tensors[name], x), name
    expected = {k: v for k, v in original_cfg.items() if k != "transformers_version"}
    assert cfg | expected == cfg
    assert not {"attention_bias", "mlp_bias"} & cfg.keys()  # LlamaConfig's, not MistralConfig's


def test_a_null_window_imports_as_none_and_exports_as_llama(hf_folder, tmp_path):
    """Mistral 7B v0.2 on ship `sliding_window: null`: whole-context attention, LLaMA's blocks."""
    src = _changed(hf_folder, tmp_path / "hf", {"sliding_window": None})
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "run")]) == 0
    m = checkpoint.load_params(tmp_path / "run", log=quiet)[1].model
    assert m.sliding_window == 0 and hf_config.architecture(m) == hf_config.LLAMA


@pytest.mark.parametrize(
    "changes, refused",
    [
        (
            {"flavour": "gpt2", "n_kv_heads": 0, "rope_theta": 10000.0},
            "GPT2LMHeadModel as written has no window",
        ),
        ({"qkv_bias": True}, "Qwen2ForCausalLM as written has no window"),
    ],
)
def test_export_refuses_a_window_its_class_cannot_hold(changes, refused):
    m = dataclasses.replace(MODELS["llama"], sliding_window=WINDOW, mlp="auto", **changes)
    with pytest.raises(config.UserError, match=refused):
        hf_config.check_exportable(m)


def test_the_window_is_named_in_the_warm_start_flags():
    assert f"--set model.sliding_window={WINDOW}" in model_sets(_windowed(), 512)
    assert not any("sliding_window" in s for s in model_sets(MODELS["llama"], 512))


# --- the model option -----------------------------------------------------------------------------


def _windowed(**changes) -> config.Model:
    return dataclasses.replace(MODELS["llama"], sliding_window=WINDOW, **changes)


def test_packed_documents_attend_within_their_own_window():
    """A row of two documents (20 and 12 tokens, both longer than the window), positions
    restarting at each as the loader gives them: each document's logits are its own alone."""
    m = _windowed()
    net = nnx.merge(step.abstract_model(m)[0], random_params(m, 7))
    ids_T = jnp.asarray(np.random.default_rng(3).integers(0, 520, 32))
    segment_ids_1T = jnp.asarray([[1] * 20 + [2] * 12])
    positions_1T = jnp.asarray([list(range(20)) + list(range(12))])
    packed = np.asarray(net(ids_T[None], segment_ids_1T, positions_1T))[0]
    first, second = np.asarray(net(ids_T[None, :20]))[0], np.asarray(net(ids_T[None, 20:]))[0]
    np.testing.assert_allclose(packed, np.concatenate([first, second]), atol=1e-5, rtol=1e-5)
    whole = np.asarray(
        nnx.merge(step.abstract_model(MODELS["llama"])[0], random_params(m, 7))(ids_T[None, :20])
    )
    assert np.abs(whole[0] - first).max() > 0.1  # and the window mattered within the first


def test_windowed_model_scanned_unrolled_and_decoded_agree():
    """The forward pass scanned or unrolled, and the KV-cache prefill of the same 24 tokens."""
    params = random_params(_windowed(), 3)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 520, (2, 24)))
    logits = {}
    for scan in (False, True):
        m = _windowed(scan_layers=scan)
        net = nnx.merge(step.abstract_model(m)[0], params)
        logits[scan] = np.asarray(net(ids))
        decoded, _ = net.decode(ids, model.init_cache(m, jnp.zeros(2, jnp.int32), 32))
        np.testing.assert_allclose(np.asarray(decoded), logits[scan], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def test_xla_attention_masks_the_window_as_the_reference_does():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 32, n, 8)), jnp.float32) for n in (4, 2, 2))
    segments = jnp.asarray([[1] * 32, [1] * 11 + [2] * 21])
    windowed = attention(q, k, v, segments, implementation="xla", window=WINDOW)
    np.testing.assert_allclose(windowed, reference(q, k, v, segments, WINDOW), atol=1e-5)
    assert np.abs(np.asarray(windowed - reference(q, k, v, segments))).max() > 0.1
    # A window as long as the row is no window: the reference's plain causal numbers.
    np.testing.assert_allclose(reference(q, k, v, segments, 32), reference(q, k, v, segments), atol=1e-6)


@pytest.mark.parametrize("kernel", ["cudnn", "cudnn_packed", "pallas", "splash"])
def test_kernels_without_a_window_are_refused_in_one_line(kernel):
    q = jnp.zeros((1, 32, 4, 8))
    with pytest.raises(
        config.UserError, match=f"model.attention={kernel} cannot honour .* use model.attention=xla"
    ):
        attention(q, q, q, implementation=kernel, window=WINDOW)
    with pytest.raises(config.UserError, match=f"model.attention={kernel} cannot honour"):
        config.validate(config.Experiment(model=_windowed(attention=kernel)))
    # auto picks xla where it would pick a fused kernel for the same shape without a window
    assert resolve("auto", (1, 128, 4, 64), jnp.bfloat16, True, backend="gpu", capability=(9, 0)) != "xla"
    assert (
        resolve("auto", (1, 128, 4, 64), jnp.bfloat16, True, backend="gpu", capability=(9, 0), window=8)
        == "xla"
    )
    assert resolve("auto", (1, 128, 4, 64), jnp.float32, False, backend="tpu", window=8) == "xla"
