"""Runs imported from Hugging Face folders (`python -m lmjax.export --from-hf`) used as runs:
generation never picks an id the tokenizer cannot decode, evaluation tokenizes with the run's
own tokenizer, and an fp32 checkpoint computes in fp32, as the model it came from.

The folders are exports of lmjax runs with random parameters (test_export.py's helpers): a
LLaMA of vocabulary 520 (table padded to 640) over the 512-piece stdlib tokenizer, so that
ids 512..519 are real to the model and unknown to the tokenizer, as in LLaMA-family
checkpoints whose embedding is padded beyond the tokenizer.
"""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_export import MODELS, quiet, random_params, save_run

from lmjax import checkpoint, evaluate, generate, sampling, step, storage
from lmjax.hf.export import main as export_main

LLAMA = MODELS["llama"]  # fp32 parameters and compute


def _export(run: Path, out: Path, *extra: str) -> Path:
    assert export_main(["--workdir", str(run), "--to", "hf", str(out), *extra]) == 0
    return out


def _import(hf: Path, out: Path) -> Path:
    assert export_main(["--from-hf", str(hf), "--to", "lmjax", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, stdlib_corpus) -> Path:
    """An fp32 LLaMA run of random parameters."""
    workdir = tmp_path_factory.mktemp("run")
    save_run(workdir, "llama", LLAMA, random_params(LLAMA, 0), stdlib_corpus.tokenizer)
    return workdir


@pytest.fixture(scope="module")
def hf_folder(run, tmp_path_factory) -> Path:
    return _export(run, tmp_path_factory.mktemp("hf") / "llama")


def _favouring_ids_past(params: nnx.State, n_pieces: int) -> nnx.State:
    """`params` with an output head under which id `n_pieces` or `n_pieces + 1` is always the
    likeliest by far: their columns are r and -r (one of them is positive against any hidden
    state), the others shrunk a hundredfold."""
    r = np.random.default_rng(1).normal(0, 1, LLAMA.d_model).astype(np.float32)

    def tilt(path, x):
        if not jax.tree_util.keystr(path).startswith("['head']"):
            return x
        head_DV = np.asarray(x) * 0.01
        head_DV[:, n_pieces], head_DV[:, n_pieces + 1] = 3 * r, -3 * r
        return jnp.asarray(head_DV)

    return jax.tree_util.tree_map_with_path(tilt, params)


@pytest.fixture(scope="module")
def imported_past_the_tokenizer(tmp_path_factory, stdlib_corpus) -> Path:
    """An imported run that, left alone, would pick ids 512 or 513: past the tokenizer's 512 pieces."""
    tmp = tmp_path_factory.mktemp("past")
    n_pieces = stdlib_corpus.tokenizer.vocab_size
    assert n_pieces < LLAMA.vocab_size
    params = _favouring_ids_past(random_params(LLAMA, 0), n_pieces)
    save_run(tmp / "run", "llama", LLAMA, params, stdlib_corpus.tokenizer)
    return _import(_export(tmp / "run", tmp / "hf"), tmp / "imported")


# --- generation: only ids the tokenizer can decode ---------------------------------------------


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.9)])
def test_choose_never_picks_an_id_at_or_past_n_ids(top_k, top_p):
    """The ids past `n_ids` hold the highest logits; neither greedy nor sampled choices take them."""
    logits_BV = jax.random.normal(jax.random.key(0), (4, 64)).at[:, 40:].add(20.0)
    keys = jax.random.split(jax.random.key(1), 200)
    draw = jax.jit(jax.vmap(sampling.choose, in_axes=(None, 0, None, None, None, None)))
    drawn = np.asarray(draw(logits_BV, keys, 1.0, top_k, top_p, 40))
    assert drawn.max() < 40 and len(set(drawn.ravel().tolist())) > 1
    greedy = sampling.choose(logits_BV, keys[0], 0.0, top_k, top_p, 40)
    np.testing.assert_array_equal(greedy, np.argmax(logits_BV[:, :40], axis=-1))


def test_generation_from_an_import_picks_only_ids_the_tokenizer_has(imported_past_the_tokenizer):
    generator = generate.Generator.from_workdir(imported_past_the_tokenizer, log=quiet)
    n_pieces = generator.tokenizer.vocab_size
    prompt = [[generator.tokenizer.bos_id, *generator.tokenizer.encode("def f(x):")]]
    for settings in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_k=5)):
        ids = generator.generate_ids(prompt, max_tokens=12, **settings)[0]
        assert ids and max(ids) < n_pieces, (settings, ids)
    # The limit is an argument, as the settings are: two compilations (the prompt, then one
    # token at a time) serve every call.
    assert generator._step._cache_size() == 2


@pytest.mark.parametrize("temperature", ["0", "1.0"])
def test_generate_cli_on_an_import_with_a_padded_vocabulary(imported_past_the_tokenizer, temperature, capsys):
    argv = ["--workdir", str(imported_past_the_tokenizer), "--prompt", "def f(x):", "--max-tokens", "12"]
    assert generate.main([*argv, "--temperature", temperature]) == 0
    assert capsys.readouterr().out.startswith("def f(x):")


# --- evaluation: with the run's own tokenizer ---------------------------------------------------


def test_evaluate_an_import_with_its_own_tokenizer(hf_folder, tmp_path, stdlib_corpus, capsys):
    imported = _import(hf_folder, tmp_path / "imported")
    assert evaluate.main(["--workdir", str(imported)]) == 0
    result = json.loads((imported / "eval.json").read_text())
    assert all(math.isfinite(result[k]) for k in ("loss", "perplexity", "bits_per_byte"))
    assert result["tokens"] > 0 and result["bytes"] > result["tokens"]  # a BPE piece holds bytes
    bits = result["loss"] * result["tokens"] / math.log(2) / result["bytes"]
    assert result["bits_per_byte"] == pytest.approx(bits, rel=1e-6)
    assert (imported / "tokenizer.model").read_bytes() == stdlib_corpus.tokenizer.model_proto
    assert "bits/byte" in capsys.readouterr().out


# --- compute dtype: the checkpoint's --------------------------------------------------------------


def _logits(workdir: Path, ids: np.ndarray) -> np.ndarray:
    """The run's logits as generation and evaluation compute them: in its model.dtype."""
    params, exp = checkpoint.load_params(workdir, log=quiet)
    graphdef, _ = step.abstract_model(exp.model)
    return np.asarray(nnx.merge(graphdef, params)(jnp.asarray(ids)), np.float32)[..., : exp.model.vocab_size]


def test_an_fp32_import_computes_the_source_runs_logits(run, hf_folder, tmp_path, capsys):
    imported = _import(hf_folder, tmp_path / "imported")
    err = capsys.readouterr().err
    assert "computes in float32 (model.dtype;" in err and "--set model.dtype=bfloat16" in err, err
    assert checkpoint.newest_saved(imported, quiet).exp.model.dtype == "float32"
    ids = np.random.default_rng(0).integers(0, LLAMA.vocab_size, (2, 24))
    original = _logits(run, ids)
    assert original.std() > 1.0
    np.testing.assert_allclose(_logits(imported, ids), original, rtol=1e-5, atol=1e-5)


def test_a_bf16_import_computes_in_bf16_and_says_how_to_change_it(run, tmp_path, capsys):
    hf = _export(run, tmp_path / "hf", "--dtype", "bf16")
    imported = _import(hf, tmp_path / "imported")
    err = capsys.readouterr().err
    assert "computes in bfloat16 (model.dtype;" in err and "--set model.dtype=float32" in err, err
    assert checkpoint.newest_saved(imported, quiet).exp.model.dtype == "bfloat16"


def test_an_import_moved_to_a_bucket_evaluates_with_its_own_tokenizer(hf_folder, tmp_path, bucket):
    """The recorded tokenizer path is gone once the folder moves: the run's own copy is read."""
    imported = _import(hf_folder, tmp_path / "imported")
    here = evaluate.evaluate(imported)
    storage.upload_folder(imported, f"{bucket}/imported")
    shutil.rmtree(imported)
    moved = evaluate.evaluate(f"{bucket}/imported")
    assert moved["loss"] == here["loss"] and moved["bits_per_byte"] == here["bits_per_byte"]
