"""`python -m lmjax.train` end to end on the stdlib corpus, 8 emulated devices, in-process."""

import json
import math

import pytest
from conftest import TINY_DATA, metrics_of, tiny_train_argv

from lmjax import config, flops
from lmjax.train import main

STEPS, BATCH, SEQ = 80, 16, 64


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    argv = [
        "--experiment",
        "stdlib_tiny",
        "--workdir",
        str(workdir),
        "--set",
        f"data.vocab_size={TINY_DATA.vocab_size}",
        "--set",
        f"data.tokenizer_sample_bytes={TINY_DATA.tokenizer_sample_bytes}",
        "--set",
        "model.d_model=64",
        "--set",
        "model.n_heads=4",
        "--set",
        "model.n_layers=2",
        "--set",
        f"model.seq_len={SEQ}",
        "--set",
        f"train.steps={STEPS}",
        "--set",
        f"train.batch_size={BATCH}",
        "--set",
        "train.eval_every=40",
        "--set",
        "train.log_every=10",
        "--set",
        "train.eval_batches=4",
        "--set",
        "train.peak_tflops=1.5",
        "--set",
        "mesh.data=4",
        "--set",
        "mesh.fsdp=2",
        "--set",
        "optim.lr=1e-2",
        "--set",
        "optim.warmup_steps=10",
    ]
    assert main(argv) == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def test_held_out_loss_falls_well_below_the_start(run):
    _, train, evals = run
    start = math.log(TINY_DATA.vocab_size)  # small init: the first predictions are uniform
    assert [e["step"] for e in evals] == [40, 80]
    assert evals[-1]["eval_loss"] < start - 1.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert 0.5 < evals[-1]["eval_bpb"] < 4.0


def test_metrics_lines(run):
    _, train, _ = run
    assert [r["step"] for r in train] == list(range(10, STEPS + 1, 10))
    cfg = config.load_experiment("stdlib_tiny").model
    for r in train:
        assert set(r) >= {"step", "loss", "grad_norm", "lr", "tokens", "time", "tokens_per_s", "mfu"}
        assert r["tokens"] == r["step"] * BATCH * SEQ
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
    model = config.Model(
        **{**cfg.__dict__, "d_model": 64, "n_heads": 4, "n_layers": 2, "seq_len": SEQ, "vocab_size": 512}
    )
    r = train[-1]
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops.flops_per_token(model) / (8 * 1.5e12))
    assert [r["time"] for r in train] == sorted(r["time"] for r in train)
    assert train[-1]["lr"] == pytest.approx(1e-3, rel=0.05)  # cosine ends at lr * min_lr_ratio


def test_resolved_config_and_tokenizer_are_saved(run):
    workdir, _, _ = run
    saved = config.from_dict(json.loads((workdir / "config.json").read_text()))
    assert saved.model.vocab_size == TINY_DATA.vocab_size  # filled in from the tokenizer
    assert saved.train.steps == STEPS and saved.mesh.fsdp == 2
    assert saved.model.max_segments > 1  # the packed kernel sized to the windows of this data
    from lmjax.data.tokenizer import Tokenizer

    assert (
        Tokenizer.load(workdir / "tokenizer.model").decode(
            Tokenizer.load(workdir / "tokenizer.model").encode("x = 1\n")
        )
        == "x = 1\n"
    )


def test_no_mfu_without_a_known_peak(tmp_path):
    assert main(tiny_train_argv(tmp_path, "train.steps=3", "train.log_every=1")) == 0
    lines = metrics_of(tmp_path)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert "tokens_per_s" not in lines[0]  # step 1 holds the compile time
    assert not any("mfu" in r for r in lines)


def test_profile_steps_write_a_trace(tmp_path):
    assert main(tiny_train_argv(tmp_path, "train.steps=3", "train.profile_steps=[2,3]")) == 0
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_a_trace_cut_short_by_an_error_is_stopped(tmp_path):
    import jax

    from lmjax.metrics import StepTrace

    trace = StepTrace(tmp_path / "a", (1, 3), log=lambda m: None)
    trace.before(1)
    trace.stop()  # what the loop's `finally` does when step 2 raises
    jax.profiler.start_trace(str(tmp_path / "b"))  # would raise "already started" otherwise
    jax.profiler.stop_trace()


def test_a_single_step_run_logs_its_step(tmp_path):
    assert main(tiny_train_argv(tmp_path, "train.steps=1")) == 0
    assert [sorted(r) for r in metrics_of(tmp_path)] == [
        ["grad_norm", "loss", "lr", "step", "time", "tokens", "tokens_per_s"],
        ["eval_bpb", "eval_loss", "eval_perplexity", "step"],
    ]


def test_trains_on_a_mixture_of_jsonl_and_parquet(tmp_path):
    """The whole path from files a user has: two corpora, mixed 3:1, tokenized and trained on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(300)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"body": [t.upper() for t in texts]}), tmp_path / "b.parquet")
    mixture = [
        {"source": "jsonl", "path": str(tmp_path / "a.jsonl"), "weight": 3},
        {"source": "parquet", "path": str(tmp_path / "b.parquet"), "field": "body", "weight": 1},
    ]
    argv = tiny_train_argv(
        tmp_path / "run",
        "data.source=mixture",
        f"data.mixture={json.dumps(mixture)}",
        "data.vocab_size=300",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.steps=30",
        "optim.lr=1e-2",
        "optim.warmup_steps=5",
    )
    assert main(argv) == 0
    saved = config.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert [c.weight for c in saved.data.mixture] == [3, 1] and saved.data.mixture[1].field == "body"
    evals = [r for r in metrics_of(tmp_path / "run") if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < math.log(300) - 1.5  # it learned the repetitive corpora


def test_a_workdir_with_a_run_is_not_overwritten_by_another_model(run, capsys):
    workdir, _, _ = run
    before = (workdir / "metrics.jsonl").read_text()
    assert main(["--experiment", "stdlib_tiny", "--workdir", str(workdir)]) == 2
    assert "model.d_model=192 but the checkpoint at step 80 was trained with 64" in capsys.readouterr().err
    assert (workdir / "metrics.jsonl").read_text() == before
