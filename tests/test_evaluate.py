"""Held-out loss and bits per byte against a case computed by hand."""

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_experiment

from lmjax import optim, sharding, step
from lmjax.data import loader
from lmjax.evaluate import HeldOut


def test_uniform_model_costs_log2_vocab_bits_per_token(stdlib_corpus):
    """Zero weights predict uniformly over the real vocabulary (padding gets nothing), so every
    target costs ln V nats, and bits per byte = targets * log2 V / their UTF-8 bytes."""
    vocab = stdlib_corpus.tokenizer.vocab_size
    exp = tiny_experiment("gpt2", f"model.vocab_size={vocab}")
    mesh = sharding.make_mesh(exp, jax.devices()[:1])
    batches = loader.eval_batches(stdlib_corpus.splits("validation"), [1.0], exp.model.seq_len, 8, 3)
    token_bytes = stdlib_corpus.tokenizer.token_bytes()
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.init_state(exp, optim.make(exp.optim, 1), mesh)
        held_out = HeldOut(
            batches,
            token_bytes,
            step.make_eval_step(graphdef, shardings["params"], mesh),
            step.batch_sharding(mesh),
        )
        result = held_out(jax.tree.map(jnp.zeros_like, state["params"]))
    targets = sum(b["loss_mask"].sum() for b in batches)
    text_bytes = sum(
        len(stdlib_corpus.tokenizer.decode(t[m > 0]).encode())
        for b in batches
        for t, m in zip(b["targets"], b["loss_mask"], strict=True)
    )
    assert held_out.bytes == text_bytes  # the byte table agrees with decoding the targets
    assert result["eval_loss"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert result["eval_bpb"] == pytest.approx(targets * math.log2(vocab) / text_bytes, rel=1e-5)
