"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`) in and out of lmjax: the llama flavour with `model.qkv_bias`.

A tiny Qwen2 checkpoint with random weights is written here as transformers writes one (Qwen2Config's
config.json, safetensors through the `safetensors` numpy API, plus the stdlib sentencepiece model),
imported, and its logits compared with test_export's numpy forward pass of modeling_llama.py, which
adds modeling_qwen2.py's q/k/v biases where a checkpoint has them; greedy generation (the KV-cache
path) is compared with that forward's argmax; and it is exported back. An lmjax run with qkv_bias
exports as a Qwen2 folder. Tied and untied heads throughout.
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from test_export import (
    MODELS,
    llama_logits,
    llama_table,
    names_of,
    quiet,
    random_params,
    read_hf,
    save_run,
    split_padding,
)

from lmjax import checkpoint, config, flops, generate, model, step
from lmjax.data.tokenizer import Tokenizer
from lmjax.hf.export import main, model_sets

HEADS = {"tied": True, "untied": False}  # tie_word_embeddings


# D=32, H=4, K=2 (GQA), E=8, F=48, L=2, vocab 520 (the stdlib tokenizer's 512 pieces, padded).
def qwen2_table(tied: bool, L: int = 2) -> dict[str, tuple[int, ...]]:
    """LLaMA's tensors plus `nn.Linear(bias=True)`'s biases on q_proj, k_proj and v_proj only."""
    biases = {}
    for i in range(L):
        a = f"model.layers.{i}.self_attn."
        biases |= {a + "q_proj.bias": (32,), a + "k_proj.bias": (16,), a + "v_proj.bias": (16,)}
    return llama_table(tied, L) | biases


def qwen2_config(tied: bool, tok: Tokenizer) -> dict:
    """config.json as transformers 4.57's `Qwen2Config.save_pretrained` writes it."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
        "intermediate_size": 48, "layer_types": ["full_attention", "full_attention"],
        "max_position_embeddings": 64, "max_window_layers": 2, "model_type": "qwen2",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": tied,
        "torch_dtype": "float32", "transformers_version": "4.57.6", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 520,
    }  # fmt: skip


def random_tensors(tied: bool, seed: int) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint: noise of std 0.3 (around 1 for the RMSNorm weights), so
    that a dropped bias or a transposed matrix moves the logits."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in qwen2_table(tied).items():
        noise = rng.normal(0, 0.3, shape).astype(np.float32)
        tensors[name] = noise + 1 if name.endswith("norm.weight") else noise
    return tensors


def write_hf_folder(folder: Path, cfg: dict, tensors: dict[str, np.ndarray], tok: Tokenizer) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save(folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, stdlib_corpus) -> dict[str, Path]:
    """A Qwen2 checkpoint folder per head, written as transformers would write it."""
    tok = stdlib_corpus.tokenizer
    return {
        head: write_hf_folder(
            tmp_path_factory.mktemp("qwen2") / head, qwen2_config(tied, tok), random_tensors(tied, i), tok
        )
        for i, (head, tied) in enumerate(HEADS.items())
    }


@pytest.fixture(scope="module")
def imported(hf_folders, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for head, folder in hf_folders.items():
        out[head] = tmp_path_factory.mktemp("lmjax") / head
        assert main(["--from-hf", str(folder), "--to", "lmjax", str(out[head])]) == 0
    return out


def lmjax_logits(workdir: Path, ids: np.ndarray) -> tuple[np.ndarray, config.Model]:
    params, exp = checkpoint.load_params(workdir, log=quiet)
    graphdef, _ = step.abstract_model(exp.model)
    logits = nnx.merge(graphdef, params)(jnp.asarray(ids))
    return np.asarray(logits)[..., : exp.model.vocab_size], exp.model


def without_biases(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in tensors.items() if not k.endswith(".bias")}


@pytest.mark.parametrize("head", HEADS)
def test_imported_qwen2_logits_equal_the_hf_architecture(head, hf_folders, imported):
    cfg, tensors = read_hf(hf_folders[head])
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 24))
    hf = llama_logits(cfg, tensors, ids)
    ours, m = lmjax_logits(imported[head], ids)

    assert (m.flavour, m.qkv_bias, m.tied, m.dtype) == ("llama", True, HEADS[head], "float32")
    assert (m.rope_theta, m.norm_eps, m.seq_len, m.kv_heads) == (1e6, 1e-6, 64, 2)
    assert hf.std() > 1.0  # logits that mean something
    assert np.abs(hf - llama_logits(cfg, without_biases(tensors), ids)).max() > 0.1  # the biases count
    assert np.abs(ours - hf).max() < 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), hf.argmax(-1))


def greedy_reference(cfg: dict, tensors: dict, prompt: list[int], n: int, n_ids: int, eos: int) -> list[int]:
    """The numpy forward's argmax, one token at a time, over the ids the tokenizer has, to </s>."""
    ids = list(prompt)
    for _ in range(n):
        best = int(llama_logits(cfg, tensors, np.array([ids]))[0, -1, :n_ids].argmax())
        if best == eos:
            break
        ids.append(best)
    return ids[len(prompt) :]


@pytest.mark.parametrize("head", HEADS)
def test_greedy_generation_from_the_import_is_the_argmax_of_the_hf_architecture(head, hf_folders, imported):
    """Prefill then one token at a time through the KV cache, where the biased keys are cached."""
    cfg, tensors = read_hf(hf_folders[head])
    generator = generate.Generator.from_workdir(imported[head], log=quiet)
    tok = generator.tokenizer
    prompt = [tok.bos_id, *tok.encode("def f(x):")]
    got = generator.generate_ids([prompt], max_tokens=5, temperature=0.0)[0]
    assert got == greedy_reference(cfg, tensors, prompt, 5, tok.vocab_size, tok.eos_id)


@pytest.mark.parametrize("head", HEADS)
def test_import_then_export_gives_back_the_qwen2_folder(head, hf_folders, imported, tmp_path):
    out = tmp_path / "hf"
    assert main(["--workdir", str(imported[head]), "--to", "hf", str(out)]) == 0
    cfg, tensors = read_hf(out)
    original_cfg, original = read_hf(hf_folders[head])
    assert tensors.keys() == original.keys() == qwen2_table(HEADS[head]).keys()
    for name, x in original.items():
        assert tensors[name].dtype == x.dtype and np.array_equal(tensors[name], x), name
    expected = {k: v for k, v in original_cfg.items() if k != "transformers_version"}
    assert cfg | expected == cfg
    assert not {"head_dim", "attention_bias", "mlp_bias"} & cfg.keys()  # LlamaConfig's, not Qwen2Config's


QWEN2_MODELS = {  # test_export's LLaMA with q/k/v biases, tied or not
    head: dataclasses.replace(MODELS["llama"], tie_embeddings=tied, qkv_bias=True)
    for head, tied in HEADS.items()
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_corpus) -> dict[str, Path]:
    """An lmjax run per head, llama flavour with qkv_bias, its step-3 checkpoint random."""
    out = {}
    for i, (head, m) in enumerate(QWEN2_MODELS.items()):
        out[head] = tmp_path_factory.mktemp("run") / head
        save_run(out[head], head, m, random_params(m, 10 + i), stdlib_corpus.tokenizer)
    return out


@pytest.mark.parametrize("head", HEADS)
def test_a_run_with_qkv_bias_exports_as_qwen2(head, runs, tmp_path, stdlib_corpus):
    out = tmp_path / "hf"
    assert main(["--workdir", str(runs[head]), "--to", "hf", str(out)]) == 0
    cfg, tensors = read_hf(out)
    assert {k: v.shape for k, v in tensors.items()} == qwen2_table(HEADS[head])
    tok = stdlib_corpus.tokenizer
    written = qwen2_config(HEADS[head], tok) | {"rope_theta": 500.0, "max_position_embeddings": 32}
    assert cfg | {k: v for k, v in written.items() if k != "transformers_version"} == cfg

    ids = np.random.default_rng(1).integers(0, 520, (2, 24))
    hf = llama_logits(cfg, tensors, ids)
    ours, _ = lmjax_logits(runs[head], ids)
    assert hf.std() > 1.0
    np.testing.assert_allclose(ours, hf, rtol=1e-4, atol=1e-4)

    back = tmp_path / "back"  # and in again: the run's parameters, bit for bit
    assert main(["--from-hf", str(out), "--to", "lmjax", str(back)]) == 0
    original = names_of(checkpoint.load_params(runs[head], log=quiet)[0])
    returned = names_of(checkpoint.load_params(back, log=quiet)[0])
    assert original.keys() == returned.keys()
    for k, x in original.items():
        (x, _), (y, pad) = split_padding(k, x, 520), split_padding(k, returned[k], 520)
        assert np.array_equal(x, y) and not pad.any(), k  # padding: dropped on export, zeros on import


# --- what Qwen2's configs say, accepted and refused --------------------------------------------

ACCEPTED = {
    # As Qwen/Qwen2.5-0.5B ships it (transformers 4.40): a window size with the window off, no
    # layer_types, Qwen2-VL's mrope switch off.
    "hub": {
        "sliding_window": 32768,
        "use_mrope": False,
        "layer_types": None,
        "transformers_version": "4.40.1",
    },
    # transformers 5: RoPE's settings under rope_parameters.
    "rope_parameters": {
        "rope_theta": None,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}


def _changed(src: Path, dst: Path, changes: dict) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


@pytest.mark.parametrize("case", ACCEPTED)
def test_import_accepts_the_configs_qwen2_checkpoints_ship(case, hf_folders, imported, tmp_path):
    src = _changed(hf_folders["tied"], tmp_path / "hf", ACCEPTED[case])
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")]) == 0
    a, exp = checkpoint.load_params(tmp_path / "out", log=quiet)
    b, _ = checkpoint.load_params(imported["tied"], log=quiet)
    assert exp.model.rope_theta == 1e6 and exp.model.qkv_bias
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


REFUSED = {  # config.json changes Qwen2ForCausalLM computes and lmjax does not, and the error
    "sliding_window": ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window=True"),
    "layer_types": ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types=["),
    "yarn": ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling="),
}


@pytest.mark.parametrize("case", REFUSED)
def test_import_refuses_what_lmjax_cannot_compute_in_one_line(case, hf_folders, tmp_path, capsys):
    changes, expected = REFUSED[case]
    src = _changed(hf_folders["untied"], tmp_path / "hf", changes)
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("lmjax: error: ") and expected in err and "not supported" in err, err
    assert not (tmp_path / "out").exists()


def test_a_qwen2_folder_with_only_a_tokenizer_json_exits_2_in_one_line(hf_folders, tmp_path, capsys):
    """As Qwen ships its byte-level BPE (tokenizer.json, vocab.json, merges.txt): lmjax
    tokenizes with sentencepiece only, so the import needs a tokenizer.model (hf/tokenizer.py)."""
    src = _changed(hf_folders["tied"], tmp_path / "hf", {})
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE", "byte_fallback": false}}')
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "has a tokenizer.json but no sentencepiece tokenizer.model" in err, err
    assert not (tmp_path / "out").exists()


# --- the model option -----------------------------------------------------------------------------

LLAMA = dataclasses.replace(QWEN2_MODELS["untied"], qkv_bias=False)


def _layer_params(m: config.Model) -> dict[str, nnx.Variable]:
    _, abstract = step.abstract_model(m)
    return dict(abstract["layers"].items())


def test_qkv_bias_adds_three_biases_and_leaves_the_other_parameters_as_they_were():
    plain, biased = _layer_params(LLAMA), _layer_params(QWEN2_MODELS["untied"])
    assert sorted(plain) == sorted(
        ["attn_norm_scale", "w_q", "w_k", "w_v", "w_o", "mlp_norm_scale", "w_gate", "w_up", "w_down"]
    )  # a llama model's tree as before the option: its checkpoints restore
    assert sorted(set(biased) - set(plain)) == ["b_k", "b_q", "b_v"]
    axes = {k: biased[k].get_metadata()["out_sharding"] for k in ("b_q", "b_k", "b_v")}
    assert axes == {
        "b_q": ("layers", "heads", "head_dim"),  # sharded as the heads of w_q, w_k and w_v
        "b_k": ("layers", "kv_heads", "head_dim"),
        "b_v": ("layers", "kv_heads", "head_dim"),
    }
    # Created after every other parameter: each other one draws the key it draws without them.
    a = names_of(nnx.state(model.Transformer(LLAMA, rngs=nnx.Rngs(0)), nnx.Param))
    b = names_of(nnx.state(model.Transformer(QWEN2_MODELS["untied"], rngs=nnx.Rngs(0)), nnx.Param))
    assert all(np.array_equal(x, b[k]) for k, x in a.items())
    n = sum(x.size for x in b.values())
    assert n == flops.count_params(QWEN2_MODELS["untied"]) == flops.count_params(LLAMA) + 2 * (32 + 16 + 16)


def test_qkv_bias_scanned_unrolled_and_decoded_agree():
    """The forward pass scanned or unrolled, and the KV-cache prefill, with non-zero biases."""
    params = random_params(QWEN2_MODELS["untied"], 3)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 520, (2, 16)))
    logits = {}
    for scan in (False, True):
        m = dataclasses.replace(QWEN2_MODELS["untied"], scan_layers=scan)
        net = nnx.merge(step.abstract_model(m)[0], params)
        logits[scan] = np.asarray(net(ids))
        cache = model.init_cache(m, jnp.zeros(2, jnp.int32), 32)
        decoded, _ = net.decode(ids, cache)
        np.testing.assert_allclose(np.asarray(decoded), logits[scan], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def test_qkv_bias_is_refused_for_gpt2_and_named_in_the_warm_start_flags():
    with pytest.raises(config.UserError, match="model.qkv_bias=true is for the llama flavour"):
        config.validate(config.Experiment(model=config.Model(flavour="gpt2", qkv_bias=True)))
    assert "--set model.qkv_bias=true" in model_sets(QWEN2_MODELS["tied"], 512)
    assert not any("qkv_bias" in s for s in model_sets(LLAMA, 512))
