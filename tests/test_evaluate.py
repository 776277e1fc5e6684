"""Held-out loss and bits per byte against cases computed by hand, and `python -m lmjax.evaluate`
over a whole validation split against the training loop's own report of it."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import metrics_of, tiny_experiment

from lmjax import evaluate, optim, sharding, step
from lmjax.data import loader


def _uniform_scores(corpus, batches, devices):
    """Scores of a zero-weight model (it predicts uniformly over the real vocabulary)."""
    vocab = corpus.tokenizer.vocab_size
    exp = tiny_experiment("gpt2", f"model.vocab_size={vocab}", f"mesh.data={len(devices)}")
    mesh = sharding.make_mesh(exp, devices)
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.init_state(exp, optim.make(exp.optim, 1), mesh)
        eval_step = step.make_eval_step(graphdef, shardings["params"], mesh, corpus.tokenizer.token_bytes())
        held_out = evaluate.HeldOut(batches, eval_step, sharding.BatchPlacement(mesh, 8))
        return held_out(jax.tree.map(jnp.zeros_like, state["params"]))


def test_uniform_model_costs_log2_vocab_bits_per_token(stdlib_corpus):
    """Every target costs ln V nats, so bits per byte = targets * log2 V / their UTF-8 bytes,
    the bytes counted by decoding the targets (not through the byte table)."""
    vocab = stdlib_corpus.tokenizer.vocab_size
    batches = loader.EvalBatches(stdlib_corpus.splits("validation"), [1.0], 32, 8, 3)
    result = _uniform_scores(stdlib_corpus, batches, jax.devices()[:1])
    targets = sum(b["loss_mask"].sum() for b in batches)
    text_bytes = sum(
        len(stdlib_corpus.tokenizer.decode(t[m > 0]).encode())
        for b in batches
        for t, m in zip(b["targets"], b["loss_mask"], strict=True)
    )
    assert result["eval_bytes"] == text_bytes
    assert result["eval_tokens"] == targets
    assert result["eval_loss"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert result["eval_perplexity"] == pytest.approx(vocab, rel=1e-4)
    assert result["eval_bpb"] == pytest.approx(targets * math.log2(vocab) / text_bytes, rel=1e-5)


def test_hand_built_batch_bits_per_byte(stdlib_corpus):
    """Two rows, targets picked by hand: ids 3.. are byte pieces of one byte each in a
    byte-fallback tokenizer, and "\\n" is its own piece; masked targets count for nothing."""
    tok = stdlib_corpus.tokenizer
    newline = tok.encode("\n")
    assert len(newline) == 1 and tok.token_bytes()[3] == 1  # <0x00> is id 3
    targets = np.full((8, 32), 3, np.int32)
    targets[0, :4] = newline[0]
    mask = np.zeros((8, 32), np.float32)
    mask[0, :10] = 1  # 4 newlines + 6 one-byte pieces: 10 targets, 10 bytes
    mask[1, :5] = 1  # 5 one-byte pieces
    batch = {"inputs": targets, "targets": targets, "loss_mask": mask}
    result = _uniform_scores(stdlib_corpus, [batch], jax.devices()[:1])
    V = tok.vocab_size
    assert result["eval_bytes"] == 15 and result["eval_tokens"] == 15
    assert result["eval_bpb"] == pytest.approx(15 * math.log(V) / math.log(2) / 15, rel=1e-5)


def test_eval_batches_cover_a_whole_split_once(stdlib_corpus):
    """n_batches=0: every window of the split, each once; on 8 devices the same scores as on 1."""
    split = stdlib_corpus.splits("validation")[0]
    batches = loader.EvalBatches([split], [1.0], 32, 8, 0)
    windows = loader.num_windows(split, 32)
    assert sum(b["loss_mask"].any(axis=1).sum() for b in batches) == windows
    assert len(batches) == -(-windows // 8)
    first_inputs = np.concatenate([b["inputs"][:, 0] for b in batches])[:windows]
    np.testing.assert_array_equal(first_inputs, split.take(np.arange(windows) * 32))
    one = _uniform_scores(stdlib_corpus, batches, jax.devices()[:1])
    eight = _uniform_scores(stdlib_corpus, batches, jax.devices())
    assert one == pytest.approx(eight, rel=1e-6)


def test_evaluate_cli_writes_what_training_reported(short_run, capsys):
    assert evaluate.main(["--workdir", str(short_run)]) == 0
    result = json.loads((short_run / "eval.json").read_text())
    reported = [m for m in metrics_of(short_run) if "eval_loss" in m][-1]
    assert result["step"] == reported["step"] == 8 and result["split"] == "validation"
    assert result["loss"] == pytest.approx(reported["eval_loss"], rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["bits_per_byte"] == pytest.approx(reported["eval_bpb"], rel=1e-6)
    assert "bits/byte" in capsys.readouterr().out


def test_evaluate_without_a_checkpoint_exits_2(tmp_path, capsys):
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no checkpoint" in err[0]
