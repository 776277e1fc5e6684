"""Overrides parse by type; every bad config exits 2 with one line, before jax compiles."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from lmjax import config, resume, sharding, typed
from lmjax.attention import dispatch
from lmjax.config import UserError
from lmjax.train import main


def test_overrides_parse_by_type():
    exp = config.apply_overrides(
        config.load_experiment("stdlib_tiny"),
        [
            "train.steps=7",
            "optim.lr=0.5",
            "model.scan_layers=true",
            "model.flavour=llama",
            "model.tie_embeddings=none",
            'mesh.rules=[["batch", ["data"]]]',
            "data.path=a=b",
        ],
    )
    assert exp.train.steps == 7 and exp.optim.lr == 0.5 and exp.model.scan_layers is True
    assert exp.model.flavour == "llama" and exp.model.tie_embeddings is None
    assert exp.mesh.rules == (("batch", ("data",)),)
    assert exp.data.path == "a=b"


def test_config_round_trips_through_json():
    exp = config.load_experiment("stdlib_tiny")
    assert config.from_dict(json.loads(json.dumps(config.to_dict(exp)))) == exp


@pytest.mark.parametrize("name", config.list_experiments())
def test_shipped_experiments_are_valid(name):
    exp = config.load_experiment(name)
    config.validate(exp)
    sharding.mesh_shape(exp, 8)
    assert exp.name == name
    # Each experiment says at the top what it is for, how long it takes and what to expect.
    doc = importlib.import_module(f"lmjax.experiments.{name}").__doc__
    assert doc and "What for" in doc and "How long" in doc and "Expect" in doc


def test_experiment_by_path(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from lmjax.experiments import stdlib_tiny\nimport dataclasses\n"
        "def config():\n    e = stdlib_tiny.config()\n    return dataclasses.replace(e, name='mine')\n"
    )
    assert config.load_experiment(str(path)).name == "mine"


BAD = [
    (["--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--set", "train.steps=three"], "train.steps='three' is not an int"),
    (["--set", "train"], "not key=value"),
    (["--set", "model=3"], "is a section"),
    (["--set", "model.n_heads=5"], "model.n_heads=5 does not divide model.d_model=192"),
    (["--set", "model.n_kv_heads=4"], "model.n_kv_heads=4 does not divide model.n_heads=6"),
    (["--set", "model.flavour=bert"], "model.flavour='bert'"),
    (["--set", "train.microbatches=3"], "train.microbatches=3 does not divide train.batch_size=32"),
    (["--set", "mesh.fsdp=3"], "multiply to 3, which does not divide the 8 devices"),
    (["--set", "mesh.data=3"], "=3 does not match the 8 devices"),
    (
        ["--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.tensor=1"],
        "does not match the 8 devices",
    ),
    (["--set", "train.batch_size=12"], "batch per micro-step 12"),
    (["--set", "mesh.tensor=8", "--set", "mesh.data=1"], "mesh.tensor=8 does not divide model.n_heads=6"),
    (["--set", "data.source=files", "--set", "data.path=/nonexistent/corpus"], "matches no files"),
    (["--set", "data.source=files"], "data.source=files needs data.path"),
    (
        ["--set", "data.source=hdf5"],
        "data.source='hdf5': use stdlib|files|jsonl|parquet|tfds|chat|stdlib_chat|mixture",
    ),
    (["--set", "data.source=jsonl"], "data.source=jsonl needs data.path"),
    (["--set", "data.source=tfds"], "data.source=tfds needs data.name"),
    (["--set", "data.source=mixture"], "data.source=mixture needs data.mixture"),
    (
        ["--set", "data.source=mixture", "--set", 'data.mixture=[{"source": "stdlib", "weight": 0}]'],
        "data.mixture[0].weight=0 must be positive",
    ),
    (
        ["--set", "data.source=mixture", "--set", 'data.mixture=[{"source": "stdlib", "wieght": 1}]'],
        "data.mixture[0]: unknown Source fields ['wieght']; use ['field', 'name', 'path', 'source',",
    ),
    (["--set", "data.source=tfds", "--set", "data.name=no_such_dataset_xyz"], "unknown TFDS dataset"),
    (
        ["--set", "data.source=mixture", "--set", 'data.mixture=[{"source": "stdlib", "weight": "x"}]'],
        "data.mixture[0].weight='x' is not a float",
    ),
    (
        ["--set", "data.source=mixture", "--set", 'data.mixture=[{"source": "jsonl", "path": 5}]'],
        "data.mixture[0].path=5 is not a str",
    ),
    (["--set", "model.n_kv_heads=-1"], "model.n_kv_heads=-1 must be >= 0"),
    (["--set", "model.d_ff=-5"], "model.d_ff=-5 must be >= 0"),
    (["--set", "optim.warmup_steps=-3"], "optim.warmup_steps=-3 must be >= 0"),
    (["--set", "optim.weight_decay=-1"], "optim.weight_decay=-1.0 must be >= 0"),
    (["--set", "train.eval_every=-1"], "train.eval_every=-1 must be >= 0"),
    (["--set", "optim.b2=1"], "optim.b2=1.0 must be in [0, 1)"),
    (["--set", 'mesh.rules=[["batch", "data"]]'], "mesh.rules has no rule for ['act_batch'"),
    (["--set", "mesh.rules=[[oops"], "mesh.rules='[[oops' is not a list"),
    (
        ["--set", "checkpoint.keep_every=700"],
        "checkpoint.keep_every=700 is not a multiple of checkpoint.every=500",
    ),
    (["--set", "checkpoint.keep=0"], "checkpoint.keep=0 must be positive"),
    (["--set", "model.remat=bad"], "model.remat='bad': use none|full|dots|named"),
    (["--set", 'model.remat_names=["qkv", "kv"]'], "model.remat_names[1]='kv': use qkv|attn_out|mlp_in"),
    (["--set", "model.attention=flash"], "model.attention='flash': use auto|xla|cudnn|cudnn_packed|pallas|"),
    (["--set", "optim.lr=inf"], "optim.lr=inf is not finite; give a finite number"),
    (["--set", "optim.lr=nan"], "optim.lr=nan is not finite; give a finite number"),
    (["--set", "model.z_loss=-inf"], "model.z_loss=-inf is not finite; give a finite number"),
    (
        ["--set", "data.source=mixture", "--set", 'data.mixture=[{"source": "stdlib", "weight": Infinity}]'],
        "data.mixture[0].weight=inf is not finite",
    ),
    (["--set", "optim.decay_fraction=1.5"], "optim.decay_fraction=1.5 must be in [0, 1]"),
    (["--set", "optim.min_lr_ratio=-0.1"], "optim.min_lr_ratio=-0.1 must be in [0, 1]"),
    (["--set", "optim.muon_momentum=1"], "optim.muon_momentum=1.0 must be in [0, 1)"),
    (["--set", "data.validation_percent=50"], "data.validation_percent=50.0 must be in (0, 50)"),
    (["--set", "data.validation_percent=0"], "data.validation_percent=0.0 must be in (0, 50)"),
    (["--set", "model.vocab_size=-1"], "model.vocab_size=-1 must be in [0, 4194304]"),
    (["--set", "data.tokenizer_sample_bytes=0"], "data.tokenizer_sample_bytes=0 must be positive"),
    (["--set", "train.profile_steps=[1, 2.5]"], "train.profile_steps[1]=2.5 is not an int"),
    (["--set", 'mesh.rules=[["batch"]]'], "mesh.rules[0]=('batch',) is not a pair"),
    (
        ["--set", f"mesh.rules={json.dumps([('batch', 'dat'), *config.Mesh.rules[1:]])}"],
        "mesh.rules maps 'batch' to 'dat'; use data, fsdp, tensor",
    ),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_exits_2_with_one_line(extra, message, tmp_path, capsys):
    assert main(["--experiment", "stdlib_tiny", "--workdir", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmjax: error: ")
    assert message in err
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_unknown_experiment(tmp_path, capsys):
    assert main(["--experiment", "nope", "--workdir", str(tmp_path)]) == 2
    assert "no experiment named 'nope'; choose one of" in capsys.readouterr().err


def test_real_process_exit_code_and_no_jax_import(tmp_path):
    """A real interpreter: exit status 2, one line, no traceback, and jax never imported."""
    code = (
        "import sys; from lmjax.train import main; rc = main(sys.argv[1:]); "
        "assert 'jax' not in sys.modules, 'jax was imported before the config was checked'; sys.exit(rc)"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--experiment",
            "stdlib_tiny",
            "--workdir",
            str(tmp_path),
            "--set",
            "model.n_heads=5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "lmjax: error: model.n_heads=5 does not divide model.d_model=192; pick heads that divide it"
    ]


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmjax.train",
            "--experiment",
            "stdlib_tiny",
            "--workdir",
            str(tmp_path),
            "--set",
            "optim.lr=-1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "lmjax: error: optim.lr=-1.0 must be positive"


def test_vocab_smaller_than_tokenizer_is_a_user_error():
    from lmjax.resume import with_vocab

    exp = config.load_experiment("stdlib_tiny")
    with pytest.raises(UserError, match="model.vocab_size=100 is smaller than the tokenizer's 2048"):
        with_vocab(config.apply_overrides(exp, ["model.vocab_size=100"]), 2048)
    assert with_vocab(exp, 2048).model.vocab_size == 2048


def test_tensor_axis_must_divide_the_padded_vocabulary():
    exp = config.apply_overrides(
        config.load_experiment("stdlib_tiny"),
        ["mesh.data=2", "mesh.tensor=3", "model.vocab_size=200", "train.batch_size=4"],
    )
    with pytest.raises(UserError, match="mesh.tensor=3 does not divide the padded vocabulary 256"):
        sharding.mesh_shape(exp, 6)  # e.g. a box of 6 GPUs
    assert sharding.mesh_shape(config.apply_overrides(exp, ["model.vocab_size=300"]), 6) == (2, 1, 3)


def test_experiments_load_from_a_bare_checkout(tmp_path):
    """On PYTHONPATH without an install (the GPU image), experiments load and import each other."""
    repo = Path(__file__).resolve().parent.parent
    code = (
        "from lmjax import config; print(config.load_experiment('gpt2_774m').name, config.list_experiments())"
    )
    isolated = {"PATH": os.environ["PATH"], "PYTHONPATH": str(repo)}
    # -S: no site-packages, so not the editable install either; config needs no third-party code.
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], env=isolated, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gpt2_774m [") and "'stdlib_tiny'" in out.stdout


def test_a_saved_config_read_back_resumes_without_changes():
    """What a checkpoint stores (JSON) compares equal to the experiment it came from, mixtures,
    rules and tuples included, so a plain resume reports no change."""
    exp = config.apply_overrides(
        config.load_experiment("llama_1b"),
        [
            "data.source=mixture",
            'data.mixture=[{"source": "jsonl", "path": "/a", "weight": 3}, {"source": "stdlib"}]',
            "train.profile_steps=[2,3]",
        ],
    )
    saved = config.from_dict(json.loads(json.dumps(config.to_dict(exp))))
    assert resume.check_resume(saved, exp, 5, "the checkpoint", "DIR") == []
    changed = config.apply_overrides(
        exp, ["optim.lr=1e-4", "train.steps=9000", "mesh.tensor=2", "model.z_loss=1e-4"]
    )
    assert resume.check_resume(saved, changed, 5, "the checkpoint", "DIR") == [
        "model.z_loss: 0.0 -> 0.0001",
        f"optim.lr: {exp.optim.lr!r} -> 0.0001",
        f"train.steps: {exp.train.steps} -> 9000 (the learning-rate schedule now ends at step 9000)",
    ]
    with pytest.raises(config.UserError, match=r"data.mixture=.* but the checkpoint was trained with"):
        resume.check_resume(
            saved,
            config.apply_overrides(exp, ['data.mixture=[{"source": "stdlib"}]']),
            5,
            "the checkpoint",
            "D",
        )


def _choice_fields(cls: type = config.Experiment, prefix: str = "") -> list[tuple[str, tuple[str, ...]]]:
    """(--set key, choices) of every section field whose type is a Literal."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out += _choice_fields(hint, f"{prefix}{name}.")
        elif typing.get_origin(hint) is typing.Literal:
            out.append((f"{prefix}{name}", typing.get_args(hint)))
    return out


CHOICES = _choice_fields()


def test_choice_fields_are_found():
    keys = {key for key, _ in CHOICES}
    assert {"model.flavour", "model.remat", "model.attention", "data.source", "optim.schedule"} <= keys


@pytest.mark.parametrize("key,choices", CHOICES, ids=[k for k, _ in CHOICES])
def test_every_choice_is_taken_and_others_refused(key, choices):
    exp = config.load_experiment("stdlib_tiny")
    section, field = key.split(".")
    for choice in choices:
        assert getattr(getattr(config.apply_overrides(exp, [f"{key}={choice}"]), section), field) == choice
    with pytest.raises(UserError) as e:
        config.apply_overrides(exp, [f"{key}=bogus"])
    assert str(e.value) == f"{key}='bogus': use {'|'.join(choices)}"


def test_every_attention_choice_is_an_implementation():
    """dispatch runs exactly the kinds the config offers: each resolves, an unknown one is refused."""
    kinds = typing.get_args(config.Attention)
    assert dispatch.IMPLEMENTATIONS == kinds
    resolved = {dispatch.resolve(kind, (1, 128, 4, 64), "float32", True, backend="cpu") for kind in kinds}
    assert resolved == set(kinds) - {"auto"}
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        dispatch.resolve("flash", (1, 128, 4, 64), "float32", True, backend="cpu")


def _replace(exp: config.Experiment, section: str, **changes) -> config.Experiment:
    return dataclasses.replace(exp, **{section: dataclasses.replace(getattr(exp, section), **changes)})


@pytest.mark.parametrize(
    "section,changes,message",
    [
        ("model", {"remat": "bad"}, "model.remat='bad': use none|full|dots|named"),
        ("model", {"remat_names": ("qkv", "kv")}, "model.remat_names[1]='kv': use qkv|attn_out|mlp_in"),
        ("model", {"dtype": "float64"}, "model.dtype='float64': use float32|bfloat16|float16"),
        ("optim", {"lr": float("inf")}, "optim.lr=inf is not finite; give a finite number"),
        ("optim", {"b1": 1.0}, "optim.b1=1.0 must be in [0, 1)"),
        ("train", {"steps": "100"}, "train.steps='100' is not an int; give an int"),
        ("train", {"steps": True}, "train.steps=True is not an int"),
        ("model", {"tie_embeddings": "yes"}, "model.tie_embeddings='yes' is not a bool or null"),
        (
            "data",
            {"mixture": (config.Source(source="csv"),), "source": "mixture"},
            "data.mixture[0].source='csv'",
        ),
        ("data", {"mixture": ({"source": "stdlib"},), "source": "mixture"}, "data.mixture[0]={'source'"),
    ],
)
def test_values_set_in_an_experiment_file_are_checked(section, changes, message):
    """Not only --set: validate walks every field of what config() returned."""
    with pytest.raises(UserError) as e:
        config.validate(_replace(config.load_experiment("stdlib_tiny"), section, **changes))
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1


def test_between_describes_its_range():
    assert [str(b) for b in (typed.Positive, typed.NonNegative, typed.Between(0, 1, closed_right=False))] == [
        "positive",
        ">= 0",
        "in [0, 1)",
    ]
    assert typed.Between(0, 50, closed_left=False, closed_right=False).holds(49.9)
    assert not typed.Between(0, 50, closed_left=False, closed_right=False).holds(0)


def test_a_config_json_with_a_setting_no_longer_read_still_loads():
    """Older runs saved a train.nan_at_step setting, which is read and ignored: they still resume."""
    exp = config.load_experiment("stdlib_tiny")
    saved = config.to_dict(exp)
    saved["train"]["nan_at_step"] = 0
    assert config.from_dict(json.loads(json.dumps(saved))) == exp
    saved["train"]["nan_at_stepz"] = 0
    with pytest.raises(ValueError, match=r"train: unknown Train fields \['nan_at_stepz'\]"):
        config.from_dict(saved)
