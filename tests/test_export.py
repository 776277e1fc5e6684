"""Hugging Face interop (`python -m lmjax.export`), on 8 emulated devices.

The runs exported here hold random parameters (norm scales and biases too), saved through
`checkpoint.Checkpoints` as training saves them, so that a swapped norm or a transposed square
matrix changes the logits. What the Hugging Face side expects is written out by hand below
(tensor names and shapes, config fields) and computed by a numpy forward pass written from
transformers' modeling_gpt2.py and modeling_llama.py (with modeling_qwen2.py's q/k/v biases,
for test_qwen2.py), not from lmjax's export code.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import tiny_train_argv
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save as safetensors_save

from lmjax import checkpoint, config, sharding, step
from lmjax.data.tokenizer import Tokenizer
from lmjax.hf.export import main, model_sets

# D=32, H=4, E=8, L=2, T=32. GPT-2: vocab 516, LLaMA: 520, 2 kv heads (GQA); both padded to 640 in
# lmjax (the tokenizer has 512 pieces).
MODELS = {
    "gpt2": config.Model(
        flavour="gpt2", vocab_size=516, d_model=32, n_layers=2, n_heads=4, d_ff=64, seq_len=32
    ),
    "llama": config.Model(
        flavour="llama",
        vocab_size=520,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        seq_len=32,
        rope_theta=500.0,
        norm_eps=1e-6,
    ),
}
MODELS["llama_tied"] = config.Model(**{**vars(MODELS["llama"]), "tie_embeddings": True})
MODELS = {
    k: config.Model(**{**vars(m), "dtype": "float32", "param_dtype": "float32"}) for k, m in MODELS.items()
}


def gpt2_table(L=2):
    t = {"transformer.wte.weight": (516, 32), "transformer.wpe.weight": (32, 32)}
    for i in range(L):
        h = f"transformer.h.{i}."
        t |= {
            h + "ln_1.weight": (32,), h + "ln_1.bias": (32,),
            h + "attn.c_attn.weight": (32, 96), h + "attn.c_attn.bias": (96,),  # Conv1D: [in, out]
            h + "attn.c_proj.weight": (32, 32), h + "attn.c_proj.bias": (32,),
            h + "ln_2.weight": (32,), h + "ln_2.bias": (32,),
            h + "mlp.c_fc.weight": (32, 64), h + "mlp.c_fc.bias": (64,),
            h + "mlp.c_proj.weight": (64, 32), h + "mlp.c_proj.bias": (32,),
        }  # fmt: skip
    return t | {"transformer.ln_f.weight": (32,), "transformer.ln_f.bias": (32,)}  # lm_head tied: absent


def llama_table(tied, L=2):
    t = {"model.embed_tokens.weight": (520, 32), "model.norm.weight": (32,)}
    for i in range(L):
        h = f"model.layers.{i}."
        t |= {
            h + "input_layernorm.weight": (32,), h + "post_attention_layernorm.weight": (32,),
            h + "self_attn.q_proj.weight": (32, 32), h + "self_attn.k_proj.weight": (16, 32),  # [out, in]
            h + "self_attn.v_proj.weight": (16, 32), h + "self_attn.o_proj.weight": (32, 32),
            h + "mlp.gate_proj.weight": (48, 32), h + "mlp.up_proj.weight": (48, 32),
            h + "mlp.down_proj.weight": (32, 48),
        }  # fmt: skip
    return t if tied else t | {"lm_head.weight": (520, 32)}


TABLES = {"gpt2": gpt2_table(), "llama": llama_table(tied=False), "llama_tied": llama_table(tied=True)}
HF_CONFIG = {
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 516, "n_embd": 32,
        "n_layer": 2, "n_head": 4, "n_inner": 64, "n_positions": 32, "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 520, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 500.0, "rope_scaling": None, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "max_position_embeddings": 32, "bos_token_id": 1, "eos_token_id": 2,
    },
}  # fmt: skip
HF_CONFIG["llama_tied"] = HF_CONFIG["llama"] | {"tie_word_embeddings": True}


def quiet(_):
    pass


def split_padding(name: str, x: np.ndarray, V: int) -> tuple[np.ndarray, np.ndarray]:
    """(the real vocabulary's part, lmjax's padding) of parameter `name`."""
    if name.startswith("['embed']"):
        return x[:V], x[V:]
    if name.startswith("['head']"):
        return x[:, :V], x[:, V:]
    return x, np.zeros(0, x.dtype)


def names_of(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def random_params(m: config.Model, seed: int) -> nnx.State:
    """Random parameters of `m`: noise of std 0.3, around 1 for the norm scales."""
    _, abstract = step.abstract_model(m)
    rng = np.random.default_rng(seed)

    def fill(path, a):
        noise = rng.normal(0, 0.3, a.shape).astype(a.dtype)
        return jnp.asarray(noise + 1 if "scale" in jax.tree_util.keystr(path) else noise)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def save_run(workdir: Path, name: str, m: config.Model, params: nnx.State, tokenizer: Tokenizer) -> None:
    """A run folder holding `params` as its step-3 checkpoint (saved as training saves one)."""
    ckpts = checkpoint.Checkpoints(workdir, log=quiet)
    exp = config.Experiment(name=name, model=m)
    ckpts.save({"params": params, "step": jnp.asarray(3, jnp.int32)}, {"loader": {}}, exp)
    ckpts.wait()
    ckpts.close()
    tokenizer.save(workdir / "tokenizer.model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_corpus) -> dict[str, Path]:
    """A run folder per model, its checkpoint (step 3) holding random parameters."""
    out = {}
    for i, (name, m) in enumerate(MODELS.items()):
        out[name] = tmp_path_factory.mktemp(name)
        save_run(out[name], name, m, random_params(m, i), stdlib_corpus.tokenizer)
    return out


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, Path]:
    """fp32 exports; GPT-2 sharded (40 kB files), the others one file; plus a bf16 LLaMA."""
    out = {}
    for name, workdir in runs.items():
        out[name] = tmp_path_factory.mktemp("hf") / name
        shards = ["--shard-size", "40KB"] if name == "gpt2" else []
        assert main(["--workdir", str(workdir), "--to", "hf", str(out[name]), *shards]) == 0
    out["llama_bf16"] = tmp_path_factory.mktemp("hf") / "llama_bf16"
    assert (
        main(["--workdir", str(runs["llama"]), "--to", "hf", str(out["llama_bf16"]), "--dtype", "bf16"]) == 0
    )
    return out


def read_hf(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return json.loads((folder / "config.json").read_text()), tensors


@pytest.mark.parametrize("name", MODELS)
def test_names_shapes_dtypes_and_config_are_what_transformers_expects(name, exported):
    cfg, tensors = read_hf(exported[name])
    assert [p.name for p in exported[name].parent.iterdir()] == [name]  # the .partial folder renamed
    assert {k: v.shape for k, v in tensors.items()} == TABLES[name]
    assert {v.dtype for v in tensors.values()} == {np.dtype(np.float32)}
    assert cfg | HF_CONFIG[name] == cfg and cfg["torch_dtype"] == "float32"
    if name == "gpt2":  # sharded as save_pretrained shards: an index naming every tensor's file
        index = json.loads((exported[name] / "model.safetensors.index.json").read_text())
        files = sorted(p.name for p in exported[name].glob("*.safetensors"))
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert set(index["weight_map"]) == set(TABLES[name]) and set(index["weight_map"].values()) == set(
            files
        )
        assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    else:
        assert [p.name for p in exported[name].glob("*.safetensors")] == ["model.safetensors"]


def test_bf16_export_is_the_fp32_one_rounded(exported):
    cfg, bf16 = read_hf(exported["llama_bf16"])
    _, fp32 = read_hf(exported["llama"])
    assert cfg["torch_dtype"] == "bfloat16" and {v.dtype for v in bf16.values()} == {
        np.dtype(ml_dtypes.bfloat16)
    }
    for k, v in fp32.items():
        assert np.array_equal(bf16[k], v.astype(ml_dtypes.bfloat16)), k


def test_files_are_byte_for_byte_what_the_safetensors_library_writes(exported):
    """The streaming writer lays out header and data as `safetensors.numpy.save` does."""
    for folder in (exported["gpt2"], exported["llama_bf16"]):
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), framework="numpy") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
            assert path.read_bytes() == safetensors_save(tensors, metadata={"format": "pt"})


# --- an independent forward pass of the Hugging Face architectures, in float64 numpy -----------


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _attend(q_BHTE, k_BHTE, v_BHTE, window=0):
    """Causal softmax attention; `window` > 0: each query sees the last `window` keys, itself
    included (modeling_mistral.py's sliding window: key s is seen from query t when t - s < window)."""
    T, E = q_BHTE.shape[2], q_BHTE.shape[3]
    s = q_BHTE @ k_BHTE.swapaxes(-1, -2) / np.sqrt(E)
    seen_TS = np.tril(np.ones((T, T), bool))
    if window:
        seen_TS &= np.triu(np.ones((T, T), bool), 1 - window)
    s = np.where(seen_TS, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    o = (p / p.sum(-1, keepdims=True)) @ v_BHTE
    return o.transpose(0, 2, 1, 3).reshape(o.shape[0], T, -1)  # merge heads: [B, T, H*E]


def gpt2_logits(cfg, w, ids):
    """modeling_gpt2.py: Conv1D is x @ W + b with W [in, out]; c_attn splits into q, k, v of
    n_embd each; gelu_new is the tanh approximation; logits = h @ wte.T (tied)."""
    B, T = ids.shape
    D, H, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    w = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in w.items()}
    x = w["wte.weight"][ids] + w["wpe.weight"][np.arange(T)]
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        h = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, H, D // H).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, axis=-1))
        x = x + _attend(q, k, v) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        u = h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
        u = 0.5 * u * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (u + 0.044715 * u**3)))
        x = x + u @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    x = _layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps)
    return x @ w.get("lm_head.weight", w["wte.weight"]).T


def llama_logits(cfg, w, ids, window=0):
    """modeling_llama.py: nn.Linear is x @ W.T (+ b where the checkpoint has a bias: Qwen2's
    q_proj, k_proj and v_proj in modeling_qwen2.py, added before RoPE); RoPE rotate_half with
    cos/sin of cat(freqs, freqs); repeat_kv gives query head h the kv head h // (H / K); RMSNorm.
    `window` > 0: modeling_mistral.py's sliding window in every layer (`_attend`)."""
    B, T = ids.shape
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E = cfg.get("head_dim", cfg["hidden_size"] // H)  # Qwen2Config has none: getattr's default
    eps = cfg["rms_norm_eps"]
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, E, 2) / E)
    emb = np.concatenate([np.outer(np.arange(T), inv_freq)] * 2, axis=-1)  # [T, E]
    cos, sin = np.cos(emb), np.sin(emb)

    def rotate_half(x):
        return np.concatenate([-x[..., E // 2 :], x[..., : E // 2]], axis=-1)

    def heads(t, n):
        return t.reshape(B, T, n, E).transpose(0, 2, 1, 3)

    def projected(h, name, n):  # nn.Linear: bias=True only for Qwen2's q, k and v
        return heads(h @ w[name + ".weight"].T + w.get(name + ".bias", 0.0), n)

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = projected(h, p + "self_attn.q_proj", H)
        k = projected(h, p + "self_attn.k_proj", K)
        v = projected(h, p + "self_attn.v_proj", K)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)
        x = x + _attend(q, k, v, window) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = (
            x
            + (gate / (1 + np.exp(-gate)) * (h @ w[p + "mlp.up_proj.weight"].T))
            @ w[p + "mlp.down_proj.weight"].T
        )
    x = rms(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


@pytest.mark.parametrize("name", MODELS)
def test_logits_of_the_hf_architecture_equal_lmjax_logits(name, runs, exported):
    cfg, tensors = read_hf(exported[name])
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 24))
    hf = (gpt2_logits if cfg["model_type"] == "gpt2" else llama_logits)(cfg, tensors, ids)

    params, exp = checkpoint.load_params(runs[name], log=quiet)
    graphdef, _ = step.abstract_model(exp.model)
    ours = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(ids)))[..., : cfg["vocab_size"]]
    assert hf.std() > 1.0  # logits that mean something: a permuted tensor moves them far
    np.testing.assert_allclose(ours, hf, rtol=1e-4, atol=1e-4)


# --- import -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(exported, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name in MODELS:
        out[name] = tmp_path_factory.mktemp("lmjax") / name
        assert main(["--from-hf", str(exported[name]), "--to", "lmjax", str(out[name])]) == 0
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("devices", [1, 8])
def test_export_then_import_gives_back_the_parameters_bit_for_bit(name, devices, runs, imported):
    original, _ = checkpoint.load_params(runs[name], log=quiet)
    if devices == 1:
        back, exp = checkpoint.load_params(imported[name], log=quiet)
        assert {a.sharding.device_set.pop() for a in jax.tree.leaves(back)} == {jax.devices()[0]}
    else:  # onto a 1 x 4 x 2 (data, fsdp, tensor) mesh: sharded over all 8 devices
        exp = config.Experiment(model=MODELS[name], mesh=config.Mesh(data=1, fsdp=4, tensor=2))
        mesh = sharding.make_mesh(exp)
        with sharding.use(mesh, exp.mesh.rules):
            back, exp = checkpoint.load_params(imported[name], mesh, log=quiet)
        assert all(len(a.sharding.device_set) == 8 for a in jax.tree.leaves(back))
    assert exp.model.vocab_size == MODELS[name].vocab_size and exp.model.tied == MODELS[name].tied
    original, back = names_of(original), names_of(back)
    assert original.keys() == back.keys()
    V = MODELS[name].vocab_size
    for k, x in original.items():
        assert x.dtype == back[k].dtype and x.shape == back[k].shape, k
        (x, _), (y, pad) = split_padding(k, x, V), split_padding(k, back[k], V)
        assert np.array_equal(x, y) and not pad.any(), k  # padding: dropped on export, zeros on import


def test_warm_start_trains_from_an_imported_checkpoint(imported, tmp_path, capsys):
    from lmjax import train

    sets = [s.removeprefix("--set ") for s in model_sets(MODELS["gpt2"], 512)]
    argv = tiny_train_argv(
        tmp_path, "train.steps=1", "train.eval_every=0", f"checkpoint.init_from={imported['gpt2']}", *sets
    )
    assert train.main(argv) == 0
    assert f"warm start from {imported['gpt2']}" in capsys.readouterr().err


def test_tokenizer_json_encodes_as_sentencepiece_does(exported, stdlib_corpus):
    tokenizers = pytest.importorskip("tokenizers")
    folder = exported["gpt2"]
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.encode_special_tokens = True  # what transformers does with split_special_tokens=True
    sp = stdlib_corpus.tokenizer
    texts = [p.read_text() for p in sorted(Path(json.__file__).parent.parent.glob("*.py"))[:40]]
    texts += [
        "  tabs\tand  double  spaces\n\n\nend ",
        "ünïcödé ☃ 🙂 \x00 中文",
        " leading space",
        "",
        "r'(?P<s>x)</s><unk>'",
    ]
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == [sp.bos_id] + sp.encode(text), text[:80]
        assert tok.decode(ids, skip_special_tokens=True) == text
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["split_special_tokens"]
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert (folder / "tokenizer.model").read_bytes() == sp.model_proto


def _broken(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | changes))
    return dst


REFUSALS = {
    "vocab": (
        {"vocab_size": 600},
        "tensor model.embed_tokens.weight has shape (520, 32) but LlamaForCausalLM of",
        "needs (600, 32)",
    ),
    "kv_heads": (
        {"num_key_value_heads": 4},
        "tensor model.layers.0.self_attn.k_proj.weight has shape (16, 32)",
        "needs (32, 32)",
    ),
    "heads": (
        {"num_attention_heads": 8, "head_dim": 4},
        "tensor model.layers.0.self_attn.k_proj.weight",
        "(8, 32)",
    ),
    "architecture": (
        {"architectures": ["MixtralForCausalLM"]},  # Mistral's mixture of experts
        "architectures=['MixtralForCausalLM']",
        "reads",
    ),
    "rope_scaling": (
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        "rope_scaling=",
        "not supported",
    ),
    "bias": ({"attention_bias": True}, "attention_bias=True is not supported", ""),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_import_mismatch_exits_2_naming_the_tensor_and_shapes(case, exported, tmp_path, capsys):
    changes, *expected = REFUSALS[case]
    src = _broken(exported["llama"], tmp_path / "hf", **changes)
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmjax: error: ") and all(e in err[0] for e in expected), err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_import_refuses_a_folder_without_a_sentencepiece_model(exported, tmp_path, capsys):
    src = _broken(exported["gpt2"], tmp_path / "hf")
    (src / "tokenizer.model").unlink()
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "has a tokenizer.json but no sentencepiece tokenizer.model" in err


def test_gpt2_files_without_the_transformer_prefix_and_with_mask_buffers_import(exported, imported, tmp_path):
    """As openai-community/gpt2 ships them: `h.0.attn.c_attn.weight`, plus `h.N.attn.bias` masks."""
    src = _broken(exported["gpt2"], tmp_path / "hf")
    _, tensors = read_hf(src)
    for path in src.glob("model*"):
        path.unlink()
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed |= {f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 32, 32), np.float32)) for i in range(2)}
    (src / "model.safetensors").write_bytes(safetensors_save(renamed, metadata={"format": "pt"}))
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")]) == 0
    a, _ = checkpoint.load_params(tmp_path / "out", log=quiet)
    b, _ = checkpoint.load_params(imported["gpt2"], log=quiet)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_export_bad_input_exits_2(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (
            ["--workdir", str(tmp_path / "empty"), "--to", "hf", str(tmp_path / "o1")],
            "holds no checkpoint",
        ),
        (["--workdir", str(runs["gpt2"]), "--to", "lmjax", str(tmp_path / "o2")], "--to hf OUT"),
        (["--workdir", str(runs["gpt2"]), "--to", "hf", str(runs["gpt2"])], "is not empty"),
        (
            ["--workdir", str(runs["gpt2"]), "--to", "hf", str(tmp_path / "o3"), "--shard-size", "big"],
            "--shard-size",
        ),
    ]
    for argv, expected in cases:
        assert main(argv) == 2
        (err,) = capsys.readouterr().err.strip().splitlines()
        assert expected in err, err


def test_bf16_import_holds_the_bf16_values(exported, runs, tmp_path):
    assert (
        main(
            [
                "--from-hf",
                str(exported["llama_bf16"]),
                "--to",
                "lmjax",
                str(tmp_path / "o"),
                "--dtype",
                "bf16",
            ]
        )
        == 0
    )
    back, exp = checkpoint.load_params(tmp_path / "o", log=quiet)
    original, _ = checkpoint.load_params(runs["llama"], log=quiet)
    assert exp.model.param_dtype == "bfloat16"
    V = MODELS["llama"].vocab_size
    back = names_of(back)
    for k, x in names_of(original).items():
        (x, _), (y, _) = split_padding(k, x, V), split_padding(k, back[k], V)
        assert y.dtype == ml_dtypes.bfloat16 and np.array_equal(y, x.astype(ml_dtypes.bfloat16)), k


# --- review fixes: tokenizer config, error paths, dtypes, accepted configs, atomic import -------


def _variant(model_proto: bytes, **normalizer) -> bytes:
    """The stdlib tokenizer with `normalizer_spec` fields changed (model_type: the trainer's)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    if "model_type" in normalizer:
        proto.trainer_spec.model_type = normalizer.pop("model_type")
    for key, value in normalizer.items():
        setattr(proto.normalizer_spec, key, value)
    return proto.SerializeToString()


TOKENIZER_VARIANTS = {  # changes, add_prefix_space, whether the fast conversion differs
    "dummy_prefix": ({"add_dummy_prefix": True}, True, False),  # as LLaMA-2's and TinyLlama's
    "unigram": ({"model_type": 1}, False, True),
    "extra_whitespace": ({"remove_extra_whitespaces": True, "add_dummy_prefix": True}, True, True),
}


@pytest.mark.parametrize("case", TOKENIZER_VARIANTS)
def test_tokenizer_config_without_tokenizer_json_matches_the_model(case, stdlib_corpus, tmp_path):
    """LlamaConverter prepends "▁" only when add_prefix_space; it cannot follow sentencepiece's
    normalisation rules or a unigram model, which the note says, with use_fast=False."""
    from lmjax.hf import tokenizer as hf_tokenizer

    changes, prefix, differs = TOKENIZER_VARIANTS[case]
    notes = hf_tokenizer.export(_variant(stdlib_corpus.tokenizer.model_proto, **changes), tmp_path, 32)
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert not (tmp_path / "tokenizer.json").exists() and tok_cfg["tokenizer_class"] == "LlamaTokenizer"
    assert tok_cfg["add_prefix_space"] is prefix and tok_cfg["legacy"] is True
    (note,) = notes
    assert note.startswith("no tokenizer.json (")
    assert ("use_fast=False" in note) is differs, note
    assert ("encodes the same" in note) is not differs, note


def test_export_of_a_unigram_run_says_to_load_it_with_use_fast_false(runs, stdlib_corpus, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(runs["llama"], workdir)
    (workdir / "tokenizer.model").write_bytes(_variant(stdlib_corpus.tokenizer.model_proto, model_type=1))
    assert main(["--workdir", str(workdir), "--to", "hf", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"AutoTokenizer.from_pretrained({tmp_path / 'out'}, use_fast=False)" in err, err


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("lmjax: error: ")
    return err


def _damage_truncated(src: Path) -> str:
    path = src / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "model.safetensors is not a readable safetensors file"


def _damage_garbage(src: Path) -> str:
    (src / "model.safetensors").write_bytes(b"\xff" * 64)
    return "model.safetensors is not a readable safetensors file"


def _damage_missing_shard(src: Path) -> str:
    (src / "model-00002-of-00003.safetensors").unlink()
    return "names model-00002-of-00003.safetensors, which is not in"


def _damage_index_json(src: Path) -> str:
    (src / "model.safetensors.index.json").write_text('{"weight_map": {')
    return "model.safetensors.index.json is not a safetensors index"


def _damage_index_keys(src: Path) -> str:
    (src / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return "model.safetensors.index.json is not a safetensors index"


DAMAGE = {  # what is done to a copy of an export (llama: one file; gpt2: 3 shards), and the error
    "truncated": ("llama", _damage_truncated),
    "garbage": ("llama", _damage_garbage),
    "missing_shard": ("gpt2", _damage_missing_shard),
    "index_json": ("gpt2", _damage_index_json),
    "index_keys": ("gpt2", _damage_index_keys),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_import_of_damaged_files_exits_2_in_one_line(case, exported, tmp_path, capsys):
    name, damage = DAMAGE[case]
    src = _broken(exported[name], tmp_path / "hf")
    if name == "gpt2":
        assert len(list(src.glob("model-*-of-00003.safetensors"))) == 3
    expected = damage(src)
    err = _one_line_error(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")], capsys)
    assert expected in err and str(src) in err, err
    assert not (tmp_path / "out").exists()


def test_an_existing_file_as_the_output_folder_exits_2(runs, exported, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for argv in (
        ["--workdir", str(runs["llama"]), "--to", "hf", str(tmp_path / "file")],
        ["--from-hf", str(exported["llama"]), "--to", "lmjax", str(tmp_path / "file")],
    ):
        assert f"{tmp_path / 'file'} is a file; give a new folder" in _one_line_error(argv, capsys)
    argv = ["--workdir", str(runs["llama"]), "--to", "hf", str(tmp_path / "file" / "out")]
    assert "cannot create" in _one_line_error(argv, capsys)
    assert (tmp_path / "file").read_text() == "x"


def test_import_refuses_non_float_tensors_and_reads_float16(exported, runs, tmp_path, capsys):
    src = _broken(exported["llama"], tmp_path / "hf")
    _, tensors = read_hf(src)
    name = "model.layers.1.mlp.up_proj.weight"
    ints = tensors | {name: tensors[name].astype(np.int64)}
    (src / "model.safetensors").write_bytes(safetensors_save(ints, metadata={"format": "pt"}))
    err = _one_line_error(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")], capsys)
    assert f"tensor {name} is I64; lmjax imports floating-point weights only" in err, err

    halves = {k: v.astype(np.float16) for k, v in tensors.items()}
    (src / "model.safetensors").write_bytes(safetensors_save(halves, metadata={"format": "pt"}))
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")]) == 0
    back, _ = checkpoint.load_params(tmp_path / "out", log=quiet)
    original, _ = checkpoint.load_params(runs["llama"], log=quiet)
    back, V = names_of(back), MODELS["llama"].vocab_size
    for k, x in names_of(original).items():
        (x, _), (y, _) = split_padding(k, x, V), split_padding(k, back[k], V)
        assert y.dtype == np.float32 and np.array_equal(y, x.astype(np.float16).astype(np.float32)), k


ACCEPTED = {  # config.json changes that describe the model lmjax computes
    "gpt2_no_activation": ("gpt2", {"activation_function": None}),  # GPT2Config's default: gelu_new
    "rope_type_default": ("llama", {"rope_scaling": {"rope_type": "default"}}),
    "type_default": ("llama", {"rope_scaling": {"type": "default"}}),
}


@pytest.mark.parametrize("case", ACCEPTED)
def test_import_accepts_configs_that_mean_the_defaults(case, exported, imported, tmp_path):
    name, changes = ACCEPTED[case]
    src = _broken(exported[name], tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text()) | changes
    (src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    assert main(["--from-hf", str(src), "--to", "lmjax", str(tmp_path / "out")]) == 0
    a, _ = checkpoint.load_params(tmp_path / "out", log=quiet)
    b, _ = checkpoint.load_params(imported[name], log=quiet)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_a_failed_import_leaves_no_folder_and_a_rerun_works(exported, tmp_path, monkeypatch, capsys):
    """A failure after the checkpoint is saved (writing tokenizer.model, the last file)."""
    from lmjax.config import UserError
    from lmjax.hf import export

    real = export.write_atomic

    def failing(path, data):
        if path.name == "tokenizer.model":
            raise UserError(f"disk full writing {path}")
        real(path, data)

    monkeypatch.setattr(export, "write_atomic", failing)
    dest = tmp_path / "out"
    assert "disk full" in _one_line_error(
        ["--from-hf", str(exported["llama"]), "--to", "lmjax", str(dest)], capsys
    )
    assert list(tmp_path.iterdir()) == []  # neither DIR nor its .partial sibling
    monkeypatch.setattr(export, "write_atomic", real)
    assert main(["--from-hf", str(exported["llama"]), "--to", "lmjax", str(dest)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    m = checkpoint.load_params(dest, log=quiet)[1].model
    assert (m.flavour, m.vocab_size, m.n_kv_heads) == ("llama", 520, 2)


def test_import_assembles_the_model_on_the_host_cpu(monkeypatch):
    from lmjax.hf.export import host_device

    assert host_device() == jax.local_devices(backend="cpu")[0] and host_device().platform == "cpu"
    real = jax.local_devices

    def no_cpu(*args, backend=None, **kwargs):  # JAX_PLATFORMS=cuda: no CPU backend loaded
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(jax, "local_devices", no_cpu)
    assert host_device() == real()[0]


# --- recipe options (config.Model: mlp, qk_norm, zero_init, logit_softcap, z_loss) ----------------


@pytest.mark.parametrize(
    "name, changes, refused",
    [
        ("gpt2", {"qk_norm": True}, "model.qk_norm=true (GPT2LMHeadModel has no query/key norm)"),
        ("llama", {"logit_softcap": 30.0}, "model.logit_softcap=30.0 (LlamaForCausalLM has no logit"),
        ("gpt2", {"mlp": "relu2"}, "model.mlp=relu2 (GPT2LMHeadModel's MLP is gelu"),
        ("gpt2", {"mlp": "swiglu"}, "model.mlp=swiglu (GPT2LMHeadModel's MLP is gelu"),
        ("llama", {"mlp": "gelu"}, "model.mlp=gelu (LlamaForCausalLM's MLP is swiglu"),
        ("gpt2", {"n_kv_heads": 2}, "model.n_kv_heads=2 (GPT2LMHeadModel has no grouped-query attention)"),
        ("gpt2", {"mlp": "gelu", "zero_init": True, "z_loss": 1e-4}, None),  # training-only options
        ("llama", {"mlp": "swiglu", "zero_init": True, "z_loss": 1e-4}, None),
    ],
)
def test_export_config_refuses_what_the_hf_classes_cannot_compute(name, changes, refused):
    from lmjax.hf import config as hf_config

    m = config.Model(**{**vars(MODELS[name]), **changes})
    if refused is None:
        assert hf_config.hf_config(m, 1, 2, "float32")["architectures"] == [hf_config.architecture(m)]
        return
    with pytest.raises(config.UserError, match="cannot be exported") as e:
        hf_config.hf_config(m, 1, 2, "float32")
    assert refused in str(e.value)


def test_export_of_a_run_with_recipe_options_exits_2_before_writing(tmp_path, capsys):
    """One line naming every option HF's class lacks (not zero_init or z_loss); no output folder."""
    options = {"mlp": "relu2", "qk_norm": True, "logit_softcap": 30.0, "zero_init": True, "z_loss": 1e-4}
    m = config.Model(**{**vars(MODELS["gpt2"]), **options})
    workdir = tmp_path / "run"
    _, abstract = step.abstract_model(m)
    ckpts = checkpoint.Checkpoints(workdir, log=quiet)
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
    exp = config.Experiment(model=m)
    ckpts.save({"params": params, "step": jnp.asarray(1, jnp.int32)}, {"loader": {}}, exp)
    ckpts.wait()
    ckpts.close()
    err = _one_line_error(["--workdir", str(workdir), "--to", "hf", str(tmp_path / "out")], capsys)
    for named in ("model.mlp=relu2", "model.qk_norm=true", "model.logit_softcap=30.0"):
        assert named in err, err
    assert "zero_init" not in err and "z_loss" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
