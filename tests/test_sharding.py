"""The same train step on different meshes gives the same numbers; layouts follow the rules."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_experiment
from jax.sharding import PartitionSpec as P

from lmjax import optim, sharding, step

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2)]


def two_steps(exp, devices=None):
    """(metrics of the second step, params after two steps, state) on a mesh over `devices`."""
    mesh = sharding.make_mesh(exp, devices)
    tx = optim.make(exp.optim, exp.train.steps)
    batch = synthetic_batch(exp.train.batch_size, exp.model.seq_len, exp.model.vocab_size)
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.init_state(exp, tx, mesh)
        train_step = step.make_train_step(graphdef, tx, exp, shardings, mesh)
        placement = sharding.BatchPlacement(mesh, exp.train.batch_size)
        state, metrics = train_step(state, placement.put_global(batch))
        state, metrics = train_step(state, placement.put_global(batch))
    return jax.device_get(metrics), jax.device_get(state["params"]), state


def _mesh(exp, shape):
    return dataclasses.replace(
        exp, mesh=dataclasses.replace(exp.mesh, data=shape[0], fsdp=shape[1], tensor=shape[2])
    )


def _assert_same(a, b, rtol=2e-5, atol=1e-5):
    """Reductions run in another order on another mesh. Parameters after two Adam steps agree
    to 1e-5 absolute (0.1% of one step's size at lr 1e-2)."""
    (ma, pa), (mb, pb) = a, b
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=rtol)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=rtol)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), pa, pb)


@pytest.fixture(scope="module")
def single_device_llama():
    exp = tiny_experiment("llama")
    metrics, params, _ = two_steps(exp, jax.devices()[:1])
    return metrics, params


@pytest.mark.parametrize("shape", MESHES)
def test_meshes_equal_one_device(single_device_llama, shape):
    exp = _mesh(tiny_experiment("llama"), shape)
    metrics, params, _ = two_steps(exp)
    _assert_same((metrics, params), single_device_llama)


def test_pallas_attention_on_2x2x2_equals_xla_on_one_device(single_device_llama):
    """The Pallas kernel (interpret mode here) runs per shard inside the sharded train step."""
    exp = _mesh(tiny_experiment("llama", "model.attention=pallas"), (2, 2, 2))
    metrics, params, _ = two_steps(exp)
    _assert_same((metrics, params), single_device_llama)


def test_gpt2_on_2x2x2_equals_one_device():
    exp = tiny_experiment("gpt2")
    one = two_steps(exp, jax.devices()[:1])[:2]
    _assert_same(two_steps(_mesh(exp, (2, 2, 2)))[:2], one)


def test_layout_follows_rules():
    exp = _mesh(tiny_experiment("llama"), (2, 2, 2))
    _, _, state = two_steps(exp)
    params = state["params"]
    w_q = params["layers"]["w_q"][...]  # [L, D, H, E] as ("layers", "embed", "heads", "head_dim")
    assert w_q.sharding.spec == P(None, "fsdp", "tensor", None)
    L, D, H, E = w_q.shape
    assert {s.data.shape for s in w_q.addressable_shards} == {(L, D // 2, H // 2, E)}
    assert params["embed"][...].sharding.spec == P("tensor", "fsdp")  # ("vocab", "embed")
    assert params["layers"]["w_down"][...].sharding.spec == P(None, "tensor", "fsdp")
    # Adam's moments are laid out like their parameters.
    adam = state["opt_state"][1][0]
    assert adam.mu["layers"]["w_q"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert adam.nu["embed"][...].sharding.spec == P("tensor", "fsdp")


def test_custom_rules_change_layout():
    rules = (
        '[["batch",["data","fsdp"]],["act_batch",["data","fsdp"]],["act_seq",null],["act_embed",null],'
        '["act_heads",null],["act_kv_heads",null],["act_mlp",null],["act_vocab",null],["layers",null],'
        '["embed",null],["heads",null],["kv_heads",null],["head_dim",null],["mlp","fsdp"],["vocab",null],'
        '["positions",null]]'
    )
    exp = tiny_experiment("llama", "mesh.data=4", "mesh.fsdp=2", "mesh.tensor=1", f"mesh.rules={rules}")
    _, _, state = two_steps(exp)
    assert state["params"]["layers"]["w_up"][...].sharding.spec == P(None, None, "fsdp")
    assert state["params"]["layers"]["w_q"][...].sharding.spec == P(None, None, None, None)


def test_accumulation_equals_whole_batch():
    exp = _mesh(tiny_experiment("gpt2", "train.batch_size=32"), (8, 1, 1))
    whole = two_steps(exp)[:2]
    accumulated = two_steps(
        _mesh(tiny_experiment("gpt2", "train.batch_size=32", "train.microbatches=4"), (8, 1, 1))
    )[:2]
    _assert_same(accumulated, whole)


def test_batch_placement_puts_this_hosts_rows():
    """One host holds every row: `put` takes exactly those, `put_global` the same batch whole."""
    exp = _mesh(tiny_experiment("gpt2"), (2, 2, 2))
    mesh = sharding.make_mesh(exp)
    batch = synthetic_batch(8, exp.model.seq_len, exp.model.vocab_size)
    with sharding.use(mesh, exp.mesh.rules):
        placement = sharding.BatchPlacement(mesh, 8)
        placed = placement.put_global(batch)
        with pytest.raises(ValueError, match="inputs has 4 rows; this host holds 8"):
            placement.put({k: v[:4] for k, v in batch.items()})
    np.testing.assert_array_equal(placement.rows, np.arange(8))
    assert placement.sharding.spec == P(("data", "fsdp"), None)
    for k, v in batch.items():
        assert placed[k].sharding == placement.sharding
        np.testing.assert_array_equal(np.asarray(placed[k]), v)
