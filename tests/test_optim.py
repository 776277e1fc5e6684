"""Weight decay lands on matrices only; the schedule and clipping do what they say."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_experiment
from flax import nnx

from lmjax import config, model, optim


def _params(flavour):
    return nnx.state(model.Transformer(tiny_experiment(flavour).model, rngs=nnx.Rngs(0)), nnx.Param)


def _decayed(flavour, decay_embeddings=False):
    mask = optim.decay_mask(_params(flavour), decay_embeddings)
    return {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(mask)[0] if v}


def test_decay_mask_names_the_matrices():
    assert _decayed("gpt2") == {
        f"['layers']['{n}'].value" for n in ("w_q", "w_k", "w_v", "w_o", "w_in", "w_out")
    }
    llama = {f"['layers']['{n}'].value" for n in ("w_q", "w_k", "w_v", "w_o", "w_gate", "w_up", "w_down")}
    assert _decayed("llama") == llama | {"['head'].value"}
    assert _decayed("gpt2", decay_embeddings=True) >= {"['embed'].value", "['pos_embed'].value"}


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_adamw_with_zero_gradients_shrinks_only_decayed_weights(flavour):
    cfg = config.Optim(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0)
    tx = optim.make(cfg, steps=10)
    params = _params(flavour)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    decayed = _decayed(flavour)
    for (path, before), after in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new), strict=True
    ):
        if jax.tree_util.keystr(path) in decayed:
            np.testing.assert_allclose(after, before * (1 - 0.1 * 0.5), rtol=1e-6)  # lr * wd
        else:
            np.testing.assert_array_equal(after, before)


def test_schedule_warmup_then_cosine():
    cfg = config.Optim(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lr = optim.schedule(cfg, steps=14)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 1, 3)], [0.25, 0.5, 1.0])  # never 0
    np.testing.assert_allclose(float(lr(4)), 1.0)
    np.testing.assert_allclose(float(lr(9)), 0.1 + 0.9 * 0.5, rtol=1e-6)  # halfway: the mean
    np.testing.assert_allclose(float(lr(14)), 0.1, rtol=1e-6)
    assert all(float(lr(s)) > float(lr(s + 1)) for s in range(4, 14))


def test_cosine_schedule_is_the_formula_it_always_was():
    cfg = config.Optim(lr=3e-4, warmup_steps=7, min_lr_ratio=0.1)
    steps = np.arange(60, dtype=np.float32)
    cosine = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.clip((steps - 7) / 43, 0.0, 1.0)))
    expected = 3e-4 * np.where(steps < 7, (steps + 1) / 7, cosine)
    np.testing.assert_allclose(optim.schedule(cfg, steps=50)(jnp.asarray(steps)), expected, rtol=1e-6)


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    """20 steps, warmup 4, decay over the last 25% (5 steps: 15..20)."""
    cfg = config.Optim(lr=2.0, warmup_steps=4, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.25)
    lr = optim.schedule(cfg, steps=20)
    values = {s: float(lr(s)) for s in range(21)}
    np.testing.assert_allclose([values[s] for s in (0, 1, 3)], [0.5, 1.0, 2.0])  # warmup, as cosine's
    assert all(values[s] == 2.0 for s in range(3, 16))  # stable until the decay starts at step 15
    np.testing.assert_allclose(
        [values[s] for s in (16, 17, 18, 19)], 2.0 * (1 - 0.9 * np.arange(1, 5) / 5), rtol=1e-6
    )
    np.testing.assert_allclose(values[20], 0.2, rtol=1e-6)  # lr * min_lr_ratio at train.steps
    np.testing.assert_allclose(float(lr(30)), 0.2, rtol=1e-6)  # and after


def test_wsd_decay_never_starts_inside_the_warmup():
    cfg = config.Optim(lr=1.0, warmup_steps=6, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.9)
    lr = optim.schedule(cfg, steps=10)
    np.testing.assert_allclose([float(lr(s)) for s in (5, 6, 8, 10)], [1.0, 1.0, 0.5, 0.0], atol=1e-7)


def test_schedule_peak_scales_the_same_shape():
    """Muon's schedule is AdamW's shape at `muon_lr`."""
    for shape in ("cosine", "wsd"):
        cfg = config.Optim(lr=3e-4, warmup_steps=5, schedule=shape)
        adamw, muon = optim.schedule(cfg, 40), optim.schedule(cfg, 40, peak=0.02)
        steps = jnp.arange(41)
        np.testing.assert_allclose(muon(steps) / 0.02, adamw(steps) / 3e-4, rtol=1e-6)


def test_clipping_is_in_the_chain():
    """Two steps whose gradients differ 100x in norm: with clipping, the result equals AdamW fed
    the clipped gradients by hand, and differs from the unclipped run."""
    grads = [{"w_a": jnp.array([30.0, 40.0])}, {"w_a": jnp.array([0.3, -0.4])}]

    def run(tx, gs):
        params = {"w_a": jnp.zeros(2)}
        state = tx.init(params)
        for g in gs:
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params["w_a"]

    cfg = config.Optim(lr=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=1.0)
    clipped_by_hand = [grads[0] | {"w_a": grads[0]["w_a"] / 50.0}, grads[1]]  # norm 50 -> 1
    no_clip = optim.make(config.Optim(**{**cfg.__dict__, "clip_norm": 0.0}), steps=10)
    np.testing.assert_allclose(
        run(optim.make(cfg, steps=10), grads), run(no_clip, clipped_by_hand), rtol=1e-6
    )
    assert not np.allclose(run(no_clip, grads), run(no_clip, clipped_by_hand))
