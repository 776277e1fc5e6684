"""Generation: KV-cached decoding against the full forward pass, the sampling filters against
sets worked out in numpy, and `python -m lmjax.generate` on a short stdlib run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_experiment
from flax import nnx

from lmjax import generate, model, sampling, sharding, step

# (prompt length, tokens decoded one at a time after it) per row: rows of different lengths.
ROWS = [(5, 4), (11, 4), (2, 4), (8, 4)]


EIGHT = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


@pytest.mark.parametrize(
    "flavour, devices, sets",
    [
        ("gpt2", 1, ()),
        ("llama", 1, ()),  # GQA: 4 query heads share 2 kv heads
        ("gpt2", 8, EIGHT),
        ("llama", 8, (*EIGHT, "model.scan_layers=true")),
    ],
    ids=["gpt2-1dev", "llama-1dev", "gpt2-8dev", "llama-8dev-scan"],
)
def test_cached_decoding_equals_the_full_forward_pass(flavour, devices, sets):
    """Left-padded prompts of different lengths are prefilled at once, then tokens go in one by
    one; every logit equals the full forward pass of that row's sequence alone, unpadded."""
    exp = tiny_experiment(flavour, *sets)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 256, p + d) for p, d in ROWS]
    reference = model.Transformer(exp.model, rngs=nnx.Rngs(0))
    full = [np.asarray(reference(jnp.asarray(s)[None])[0, :, :256]) for s in seqs]

    T = max(p for p, _ in ROWS)
    prompts_BT = np.zeros((len(ROWS), T), np.int32)
    start_B = np.array([T - p for p, _ in ROWS], np.int32)
    for b, (p, _) in enumerate(ROWS):
        prompts_BT[b, start_B[b] :] = seqs[b][:p]
    mesh = sharding.make_mesh(exp, jax.devices()[:devices])
    graphdef, params = nnx.split(reference)

    @jax.jit
    def decode(params, tokens_BT, cache):
        return nnx.merge(graphdef, params).decode(tokens_BT, cache)

    with sharding.use(mesh, exp.mesh.rules):
        params = jax.device_put(params, sharding.state_shardings(params, mesh))
        cache = jax.jit(lambda s: model.init_cache(exp.model, s, T + 4))(jnp.asarray(start_B))
        logits_BTV, cache = decode(params, jnp.asarray(prompts_BT), cache)
        laid_out = sharding.named(mesh, ("layers", "act_batch", None, "act_kv_heads", None))
        assert cache.k_LBSKE.sharding.is_equivalent_to(laid_out, 5)  # like the activations
        for b, (p, _) in enumerate(ROWS):
            np.testing.assert_allclose(logits_BTV[b, T - p :, :256], full[b][:p], atol=2e-5, rtol=2e-5)
        for t in range(4):
            tokens_B1 = np.array([[s[p + t]] for s, (p, _) in zip(seqs, ROWS, strict=True)], np.int32)
            logits_BTV, cache = decode(params, jnp.asarray(tokens_B1), cache)
            for b, (p, _) in enumerate(ROWS):
                np.testing.assert_allclose(logits_BTV[b, 0, :256], full[b][p + t], atol=2e-5, rtol=2e-5)


def _allowed_by_hand(logits_V, top_k, top_p):
    """The ids top-k then top-p sampling may return, from the definitions: the k highest; of
    those, the highest-first prefix that stops at the first id bringing the mass to top_p."""
    order = np.argsort(-logits_V, kind="stable")[: top_k or len(logits_V)]
    probs = np.exp(logits_V[order] - logits_V[order].max())
    probs /= probs.sum()
    kept = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
    return set(order[: min(kept, len(order))].tolist())


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.5), (20, 0.8), (1, 1.0)])
def test_sampling_never_leaves_the_allowed_set(top_k, top_p):
    logits_BV = jax.random.normal(jax.random.key(1), (4, 64)) * 3
    keys = jax.random.split(jax.random.key(2), 300)
    draw = jax.jit(jax.vmap(sampling.choose, in_axes=(None, 0, None, None, None)))
    drawn = np.asarray(  # [draws, B]
        draw(logits_BV, keys, 1.0, top_k, top_p)
    )
    for b in range(4):
        allowed = _allowed_by_hand(np.asarray(logits_BV[b], np.float64), top_k, top_p)
        mask = np.asarray(sampling.allowed(logits_BV[b : b + 1], jnp.int32(top_k), jnp.float32(top_p))[0])
        assert set(np.flatnonzero(mask).tolist()) == allowed
        assert set(drawn[:, b].tolist()) <= allowed
        if len(allowed) <= 5:  # 300 draws reach every allowed id of a handful
            assert set(drawn[:, b].tolist()) == allowed


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    logits_BV = jax.random.normal(jax.random.key(4), (4, 64)) * 3
    key = jax.random.key(5)
    drawn = sampling.choose(logits_BV, key, temperature, 0, 1.0)
    np.testing.assert_array_equal(drawn, jax.random.categorical(key, logits_BV / temperature, axis=-1))


def test_greedy_is_the_argmax_and_ignores_the_key():
    logits_BV = jax.random.normal(jax.random.key(3), (4, 64))
    a = sampling.choose(logits_BV, jax.random.key(0), 0.0, 0, 1.0)
    b = sampling.choose(logits_BV, jax.random.key(9), 0.0, 5, 0.3)
    np.testing.assert_array_equal(a, np.argmax(logits_BV, axis=-1))
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def generator(short_run):
    return generate.Generator.from_workdir(short_run)


def _naive_greedy(generator, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the full forward pass for
    every new token, no cache, no padding on the left (zeros after the sequence, which causal
    attention does not let the last real position see, keep one compiled shape)."""
    graphdef = step.abstract_model(generator.exp.model)[0]
    forward = jax.jit(lambda params, tokens_1T: nnx.merge(graphdef, params)(tokens_1T))
    context = generator.exp.model.seq_len
    ids = list(prompt)
    for _ in range(n):
        logits_TV = forward(generator.params, jnp.asarray([ids + [0] * (context - len(ids))]))[0]
        next_id = int(jnp.argmax(logits_TV[len(ids) - 1]))
        if next_id == generator.eos_id:
            break
        ids.append(next_id)
    return ids[len(prompt) :]


def test_greedy_decoding_equals_the_full_forward_pass_row_by_row(generator, capsys):
    """Prompts of 2 to 25 tokens in one batch (they straddle the 16-token prompt bucket, so rows
    are padded differently together and alone): each row's greedy tokens are those of the full
    forward pass run on that row alone, to the end of the context. The weights get noise: 8
    steps of training answer every prompt alike (newlines), which would prove little."""
    trained = generator.params
    leaves, treedef = jax.tree.flatten(trained)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    noisy = [x + jax.random.normal(k, x.shape, x.dtype) * 0.2 for k, x in zip(keys, leaves, strict=True)]
    generator.params = jax.tree.unflatten(treedef, noisy)
    try:
        tok = generator.tokenizer
        texts = ["x", "def main(", "import os\n\nclass P(object):\n    def f"]
        prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
        assert [len(p) for p in prompts][0] == 2 and 16 < max(map(len, prompts)) < 26
        context = generator.exp.model.seq_len
        together = generator.generate_ids(prompts, max_tokens=40)
        assert "max tokens cut to" in capsys.readouterr().out
        assert len({tuple(ids) for ids in together}) == 3  # not all alike (one may end at once)
        for prompt, ids in zip(prompts, together, strict=True):
            room = context - max(map(len, prompts)) + 1  # the longest prompt sets the limit
            assert ids == _naive_greedy(generator, prompt, room)
            assert generator.generate_ids([prompt], max_tokens=room)[0] == ids
    finally:
        generator.params = trained


def test_a_prompt_as_long_as_the_context_gets_one_token(generator):
    prompt = [generator.tokenizer.bos_id] + [5] * (generator.exp.model.seq_len - 1)
    assert len(generator.generate_ids([prompt], max_tokens=5)[0]) <= 1


def test_seeded_sampling_is_reproducible(generator):
    settings = dict(max_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    first = generator.sample(["def f(x):", "def f(x):"], seed=7, **settings)
    assert generator.sample(["def f(x):", "def f(x):"], seed=7, **settings) == first
    assert first[0] != first[1]  # each row draws on its own
    assert generator.sample(["def f(x):", "def f(x):"], seed=8, **settings) != first


def test_sample_streams_what_it_returns(generator):
    pieces: list[tuple[int, str]] = []
    texts = generator.sample(
        ["for i in range(", "#"], max_tokens=10, seed=1, on_text=lambda r, t: pieces.append((r, t))
    )
    for row, text in enumerate(texts):
        assert "".join(t for r, t in pieces if r == row) == text


def test_a_stream_cut_inside_a_character_still_hands_out_all_the_text(stdlib_corpus):
    """Byte pieces of one character arrive one at a time; where the row stops inside a
    character, `finish` hands out what was held back, so the stream equals the decoded text."""
    tok = stdlib_corpus.tokenizer
    ids = tok.encode("a\u00e9\u20ac\U0001f600b")
    assert len(ids) > 5  # byte fallback: several ids per character
    for cut in range(1, len(ids) + 1):
        stream = generate.TextStream(tok.decode)
        pieces = [stream.add([i]) for i in ids[:cut]]
        assert "\ufffd" not in "".join(pieces)  # a character cut short is held back...
        assert "".join(pieces) + stream.finish() == tok.decode(ids[:cut])  # ...until the end


def test_generate_cli_smoke(short_run, capsys):
    """The whole path after a short stdlib run: load, prefill, decode, stream, detokenize."""
    assert (
        generate.main(
            ["--workdir", str(short_run), "--prompt", "def parse(self, text):\n", "--max-tokens", "24"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("def parse(self, text):\n") and len(out) > len("def parse(self, text):\n")
    assert (
        generate.main(["--workdir", str(short_run), "--prompt", "a", "--prompt", "b", "--num-samples", "2"])
        == 0
    )
    assert capsys.readouterr().out.count("--- sample ") == 4


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--top-p", "0"], "--top-p 0.0: give a value in (0, 1]"),
        (["--max-tokens", "0"], "--max-tokens 0"),
        (["--prompt", "x" * 200], "model.seq_len, is 32"),
        (["--set", "model.d_model=64"], "--set model.d_model: reading a run may change only mesh."),
    ],
)
def test_generate_user_errors_exit_2(short_run, capsys, extra, expected):
    assert generate.main(["--workdir", str(short_run), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_generate_without_a_checkpoint_exits_2(tmp_path, capsys):
    assert generate.main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no checkpoint" in err[0]
