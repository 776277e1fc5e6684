"""The resource planner: its memory estimate against XLA's analysis of the real train step, its
FLOPs against lmjax.flops, and the CLI's answers (exit status, overflow message, --json)."""

import json

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_experiment

from lmjax import config, flops, hardware, optim, plan, sharding, step


def xla_peak_bytes(exp: config.Experiment) -> int:
    """Per-device peak of the compiled train step, as plan.py reads XLA: the state is donated,
    so arguments + outputs that reuse no argument's buffer + temporaries. Nothing is allocated."""
    n = exp.mesh.data * exp.mesh.fsdp * exp.mesh.tensor
    mesh = sharding.make_mesh(exp, jax.devices()[:n])
    tx = optim.make(exp.optim, exp.train.steps)
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings = step.abstract_state(exp, tx, mesh)
        train_step = step.make_train_step(graphdef, tx, exp, shardings, mesh)
        batch_sh = step.batch_sharding(mesh)
        shape = (exp.train.batch_size, exp.model.seq_len)
        batch = {
            name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
            for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32))
        }
        m = train_step.lower(state, batch).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


# fp32 with scanned layers: the CPU backend computes bf16 in fp32 and shows no remat effect on
# unrolled layers. Sizes, remat policies and meshes all differ.
COMPARED = {
    "gpt2 1 device, no remat": (
        "gpt2",
        "model.d_model=64",
        "model.seq_len=64",
        "model.vocab_size=512",
        "mesh.data=1",
    ),
    "gpt2 fsdp=4, remat full": (
        "gpt2",
        "model.d_model=128",
        "model.n_layers=4",
        "model.seq_len=128",
        "model.d_ff=512",
        "model.vocab_size=1024",
        "model.remat=full",
        "mesh.fsdp=4",
    ),
    "llama data=2 x tensor=2, remat dots": (
        "llama",
        "model.d_model=64",
        "model.n_layers=3",
        "model.seq_len=64",
        "model.d_ff=256",
        "model.vocab_size=512",
        "model.remat=dots",
        "mesh.data=2",
        "mesh.tensor=2",
    ),
}


@pytest.mark.parametrize("name", COMPARED)
def test_memory_estimate_within_25_percent_of_xla(name):
    flavour, *overrides = COMPARED[name]
    exp = tiny_experiment(flavour, "model.scan_layers=true", *overrides)
    n = exp.mesh.data * exp.mesh.fsdp * exp.mesh.tensor
    estimate = plan.memory_per_device(exp, n)
    assert estimate["total"] == pytest.approx(sum(estimate[p] for p in plan.PARTS))
    actual = xla_peak_bytes(exp)
    assert 0.75 < estimate["total"] / actual < 1.25, (name, estimate, actual)


def test_state_is_sharded_and_optimizer_from_optax():
    exp = tiny_experiment("gpt2", "model.d_model=64")
    one = plan.memory_per_device(exp, 1)
    fsdp = plan.memory_per_device(config.apply_overrides(exp, ["mesh.fsdp=4"]), 4)
    assert fsdp["params"] < one["params"] / 2  # the big matrices split over fsdp, norms and biases not
    assert one["optimizer"] == pytest.approx(2 * one["params"], rel=0.01)  # AdamW's two moments
    muon = plan.memory_per_device(config.apply_overrides(exp, ["optim.name=muon"]), 1)
    assert muon["optimizer"] < one["optimizer"]  # one momentum for the hidden matrices
    micro = plan.memory_per_device(config.apply_overrides(exp, ["train.microbatches=2"]), 1)
    assert micro["gradients"] == 2 * one["gradients"]
    assert micro["activations"] < one["activations"]


def test_flops_agree_with_lmjax_flops():
    exp = plan.resolve("gpt2_124m", [])
    result = plan.plan(exp, hardware.parse("8xH100"))
    assert result.flops_per_token == flops.flops_per_token(exp.model)
    assert result.params == flops.count_params(exp.model)
    assert result.tokens == exp.train.steps * exp.train.batch_size * exp.model.seq_len
    assert result.total_flops == result.flops_per_token * result.tokens
    assert result.optimal_tokens == 20 * result.params
    assert result.mesh == {"data": 8, "fsdp": 1, "tensor": 1}


def test_device_specs():
    assert hardware.parse("8xH100").count == 8
    assert hardware.parse("H200").count == 1
    assert hardware.parse("v5p-64").count == 32  # v5p names count TensorCores, two per chip
    assert hardware.parse("v5e-8").count == 8
    assert hardware.parse("1xA100-80GB").peak_tflops == 312.0
    assert hardware.parse("4xcpu").count == 4


def test_does_not_fit_names_the_overflowing_part(capsys):
    argv = ["--experiment", "gpt2_124m", "--devices", "1xH100", "--set", "train.batch_size=512"]
    assert plan.main(argv) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out
    assert "does not fit: activations" in out and "over)" in out
    assert "fastest that fits   --set mesh.data=1" in out and "train.microbatches=" in out


def test_bad_devices_is_one_line_exit_2(capsys):
    assert plan.main(["--experiment", "stdlib_tiny", "--devices", "9xfoo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--devices '9xfoo'" in err[0] and "8xH100" in err[0]


def test_json_output_parses(capsys):
    assert plan.main(["--experiment", "stdlib_tiny", "--devices", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] and result["memory"]["total"] > 0 and result["n_devices"] == 1
