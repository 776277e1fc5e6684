"""The model-side recipe options (config.Model: mlp, qk_norm, zero_init, logit_softcap, z_loss):
each changes the numbers as its definition says, and leaves them alone when off."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import synthetic_batch, tiny_experiment
from flax import nnx

from lmjax import config, loss, model, sharding, step

FLAVOURS = ["gpt2", "llama"]
V = 256  # tiny_experiment's vocabulary (padded_vocab is 256 too)
ALL_ON = dict(mlp="relu2", qk_norm=True, zero_init=True, logit_softcap=2.0, z_loss=1e-2)


def _cfg(flavour: str, **changes) -> config.Model:
    return dataclasses.replace(tiny_experiment(flavour).model, **changes)


def _model(flavour: str, **changes) -> model.Transformer:
    return model.Transformer(_cfg(flavour, **changes), rngs=nnx.Rngs(0))


def _params(m: model.Transformer) -> dict[str, np.ndarray]:
    """Parameter values by path, "['layers']['w_q']"."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param))
    return {jax.tree_util.keystr(p).removesuffix(".value"): np.asarray(x) for p, x in leaves}


def _with_noise(m: model.Transformer, scale: float = 0.2, seed: int = 0) -> model.Transformer:
    """Every parameter moved off its initial value, so zero or unit initialisations prove nothing."""
    leaves, treedef = jax.tree.flatten(nnx.state(m, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    nnx.update(m, jax.tree.unflatten(treedef, noisy))
    return m


def _same_params_as(cfg: config.Model, source: model.Transformer) -> model.Transformer:
    """A model of `cfg` holding `source`'s parameters (the two trees must match)."""
    m = model.Transformer(cfg, rngs=nnx.Rngs(1))
    nnx.update(m, nnx.state(source, nnx.Param))
    return m


def _batch(B: int = 2) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in synthetic_batch(B, 32, V).items()}


def _layer(m: model.Transformer, i: int = 0) -> dict[str, jax.Array]:
    return {k: v[i] for k, v in m.layers.arrays(jnp.float32).items()}


# --- off: nothing moves ------------------------------------------------------------------------

DEFAULT_LAYER_PARAMS = {
    "gpt2": {
        "attn_norm_scale", "attn_norm_bias", "w_q", "w_k", "w_v", "b_q", "b_k", "b_v", "w_o", "b_o",
        "mlp_norm_scale", "mlp_norm_bias", "w_in", "b_in", "w_out", "b_out",
    },
    "llama": {"attn_norm_scale", "w_q", "w_k", "w_v", "w_o", "mlp_norm_scale", "w_gate", "w_up", "w_down"},
}  # fmt: skip


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_options_off_leave_parameters_logits_and_loss_unchanged(flavour):
    """The default tree is the one it was; spelling the defaults out changes nothing; options
    that add or zero parameters leave every other parameter's value where the default puts it
    (the initial values do not depend on which options are on); z_loss leaves logits and the
    evaluation loss alone."""
    default = _model(flavour)
    assert set(_layer(default)) == DEFAULT_LAYER_PARAMS[flavour]
    native = "gelu" if flavour == "gpt2" else "swiglu"
    spelled = _model(flavour, mlp=native, qk_norm=False, zero_init=False, logit_softcap=0.0, z_loss=0.0)
    want = _params(default)
    assert _params(spelled).keys() == want.keys()
    assert all(np.array_equal(x, want[k]) for k, x in _params(spelled).items())
    batch = _batch()
    np.testing.assert_array_equal(spelled(batch["inputs"]), default(batch["inputs"]))

    with_options = _params(_model(flavour, qk_norm=True, zero_init=True))
    zeroed = {"['layers']['w_o']", "['layers']['w_out']", "['layers']['w_down']"}
    assert set(with_options) - set(want) == {"['layers']['q_norm_scale']", "['layers']['k_norm_scale']"}
    for k, x in want.items():
        if k not in zeroed:
            np.testing.assert_array_equal(with_options[k], x, err_msg=k)

    z = _same_params_as(dataclasses.replace(default.cfg, z_loss=0.1), default)
    np.testing.assert_array_equal(z(batch["inputs"]), default(batch["inputs"]))
    np.testing.assert_array_equal(loss.loss_sums(z, batch), loss.loss_sums(default, batch))


# --- mlp -----------------------------------------------------------------------------------------


def _silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_relu2_mlp_equals_the_formula(flavour):
    """relu2: max(h W_in + b_in, 0)^2 W_out + b_out (biases in the gpt2 flavour only); the same
    parameters under gelu give other numbers."""
    m = _with_noise(_model(flavour, mlp="relu2"))
    p = _layer(m)
    assert {"w_in", "w_out"} <= set(p) and not {"w_gate", "w_up", "w_down"} & set(p)
    assert ("b_in" in p) == ("b_out" in p) == (flavour == "gpt2")
    h = np.asarray(jax.random.normal(jax.random.key(3), (2, 5, 32)))
    b_in, b_out = (np.asarray(p[b]) if b in p else 0.0 for b in ("b_in", "b_out"))
    want = np.square(np.maximum(h @ np.asarray(p["w_in"]) + b_in, 0)) @ np.asarray(p["w_out"]) + b_out
    np.testing.assert_allclose(model._mlp(m.cfg, jnp.asarray(h), p), want, rtol=1e-5, atol=1e-6)

    gelu = _same_params_as(dataclasses.replace(m.cfg, mlp="gelu"), m)
    tokens = _batch()["inputs"]
    assert not np.allclose(gelu(tokens), m(tokens), atol=1e-3)


def test_swiglu_in_the_gpt2_flavour():
    """Three matrices and no MLP biases; attention keeps GPT-2's biases; silu(h Wg) * (h Wu) Wd."""
    m = _with_noise(_model("gpt2", mlp="swiglu"))
    p = _layer(m)
    assert {"w_gate", "w_up", "w_down", "b_q", "b_o"} <= set(p)
    assert not {"w_in", "w_out", "b_in", "b_out"} & set(p)
    assert p["w_gate"].shape == (32, 64)  # d_ff given: the 8/3 rule applies only to d_ff=0
    h = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, 32)))
    w = {k: np.asarray(p[k]) for k in ("w_gate", "w_up", "w_down")}
    want = (_silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"]
    np.testing.assert_allclose(model._mlp(m.cfg, jnp.asarray(h), p), want, rtol=1e-5, atol=1e-6)
    ce_sum, count = loss.loss_sums(m, _batch())
    assert np.isfinite(ce_sum) and count > 0


# --- qk_norm -------------------------------------------------------------------------------------


def _recorded_qk(monkeypatch, m: model.Transformer, tokens_BT: jax.Array) -> list[tuple[jax.Array, ...]]:
    """(q, k) as each layer hands them to the attention kernel."""
    seen, kernel = [], model.attention

    def recording(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, **kwargs):
        seen.append((q_BTHE, k_BTKE))
        return kernel(q_BTHE, k_BTKE, v_BTKE, segment_ids_BT, **kwargs)

    monkeypatch.setattr(model, "attention", recording)
    m(tokens_BT)
    monkeypatch.undo()
    return seen


def _rms(x):
    return np.sqrt(np.mean(np.square(np.asarray(x, np.float64)), axis=-1))


def test_qk_norm_gives_each_head_unit_rms_times_its_scale(monkeypatch):
    """gpt2 (no RoPE): every layer's q and k, divided by the learned scale, have RMS 1 per head."""
    m = _with_noise(_model("gpt2", qk_norm=True))
    seen = _recorded_qk(monkeypatch, m, _batch()["inputs"])
    assert len(seen) == m.cfg.n_layers
    for i, (q, k) in enumerate(seen):
        p = _layer(m, i)
        np.testing.assert_allclose(_rms(q / p["q_norm_scale"]), 1.0, atol=1e-3)
        np.testing.assert_allclose(_rms(k / p["k_norm_scale"]), 1.0, atol=1e-3)


def test_qk_norm_comes_before_rope_and_its_scales_matter(monkeypatch):
    """llama: layer 0's q and k are RoPE(RMSNorm(h W) * scale), by hand; other scales, other logits."""
    m = _with_noise(_model("llama", qk_norm=True))
    tokens = _batch()["inputs"]
    q, k = _recorded_qk(monkeypatch, m, tokens)[0]
    p, eps = _layer(m), m.cfg.norm_eps
    x = np.asarray(m.embed[...])[np.asarray(tokens)]
    h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(p["attn_norm_scale"])
    positions = jnp.broadcast_to(jnp.arange(32), tokens.shape)
    for got, w, scale in ((q, p["w_q"], p["q_norm_scale"]), (k, p["w_k"], p["k_norm_scale"])):
        raw = np.einsum("btd,dne->btne", h, np.asarray(w))
        normed = raw / np.sqrt(np.mean(raw * raw, -1, keepdims=True) + eps) * np.asarray(scale)
        want = model.rope(jnp.asarray(normed, jnp.float32), positions, m.cfg.rope_theta)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    before = m(tokens)
    m.layers.q_norm_scale[...] = m.layers.q_norm_scale[...] * 2.0  # sharper attention
    assert not np.allclose(m(tokens), before, atol=1e-4)
    plain = _with_noise(_model("llama"))
    unit_scales = _model("llama", qk_norm=True)
    nnx.update(unit_scales, nnx.state(plain, nnx.Param))  # plain's weights, scales of 1
    assert not np.allclose(plain(tokens), unit_scales(tokens), atol=1e-4)


ROWS = [(5, 3), (11, 3), (2, 3)]  # (prompt length, tokens decoded one by one after it) per row


def test_cached_decoding_with_every_option_equals_the_full_forward_pass():
    """As tests/test_generate.py, with qk_norm (keys are cached normed), relu2, the soft-cap and
    zero_init (then noise): left-padded prefill, then one token at a time."""
    reference = _with_noise(_model("llama", **ALL_ON))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, V, p + d) for p, d in ROWS]
    # Each row alone, zeros after it (causal: they change nothing before them), in one call.
    T = max(len(s) for s in seqs)
    full = np.asarray(reference(jnp.asarray([np.pad(s, (0, T - len(s))) for s in seqs])))
    prompt_len = max(p for p, _ in ROWS)
    start_B = np.array([prompt_len - p for p, _ in ROWS], np.int32)
    prompts_BT = np.zeros((len(ROWS), prompt_len), np.int32)
    for b, (p, _) in enumerate(ROWS):
        prompts_BT[b, start_B[b] :] = seqs[b][:p]
    graphdef, params = nnx.split(reference)
    decode = jax.jit(lambda params, tokens_BT, cache: nnx.merge(graphdef, params).decode(tokens_BT, cache))

    cache = model.init_cache(reference.cfg, jnp.asarray(start_B), prompt_len + 3)
    logits_BTV, cache = decode(params, jnp.asarray(prompts_BT), cache)
    for b, (p, _) in enumerate(ROWS):
        np.testing.assert_allclose(logits_BTV[b, prompt_len - p :], full[b][:p], atol=2e-5, rtol=2e-5)
    for t in range(3):
        tokens_B1 = np.array([[s[p + t]] for s, (p, _) in zip(seqs, ROWS, strict=True)], np.int32)
        logits_BTV, cache = decode(params, jnp.asarray(tokens_B1), cache)
        for b, (p, _) in enumerate(ROWS):
            np.testing.assert_allclose(logits_BTV[b, 0], full[b][p + t], atol=2e-5, rtol=2e-5)


# --- zero_init -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_zero_init_blocks_start_as_the_identity(flavour):
    """The residual output projections start at exactly zero, so the initial model's logits are
    those of the embeddings passed straight to the final norm and the head."""
    m = _model(flavour, zero_init=True)
    out = "w_out" if flavour == "gpt2" else "w_down"
    for name in ("w_o", out):
        assert not np.asarray(getattr(m.layers, name)[...]).any(), name
    tokens = _batch()["inputs"]
    positions = jnp.broadcast_to(jnp.arange(32), tokens.shape)
    skipped = model.logits(m.cfg, m._final_norm(m._embed(tokens, positions)), m.head_DV())
    np.testing.assert_array_equal(m(tokens), skipped)
    assert not np.allclose(_model(flavour)(tokens), skipped, atol=1e-4)  # the default's blocks do act


# --- logit_softcap -------------------------------------------------------------------------------


def test_softcap_squashes_the_logits_everywhere():
    """logits = cap * tanh(raw / cap) of the uncapped model's, so |logits| <= cap; padded ids
    stay masked; the loss (chunked or not) is the cross-entropy of the capped logits."""
    cap = 0.5
    raw_model = _with_noise(_model("gpt2", vocab_size=200), scale=0.5)
    capped = _same_params_as(dataclasses.replace(raw_model.cfg, logit_softcap=cap), raw_model)
    batch = _batch()
    raw, got = np.asarray(raw_model(batch["inputs"])), np.asarray(capped(batch["inputs"]))
    assert np.abs(raw[..., :200]).max() > 2 * cap  # the cap bites
    np.testing.assert_allclose(got[..., :200], cap * np.tanh(raw[..., :200] / cap), rtol=1e-5, atol=1e-6)
    assert np.abs(got[..., :200]).max() <= cap
    assert (got[..., 200:] == np.finfo(np.float32).min).all()

    lse = jax.nn.logsumexp(got[..., :200], axis=-1)
    target = np.take_along_axis(got, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    want = float(((lse - target) * batch["loss_mask"]).sum())
    np.testing.assert_allclose(loss.loss_sums(capped, batch)[0], want, rtol=1e-5)
    chunked = _same_params_as(dataclasses.replace(capped.cfg, loss_chunk=8), capped)
    np.testing.assert_allclose(loss.loss_sums(chunked, batch)[0], want, rtol=1e-5)

    bf16 = _same_params_as(dataclasses.replace(capped.cfg, dtype="bfloat16"), capped)
    logits16 = bf16(batch["inputs"])
    assert logits16.dtype == jnp.bfloat16 and float(jnp.abs(logits16[..., :200]).max()) <= cap


# --- z_loss --------------------------------------------------------------------------------------


def _train_step(exp: config.Experiment):
    """(graphdef, jitted train step, mesh) on one device with `optax.trace(0)` for optimizer: its
    state after a step is exactly the gradient the step applied."""
    tx = optax.trace(decay=0.0)
    mesh = sharding.make_mesh(exp, jax.devices()[:1])
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, _, shardings = step.abstract_state(exp, tx, mesh)
        return graphdef, step.make_train_step(graphdef, tx, exp, shardings, mesh), tx, mesh


def _step_once(exp: config.Experiment, batch_np: dict[str, np.ndarray]):
    """(graphdef, initial params, metrics, the gradient the step applied)."""
    graphdef, train_step, tx, mesh = _train_step(exp)
    with sharding.use(mesh, exp.mesh.rules):
        _, state, _ = step.init_state(exp, tx, mesh)
        params0 = jax.device_get(state["params"])
        placed = sharding.BatchPlacement(mesh, exp.train.batch_size).put_global(batch_np)
        state, metrics = train_step(state, placed)
    return graphdef, params0, jax.device_get(metrics), jax.device_get(state["opt_state"].trace)


@pytest.fixture(scope="module")
def z_loss_step():
    exp = tiny_experiment("gpt2", "model.z_loss=0.01")
    batch_np = synthetic_batch(8, 32, V)
    return exp, batch_np, _step_once(exp, batch_np)


def _by_hand(graphdef, batch):
    """f(params, z): the mean over unmasked targets of CE + z * logsumexp^2 straight from the
    logits, with (CE sum, logsumexp^2 sum), and its gradient."""

    def objective(params, z):
        logits = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
        logits = logits.astype(jnp.float32)[..., :V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        ce = lse - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        mask = batch["loss_mask"]
        return ((ce + z * lse**2) * mask).sum() / mask.sum(), ((ce * mask).sum(), (lse**2 * mask).sum())

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


def test_z_loss_step_follows_ce_plus_z_lse_squared(z_loss_step):
    """The step's gradient is that of CE + z * lse^2 (not of CE alone); the logged loss is the CE
    alone and the z_loss metric what the z term adds; evaluation scores the CE alone."""
    exp, batch_np, (graphdef, params0, metrics, grads) = z_loss_step
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    count = batch_np["loss_mask"].sum()
    by_hand = _by_hand(graphdef, batch)
    (_, (ce_sum, z_sum)), want = by_hand(params0, 0.01)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, want)
    np.testing.assert_allclose(metrics["loss"], ce_sum / count, rtol=1e-6)
    np.testing.assert_allclose(metrics["z_loss"], 0.01 * z_sum / count, rtol=1e-6)
    assert z_sum / count > 20  # lse ~ ln(256) at init: the z term is not negligible
    _, ce_only = by_hand(params0, 0.0)
    assert not np.allclose(optax.tree.norm(ce_only), optax.tree.norm(grads), rtol=1e-3)

    mesh = sharding.make_mesh(exp, jax.devices()[:1])
    with sharding.use(mesh, exp.mesh.rules):
        param_sh = sharding.state_shardings(step.abstract_model(exp.model)[1], mesh)
        eval_step = step.make_eval_step(graphdef, param_sh, mesh, np.ones(V))
        placed = sharding.BatchPlacement(mesh, exp.train.batch_size).put_global(batch_np)
        eval_sum, eval_count, _ = eval_step(params0, placed)
    np.testing.assert_allclose(eval_sum, ce_sum, rtol=1e-6)
    assert eval_count == count


def test_z_loss_with_microbatches_equals_the_whole_batch_step(z_loss_step):
    exp, batch_np, (_, _, metrics, grads) = z_loss_step
    micro = dataclasses.replace(exp, train=dataclasses.replace(exp.train, microbatches=2))
    _, _, micro_metrics, micro_grads = _step_once(micro, batch_np)
    for key in ("loss", "z_loss", "grad_norm"):
        np.testing.assert_allclose(micro_metrics[key], metrics[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), micro_grads, grads)


def test_without_z_loss_no_z_loss_metric(z_loss_step):
    exp, batch_np, _ = z_loss_step
    plain = dataclasses.replace(exp, model=dataclasses.replace(exp.model, z_loss=0.0))
    _, train_step, tx, mesh = _train_step(plain)
    with sharding.use(mesh, exp.mesh.rules):
        state = step.abstract_state(plain, tx, mesh)[1]
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
        _, metrics = jax.eval_shape(train_step, state, batch)  # traced, not compiled
    assert set(metrics) == {"loss", "grad_norm", "lr"}


# --- sharded ---------------------------------------------------------------------------------------


def test_every_option_on_2x2x2_equals_one_device():
    """data=2, fsdp=2, tensor=2 with every option on (and the chunked loss) gives one device's
    CE and z sums: the new scales shard and the options commute with the layout."""
    exp = tiny_experiment("llama", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    m = _with_noise(model.Transformer(dataclasses.replace(exp.model, **ALL_ON), rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(m)
    batch = _batch(B=4)
    chunked = nnx.split(model.Transformer(dataclasses.replace(m.cfg, loss_chunk=16), rngs=nnx.Rngs(0)))[0]
    want = jax.jit(lambda p, b: loss.loss_terms(nnx.merge(graphdef, p), b))(params, batch)

    mesh = sharding.make_mesh(exp)
    with sharding.use(mesh, exp.mesh.rules):
        placed = jax.device_put(params, sharding.state_shardings(params, mesh))
        rows = jax.device_put(batch, sharding.batch_sharding(mesh))
        got = jax.jit(lambda p, b: loss.loss_terms(nnx.merge(chunked, p), b))(placed, rows)
    np.testing.assert_allclose(got, want, rtol=1e-5)
