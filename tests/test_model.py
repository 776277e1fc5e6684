import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_experiment
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # public only as print_saved_residuals

from lmjax import config, flops, loss, model

FLAVOURS = ["gpt2", "llama"]


def _model(flavour, **changes):
    cfg = dataclasses.replace(tiny_experiment(flavour).model, **changes)
    return model.Transformer(cfg, rngs=nnx.Rngs(0))


def _tokens(B=2, T=32, vocab=256, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 3, vocab)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_shapes_and_padded_vocab(flavour):
    m = _model(flavour, vocab_size=200)  # padded to 256
    logits = m(_tokens(vocab=200))
    assert logits.shape == (2, 32, 256)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    assert float(probs[..., 200:].max()) == 0.0  # padded ids never receive probability
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_causal(flavour):
    m = _model(flavour)
    tokens = _tokens()
    changed = tokens.at[:, 20].set((tokens[:, 20] + 1) % 256)
    a, b = m(tokens), m(changed)
    np.testing.assert_array_equal(a[:, :20], b[:, :20])
    assert not np.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_packed_documents_equal_documents_alone(flavour):
    """Two documents packed in one row (segment ids, restarted positions) give each the logits
    it gets alone."""
    m = _model(flavour)
    doc_a, doc_b = _tokens(1, 12, seed=1), _tokens(1, 20, seed=2)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[1] * 12 + [2] * 20])
    positions = jnp.array([list(range(12)) + list(range(20))])
    logits = m(packed, segments, positions)
    np.testing.assert_allclose(logits[:, :12], m(doc_a), atol=2e-5)
    np.testing.assert_allclose(logits[:, 12:], m(doc_b), atol=2e-5)


@pytest.mark.parametrize(
    "flavour,changes",
    [
        ("gpt2", {}),
        ("llama", {}),
        ("llama", {"tie_embeddings": True, "n_kv_heads": 1}),
        ("gpt2", {"tie_embeddings": False}),
    ],
)
def test_param_count_closed_form(flavour, changes):
    m = _model(flavour, **changes)
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert actual == flops.count_params(m.cfg)


def test_param_count_gpt2_124m():
    """The closed form gives GPT-2 small's well-known count (50257 vocab padded to 50304)."""
    cfg = dataclasses.replace(
        tiny_experiment("gpt2").model,
        vocab_size=50257,
        d_model=768,
        n_layers=12,
        n_heads=12,
        d_ff=0,
        seq_len=1024,
    )
    assert flops.count_params(cfg) == 124_475_904


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_scan_remat_and_unrolled_agree(flavour):
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(2, 32, 256).items()}
    base = _model(flavour)
    graphdef, params = nnx.split(base)

    def loss_and_grads(cfg):
        gd = nnx.split(model.Transformer(cfg, rngs=nnx.Rngs(0)))[0]
        f = lambda p: loss.loss_sums(nnx.merge(gd, p), batch)[0]  # noqa: E731
        return jax.value_and_grad(f)(params)

    want_loss, want_grads = loss_and_grads(base.cfg)
    for changes in [
        {"scan_layers": True},
        {"remat": "full"},
        {"remat": "dots", "scan_layers": True},
        {"remat": "named"},
        {"remat": "named", "remat_names": ("attn_out", "mlp_in"), "scan_layers": True},
        {"loss_chunk": 8},
        {"loss_chunk": 16, "remat": "full", "scan_layers": True},
    ]:
        got_loss, grads = loss_and_grads(dataclasses.replace(base.cfg, **changes))
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, want_grads)


def test_remat_policies_change_what_is_saved():
    """The policies are not all the same program: the saved residuals differ as intended."""
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(2, 32, 256).items()}
    base = _model("llama")
    _, params = nnx.split(base)

    def saved(**changes):
        gd = nnx.split(model.Transformer(dataclasses.replace(base.cfg, **changes), rngs=nnx.Rngs(0)))[0]
        f = lambda p: loss.loss_sums(nnx.merge(gd, p), batch)[0]  # noqa: E731
        residuals = saved_residuals(f, params)
        return sum(int(np.prod(shape.shape)) for shape, _ in residuals)

    none, full = saved(), saved(remat="full")
    each = {name: saved(remat="named", remat_names=(name,)) for name in typing.get_args(config.RematName)}
    everything = saved(remat="named", remat_names=typing.get_args(config.RematName))
    assert all(full < n < everything for n in each.values()), each  # every tag is reachable
    assert everything <= none


def test_chunked_loss_never_builds_whole_batch_logits():
    """With loss_chunk, no fp32 [B, T, V] array is saved for the backward pass."""
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(2, 32, 256).items()}
    base = _model("gpt2")
    _, params = nnx.split(base)
    B, T, V = 2, 32, base.cfg.padded_vocab

    def saved_shapes(**changes):
        gd = nnx.split(model.Transformer(dataclasses.replace(base.cfg, **changes), rngs=nnx.Rngs(0)))[0]
        f = lambda p: loss.loss_sums(nnx.merge(gd, p), batch)[0]  # noqa: E731
        return [tuple(shape.shape) for shape, _ in saved_residuals(f, params)]

    def logits_sized(shapes):  # saved arrays with a vocabulary axis, beyond the head itself
        return sum(int(np.prod(sh)) for sh in shapes if len(sh) >= 3 and sh[-1] == V)

    assert logits_sized(saved_shapes()) >= B * T * V
    assert logits_sized(saved_shapes(loss_chunk=8)) == 0


def test_rope_depends_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def score(pq, pk):
        rq = model.rope(q, jnp.array([[pq]]), 10000.0)
        rk = model.rope(k, jnp.array([[pk]]), 10000.0)
        return float((rq * rk).sum())

    np.testing.assert_allclose(score(5, 2), score(13, 10), rtol=1e-5)
    assert abs(score(5, 2) - score(5, 4)) > 1e-4


def test_loss_sums_by_hand():
    """Uniform logits: every unmasked target costs ln(vocab); masked targets cost nothing."""
    m = _model("gpt2")
    nnx.update(m, jax.tree.map(jnp.zeros_like, nnx.state(m, nnx.Param)))
    batch = synthetic_batch(2, 32, 256)
    loss_sum, count = loss.loss_sums(m, {k: jnp.asarray(v) for k, v in batch.items()})
    assert float(count) == batch["loss_mask"].sum() < 64
    np.testing.assert_allclose(float(loss_sum), float(count) * np.log(256), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_gradient_is_autodiffs(dtype):
    """The hand-written backward of `cross_entropy_sums` (softmax - onehot, one pass) equals
    autodiff of the plain expression, for the CE and the logsumexp^2 terms with their own
    weights, a mask, and -inf-like padded logits."""
    B, T, V = 3, 5, 37
    key_l, key_t, key_m = jax.random.split(jax.random.key(0), 3)
    logits = 4 * jax.random.normal(key_l, (B, T, V))
    logits = logits.at[..., -3:].set(jnp.finfo(jnp.dtype(dtype)).min).astype(dtype)  # padded ids
    targets = jax.random.randint(key_t, (B, T), 0, V - 3)
    mask = (jax.random.uniform(key_m, (B, T)) > 0.3).astype(jnp.float32)

    def plain(x, targets, mask):
        x = x.astype(jnp.float32)
        lse = jax.nn.logsumexp(x, axis=-1)
        target = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
        return ((lse - target) * mask).sum(), (jnp.square(lse) * mask).sum()

    def weighted(sums):  # both terms, with weights of their own
        def objective(x):
            ce, z = sums(x, targets, mask)
            return 0.7 * ce + 0.01 * z

        return objective

    got_sums, want_sums = loss.cross_entropy_sums(logits, targets, mask), plain(logits, targets, mask)
    np.testing.assert_allclose(np.array(got_sums), np.array(want_sums), rtol=1e-6)
    got = jax.grad(weighted(loss.cross_entropy_sums))(logits)
    want = jax.grad(weighted(plain))(logits)
    assert got.dtype == logits.dtype
    tol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(np.array(got, np.float32), np.array(want, np.float32), atol=tol, rtol=tol)
    assert float(jnp.abs(got.astype(jnp.float32)[mask == 0]).max()) == 0.0  # masked rows: no gradient


def test_unrolled_layers_gradient_equals_scanned():
    """Unstacked (unrolled) and scanned layers: the same loss and parameter gradients."""
    m = _model("llama")
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(2, 32, 256).items()}
    graphdef, params = nnx.split(m)

    def grads(scan):
        g = nnx.merge(graphdef, params)
        g.cfg = dataclasses.replace(g.cfg, scan_layers=scan)
        return jax.grad(lambda p: loss.loss_sums(nnx.merge(nnx.graphdef(g), p), batch)[0])(params)

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True)), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_bf16_compute_tracks_fp32(flavour):
    """The default GPU setting (bf16 compute over fp32 weights) runs and stays close to fp32."""
    m32 = _model(flavour)
    m16 = model.Transformer(dataclasses.replace(m32.cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
    tokens = _tokens()
    logits16 = m16(tokens)
    assert logits16.dtype == jnp.bfloat16
    assert jax.tree.leaves(nnx.state(m16, nnx.Param))[0].dtype == jnp.float32
    p32 = jax.nn.softmax(m32(tokens), -1)
    p16 = jax.nn.softmax(logits16.astype(jnp.float32), -1)
    assert float(jnp.abs(p32 - p16).max()) < 2e-2


def test_every_logical_axis_has_a_rule():
    from lmjax import config

    names = set()
    for flavour in FLAVOURS:
        for var in jax.tree.leaves(
            nnx.state(_model(flavour, tie_embeddings=False)), is_leaf=lambda x: isinstance(x, nnx.Variable)
        ):
            names |= set(var.get_metadata()["out_sharding"])
    assert names <= set(config.LOGICAL_AXES)
    assert names >= {"vocab", "embed", "mlp", "heads", "kv_heads", "layers"}
