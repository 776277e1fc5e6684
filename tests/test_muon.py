"""optim.name=muon: Muon on each layer's hidden matrices, AdamW (its own lr) on the rest."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import metrics_of, tiny_experiment, tiny_train_argv
from flax import nnx
from optax import contrib
from test_sharding import two_steps

from lmjax import config, model, optim
from lmjax.train import main

# The model variants whose parameter names differ: biases and LayerNorm (gpt2), SwiGLU (llama),
# relu2 in either flavour, QK-norm's per-head scales, and a head tied or not.
VARIANTS = [
    ("gpt2",),
    ("llama",),
    ("gpt2", "model.mlp=relu2", "model.qk_norm=true"),
    ("llama", "model.mlp=relu2", "model.qk_norm=true"),
    ("gpt2", "model.tie_embeddings=false"),
    ("llama", "model.tie_embeddings=true"),
]
LR, MUON_LR = 1e-3, 0.05
# The input axes of the matrices that do not read the residual stream ("embed").
MATRIX_INPUTS = {"w_o": ["heads", "head_dim"], "w_out": ["mlp"], "w_down": ["mlp"]}


def _params(flavour, *overrides):
    exp = tiny_experiment(flavour, *overrides)
    return nnx.state(model.Transformer(exp.model, rngs=nnx.Rngs(0)), nnx.Param)


def _named_leaves(tree):
    """{parameter name: leaf} of a model-shaped tree (names are unique within the model)."""
    return {optim._param_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _muon_cfg(**changes):
    cfg = config.Optim(name="muon", lr=LR, muon_lr=MUON_LR, warmup_steps=4, weight_decay=0.0)
    return dataclasses.replace(cfg, **changes)


def _random_grads(params, seed=0, scale=1.0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _updates(cfg, params, grads_list):
    """Each step's updates of `optim.make(cfg)` fed `grads_list` in turn."""
    tx = optim.make(cfg, steps=20)
    state, out = tx.init(params), []
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(updates)
    return out


def _layer_matrices(x, name):
    """[L, ...] -> [L, fan_in, fan_out]: each layer's matrix, inputs by outputs, as MUON_AXES says."""
    dims = optim.MUON_AXES[name]
    order = (0, *dims.reduction_axis, *dims.output_axis)
    fan_in = math.prod(x.shape[a] for a in dims.reduction_axis)
    return jnp.transpose(x, order).reshape(x.shape[0], fan_in, -1)


@pytest.mark.parametrize("variant", VARIANTS, ids="-".join)
def test_every_hidden_matrix_goes_to_muon_and_the_rest_to_adamw(variant):
    params = _params(*variant)
    groups = _named_leaves(optim.muon_groups(params))
    assert groups == {name: "muon" if name.startswith("w_") else "adamw" for name in groups}
    if "model.qk_norm=true" in variant:
        assert groups["q_norm_scale"] == groups["k_norm_scale"] == "adamw"
    assert groups["embed"] == "adamw"
    assert groups.get("head", "adamw") == "adamw"
    # Each layer's matrix: inputs (the axes contracted with the activations) by outputs, the
    # `layers` axis apart. Checked against the parameters' logical axis names.
    variables = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, variable in variables:
        name, axis_names = optim._param_name(path), variable.out_sharding
        if groups[name] == "muon":
            dims = optim.MUON_AXES[name]
            inputs = [axis_names[a] for a in dims.reduction_axis]
            outputs = [axis_names[a] for a in dims.output_axis]
            assert inputs == MATRIX_INPUTS.get(name, ["embed"]), name
            assert sorted(["layers", *inputs, *outputs]) == sorted(axis_names), name


def test_an_unknown_parameter_name_is_refused():
    with pytest.raises(ValueError, match="'router'.*MUON_AXES"):
        optim.muon_groups({"router": jnp.zeros((4, 4))})


@pytest.fixture(scope="module")
def llama_first_step():
    """Parameters, gradients and the first Muon+AdamW update of a tiny llama (d_model 32,
    d_ff 64, 4 heads, 2 kv heads of 8 dims, 2 layers)."""
    params = _params("llama")
    grads = _random_grads(params)
    return params, grads, _updates(_muon_cfg(), params, [grads])[0]


def test_muon_update_is_the_layers_orthogonalised_gradient_at_muon_lr(llama_first_step):
    """Step 0 (warmup 4: lr/4): each layer's update is -muon_lr/4 * sqrt(max(1, fan_out/fan_in))
    * Newton–Schulz(its gradient matrix) -- one matrix per layer, inputs by outputs."""
    _, grads, updates = llama_first_step
    grads, updates = _named_leaves(grads), _named_leaves(updates)
    coeffs = jnp.asarray((3.4445, -4.775, 2.0315))
    for name in optim.MUON_AXES.keys() & updates.keys():
        g, u = _layer_matrices(grads[name], name), _layer_matrices(updates[name], name)
        width = max(1.0, g.shape[2] / g.shape[1]) ** 0.5
        for layer in range(g.shape[0]):
            expected = contrib._muon.orthogonalize_via_newton_schulz(g[layer], coeffs)
            np.testing.assert_allclose(u[layer], -MUON_LR / 4 * width * expected, rtol=2e-4, atol=1e-8)


@pytest.mark.parametrize("name", ["w_gate", "w_k", "w_o"])  # 32x64, [L,D,K,E] as 32x16, [L,H,E,D] as 32x32
def test_muon_singular_values_lie_in_the_quintic_band_not_at_one(llama_first_step, name):
    """The quintic (3.4445, -4.775, 2.0315), 5 steps, leaves singular values in about
    [0.68, 1.13] rather than making them exactly 1."""
    _, _, updates = llama_first_step
    u = _layer_matrices(_named_leaves(updates)[name], name)
    width = max(1.0, u.shape[2] / u.shape[1]) ** 0.5
    for layer in range(u.shape[0]):
        s = np.linalg.svd(np.asarray(u[layer]) / (-MUON_LR / 4 * width), compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.2, s
        assert s.std() > 0.02, s  # not an exact orthogonalisation


def test_adamw_group_is_plain_adamw_at_its_own_lr_behind_one_global_clip():
    """Two steps whose gradients differ 100x in norm, both clipped: the non-Muon parameters move
    exactly as under optim.name=adamw (same lr, betas, eps, decay mask, and the same clip over
    *all* gradients); with a per-group clip or Muon's lr they would not."""
    params = _params("gpt2")
    grads = [_random_grads(params, 0), _random_grads(params, 1, scale=0.01)]
    cfg = _muon_cfg(weight_decay=0.1, clip_norm=0.5)
    muon = [_named_leaves(u) for u in _updates(cfg, params, grads)]
    adamw = [_named_leaves(u) for u in _updates(dataclasses.replace(cfg, name="adamw"), params, grads)]
    for step_muon, step_adamw in zip(muon, adamw, strict=True):
        for name in step_muon:
            if not name.startswith("w_"):
                np.testing.assert_allclose(step_muon[name], step_adamw[name], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_muon_weight_decay_is_decoupled_and_scaled_by_muon_lr(flavour):
    """Zero gradients: the Muon matrices shrink by muon_lr(step 0) * weight_decay; embeddings,
    norms and biases keep AdamW's rule (the embedding table is not decayed by default)."""
    params = _params(flavour)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = _named_leaves(_updates(_muon_cfg(weight_decay=0.5, clip_norm=0.0), params, [zeros])[0])
    for name, p in _named_leaves(params).items():
        if name.startswith("w_"):
            np.testing.assert_allclose(updates[name], -MUON_LR / 4 * 0.5 * p, rtol=1e-6)
        elif name == "head":
            np.testing.assert_allclose(updates[name], -LR / 4 * 0.5 * p, rtol=1e-6)
        else:
            np.testing.assert_array_equal(updates[name], 0.0)


def test_muon_momentum_is_kept_in_the_parameters_dtype():
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params("llama"))
    state = optim.make(_muon_cfg(), steps=4).init(params)
    mu = state[1].inner_states["muon"].inner_state[0].mu
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
    assert set(_named_leaves(mu)) == {n for n in _named_leaves(params) if n.startswith("w_")}


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_tree_map_params_pairs_each_moment_with_its_parameter(flavour):
    """What the optimizer-state shardings are built with: every moment of either group meets its
    own parameter, the other group's MaskedNodes are kept, and the tree is the state's."""
    params = _params(flavour)
    tx = optim.make(_muon_cfg(), steps=4)
    state = jax.eval_shape(tx.init, params)
    met = optim.tree_map_params(
        tx, lambda moment, p: moment.shape == p.shape, state, params, transform_non_params=lambda _: "-"
    )
    assert jax.tree.structure(met) == jax.tree.structure(state)
    matrices = sum(name.startswith("w_") for name in _named_leaves(params))
    others = len(jax.tree.leaves(params)) - matrices
    moments = [x for x in jax.tree.leaves(met) if x != "-"]
    assert moments == [True] * (matrices + 2 * others)  # Muon's mu; AdamW's mu and nu


def test_muon_step_on_a_2x2x2_mesh_equals_one_device():
    """The momentum is sharded like its parameter, and the orthogonalisation of fsdp/tensor-
    sharded matrices gives the one-device numbers."""
    exp = tiny_experiment("llama", "optim.name=muon", "optim.muon_lr=0.02")
    one_metrics, one_params, _ = two_steps(exp, jax.devices()[:1])
    mesh = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    metrics, params, state = two_steps(
        tiny_experiment("llama", "optim.name=muon", "optim.muon_lr=0.02", *mesh)
    )
    np.testing.assert_allclose(metrics["loss"], one_metrics["loss"], rtol=2e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-5), params, one_params)
    mu = state["opt_state"][1].inner_states["muon"].inner_state[0].mu
    w_q = state["params"]["layers"]["w_q"][...]
    assert mu["layers"]["w_q"][...].sharding == w_q.sharding
    assert w_q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


STEPS = 8
SETTINGS = (
    "optim.name=muon",
    "optim.warmup_steps=2",
    "optim.min_lr_ratio=1.0",  # constant after warmup: the 4-step run's schedule is the 8-step one's
    "train.log_every=1",
    "train.eval_every=0",
    "checkpoint.every=4",
)


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metrics_of(workdir) if "loss" in r}


def test_muon_run_resumed_equals_the_uninterrupted_run_and_learns(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(tiny_train_argv(straight, *SETTINGS, f"train.steps={STEPS}")) == 0
    assert main(tiny_train_argv(resumed, *SETTINGS, "train.steps=4")) == 0
    assert main(tiny_train_argv(resumed, *SETTINGS, f"train.steps={STEPS}")) == 0
    assert f"resuming from step 4 of {STEPS}" in capsys.readouterr().err
    losses = _losses(straight)
    assert list(losses) == list(range(1, STEPS + 1))
    assert _losses(resumed) == losses  # bitwise: Muon's momentum came back from the checkpoint
    assert losses[STEPS] < losses[1] - 0.25, losses  # 6.23 -> 5.84 when written
