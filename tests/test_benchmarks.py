"""benchmarks/gpu.sh --cpu end to end (the GPU run's rehearsal) and benchmarks/throughput.py."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmjax import config, flops

REPO = Path(__file__).resolve().parent.parent
TINY = [
    *("--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4"),
    *("--set", "model.d_ff=128", "--set", "model.n_kv_heads=2"),
    *("--set", "model.seq_len=64", "--set", "train.batch_size=8", "--set", "model.vocab_size=512"),
    *("--set", "model.dtype=float32", "--steps", "2", "--warmup", "1", "--ceiling-size", "256"),
]
RUNS = ("gpt2_124m-cpu1", "gpt2_124m-cpu1-packed", "gpt2_774m-cpu1", "llama_1b-cpu1")
STAGES = [
    *("env", "attention-check", "gpt2_124m", "llama_1b", "gpt2_774m", "variants", "gpt2_124m-packed"),
    *("generate", "plan-check"),
]
# Not on the GPU image (sentencepiece is, and generation loads it with a run's tokenizer).
DATA_MODULES = {"grain", "array_record", "tensorflow", "tensorflow_datasets", "pyarrow"}


def _benchmark(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))  # they import their neighbours (measure, throughput)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


throughput = _benchmark("throughput")
checkpoint_io = _benchmark("checkpoint_io")
generate_speed = _benchmark("generate_speed")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> Path:
    """OUT of one `bash benchmarks/gpu.sh --cpu` (tiny models; the compilation cache is shared)."""
    out = tmp_path_factory.mktemp("gpu-run")
    env = os.environ | {"OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_every_stage_ran_and_passed(rehearsal):
    stages = [json.loads(line) for line in (rehearsal / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == STAGES
    logs = {s["stage"]: (rehearsal / f"{s['stage']}.log").read_text()[-2000:] for s in stages}
    failed = {s["stage"]: logs[s["stage"]] for s in stages if not s["ok"]}
    assert not failed, failed
    assert "env: ok" in logs["env"] and "jaxlib" in logs["env"] and "devices: [CpuDevice" in logs["env"]
    check = json.loads((rehearsal / "attention_check.json").read_text())
    assert check["ok"] and check["results"] and all(r["ok"] for r in check["results"])
    assert {r["implementation"] for r in check["results"]} >= {"xla"}


@pytest.mark.parametrize("run", RUNS)
def test_throughput_record(rehearsal, run):
    r = json.loads((rehearsal / f"throughput-{run}.json").read_text())
    model = config.from_dict(r["config"]).model
    assert r["complete"] is True and "error" not in r
    assert r["device"]["platform"] == "cpu" and r["device"]["count"] == 1
    assert {"jax", "jaxlib", "flax", "optax", "numpy", "python"} <= set(r["versions"])
    assert "cudnn" not in r["versions"]  # no CUDA here
    assert r["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == os.environ.get(
        "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"
    )
    assert r["timing"] == "device step only; batches pre-placed"
    cache = r["compilation_cache"]  # gpu.sh always sets JAX_COMPILATION_CACHE_DIR
    assert cache["enabled"] and cache["dir"] and "cache" in cache["note"]
    assert isinstance(r["compile_cache_hit"], bool)
    assert r["batch"] == ("packed" if run.endswith("packed") else "plain")
    assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["compile_s"] > 0
    assert r["tokens_per_step"] == model.seq_len * r["config"]["train"]["batch_size"]
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["step_ms"] / 1000), rel=1e-9)
    assert r["flops_per_token"] == flops.flops_per_token(model)
    assert r["mfu"] is None and r["peak_tflops"] is None  # no datasheet peak for a CPU
    measured = r["tokens_per_s"] * r["flops_per_token"] / (r["ceiling_tflops"] * 1e12 * r["device"]["count"])
    assert r["mfu_vs_measured"] == pytest.approx(measured, rel=1e-9)
    assert r["ceiling_size"] == 1024 and r["ceiling_dtype"] == model.dtype == "float32"
    assert any(v > 0 for v in r["memory_analysis"].values())
    assert r["params"] > r["params_matmul"] > 0 and r["attention_impl"] == "xla"
    assert model.vocab_size == 512 and r["vocab_source"] == "--set"
    # Random tokens over the vocabulary: a freshly initialised model's loss is about ln(V).
    assert abs(r["final_loss"] - math.log(model.vocab_size)) < 0.5
    assert r["uniform_loss"] == pytest.approx(math.log(model.vocab_size))
    assert r["distinct_batches"] == r["warmup"] + r["steps"]  # no batch seen twice
    assert "WARNING" not in throughput.summary(r)
    # A loss far under ln(V) on fresh random tokens is flagged in the one-line summary.
    assert "does attention see the future?" in throughput.summary(r | {"final_loss": 0.05})


def test_packed_run_measures_the_same_model(rehearsal):
    plain, packed = (json.loads((rehearsal / f"throughput-{r}.json").read_text()) for r in RUNS[:2])
    assert (plain["batch"], packed["batch"]) == ("plain", "packed")
    # The packed kernel is sized to the documents the generated rows hold; nothing else differs.
    assert plain["config"]["model"]["max_segments"] == 0 and "max_segments" not in plain
    assert (
        packed["max_segments"]
        == packed["max_segments_in_data"]
        == packed["config"]["model"]["max_segments"]
        > 1
    )
    packed["config"]["model"]["max_segments"] = 0
    assert plain["config"] == packed["config"]


def test_profile_says_where_the_step_time_goes(rehearsal):
    p = json.loads((rehearsal / "throughput-gpt2_124m-cpu1.json").read_text())["profile"]
    assert p["steps"] == 3 and p["kernels_per_step"] > 10 and p["busy_ms_per_step"] > 0
    assert sum(p["by_kind_ms"].values()) == pytest.approx(p["busy_ms_per_step"], rel=1e-3)
    top = p["top_kernels"]
    assert top and all(a["ms_per_step"] >= b["ms_per_step"] for a, b in zip(top, top[1:], strict=False))
    assert Path(p["trace"]).is_file()


def test_variants_share_one_ceiling(rehearsal):
    r = json.loads((rehearsal / "variants-gpt2_124m-cpu1.json").read_text())
    base, batch16 = r["variants"]["base"], r["variants"]["batch16"]
    assert base["overrides"] == [] and batch16["overrides"] == ["train.batch_size=16"]
    assert batch16["record"]["tokens_per_step"] == 2 * base["record"]["tokens_per_step"]
    for v in (base, batch16):
        flops_per_s = v["tokens_per_s"] * v["record"]["flops_per_token"]
        assert v["mfu_vs_measured"] == pytest.approx(flops_per_s / (r["ceiling_tflops"] * 1e12), rel=1e-9)


def test_variant_and_compile_option_parsing():
    variants = _benchmark("step_variants")
    assert variants.parse_variant("base=") == ("base", [], [])
    assert variants.parse_variant("v=model.remat=dots,xla:xla_a=false") == (
        "v",
        ["model.remat=dots"],
        ["xla_a=false"],
    )
    with pytest.raises(config.UserError):
        variants.parse_variant("no-equals-sign")
    options = throughput.compiler_options(["xla_a=false", "xla_b=3", "xla_c=0.5", "xla_d=text"])
    assert options == {"xla_a": False, "xla_b": 3, "xla_c": 0.5, "xla_d": "text"}
    with pytest.raises(SystemExit):
        throughput.parse_args(["--experiment", "gpt2_124m", "--xla", "not_an_option"])


def test_skipped_stages_are_recorded_not_failed(tmp_path):
    env = os.environ | {
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "LMJAX_BENCH_SKIP": " ".join(STAGES[1:]),
    }
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    stages = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == STAGES and stages[0]["ok"] is True
    assert all(s["ok"] is None and s["skipped"] == "named in LMJAX_BENCH_SKIP" for s in stages[1:])


def test_env_stage_stops_a_run_without_the_gpu(tmp_path):
    """No --cpu on this CPU box: the env stage fails in seconds and no other stage runs. PYTHON
    unset: gpu.sh takes the first of python3, python that imports jax (the venv's here)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "JAX_PLATFORMS")}
    env |= {"OUT": str(tmp_path), "PATH": bin_dir + os.pathsep + env["PATH"], "LMJAX_BENCH_BUDGET_S": "60"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stdout + done.stderr
    stages = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == STAGES
    assert stages[0]["rc"] == 1 and all(s["skipped"] == "the env stage failed" for s in stages[1:])
    log = (tmp_path / "env.log").read_text()
    assert "jaxlib" in log and "expected gpu" in log
    assert f"python: {bin_dir}/python" in (tmp_path / "machine.txt").read_text()
    assert not list(tmp_path.glob("throughput-*.json"))


def test_ceiling_only_record(tmp_path):
    assert throughput.main(["--ceiling-only", "--ceiling-size", "256", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "matmul_ceiling-cpu8.json").read_text())
    assert r["experiment"] is None and "tokens_per_s" not in r and r["complete"] is True
    assert r["ceiling_tflops"] > 0 and (r["ceiling_size"], r["ceiling_dtype"]) == (256, "bfloat16")


def test_partial_record_survives_a_failing_step(tmp_path, monkeypatch):
    """Running the step fails (as out of memory would): the compile-time record stays on disk."""
    import jax

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: pretend")

    monkeypatch.setattr(jax, "block_until_ready", out_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        throughput.main(["--experiment", "gpt2_124m", "--out", str(tmp_path), *TINY])
    r = json.loads((tmp_path / "throughput-gpt2_124m-cpu8.json").read_text())
    assert r["complete"] is False and "RESOURCE_EXHAUSTED: pretend" in r["error"]
    assert r["compile_s"] > r["lower_s"] > 0 and any(v > 0 for v in r["memory_analysis"].values())
    assert r["config"]["model"]["d_model"] == 64 and r["timing"] == "device step only; batches pre-placed"
    assert "tokens_per_s" not in r and "ceiling_tflops" not in r


GENERATE_TINY = [*TINY[: TINY.index("--steps")], "--batch", "1", "--prompt-len", "8", "--new-tokens", "2"]


@pytest.mark.parametrize(
    "script, args",
    [("throughput", TINY), ("generate_speed", [*GENERATE_TINY, "--repeats", "1"])],
)
def test_no_data_pipeline_imported(tmp_path, script, args):
    """The GPU image has no grain, TFDS or array_record: the benchmark path must not need them."""
    code = (
        "import json, sys, runpy\n"
        "sys.path.insert(0, 'benchmarks')\n"  # as `python benchmarks/X.py` has it
        f"sys.argv = ['{script}.py', '--experiment', 'gpt2_124m', '--out', {str(tmp_path)!r}, *{args!r}]\n"
        f"try:\n    runpy.run_path('benchmarks/{script}.py', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    imported = set(json.loads(done.stdout.splitlines()[-1]))
    assert "jax" in imported and not imported & DATA_MODULES
    assert len(list(tmp_path.glob("*-gpt2_124m-cpu1.json"))) == 1


def test_the_rehearsal_measured_generation(rehearsal):
    r = json.loads(next(rehearsal.glob("generate-gpt2_124m-cpu*.json")).read_text())
    assert [x["batch"] for x in r["results"]] == [1, 8] and all(
        x["decode_tokens_per_s"] > 0 for x in r["results"]
    )


def test_the_rehearsal_checked_the_planner(rehearsal):
    """Each config's estimate against XLA's analysis of the compiled step, within the tested 25%."""
    r = json.loads(next(rehearsal.glob("plan_check-cpu*.json")).read_text())
    ratios = [c["ratio"] for c in r["results"]]
    assert ratios and all(0.75 < x < 1.25 for x in ratios), ratios


def test_sharded_mesh_in_process(tmp_path):
    """8 emulated devices (conftest) as data 2 x fsdp 4."""
    mesh = ["--set", "mesh.data=2", "--set", "mesh.fsdp=4"]
    assert throughput.main(["--experiment", "llama_1b", "--out", str(tmp_path), *TINY, *mesh]) == 0
    r = json.loads((tmp_path / "throughput-llama_1b-cpu8.json").read_text())
    assert r["device"]["count"] == 8 and r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r["tokens_per_s"] > 0 and r["ceiling_size"] == 256 and r["complete"] is True
    measured = r["tokens_per_s"] * r["flops_per_token"] / (r["ceiling_tflops"] * 1e12 * 8)
    assert r["mfu_vs_measured"] == pytest.approx(measured, rel=1e-9)
    assert abs(r["final_loss"] - math.log(512)) < 0.5


def test_bad_setting_exits_2(capsys):
    assert throughput.main(["--experiment", "gpt2_124m", "--set", "model.nope=1"]) == 2
    assert "unknown config key 'model.nope'" in capsys.readouterr().err


def test_default_vocab_when_the_experiment_takes_the_tokenizers():
    args = throughput.parse_args(["--experiment", "llama_1b"])
    exp, source = throughput.resolve(args)
    assert exp.model.vocab_size == 32768 and source.startswith("default for llama")
    exp, _ = throughput.resolve(throughput.parse_args(["--experiment", "gpt2_124m"]))
    assert exp.model.vocab_size == 50304


@pytest.mark.parametrize("packed", [False, True])
def test_random_batch_layout(packed):
    b = throughput.random_batch(np.random.default_rng(0), 16, 128, 300, packed)
    assert all(v.shape == (16, 128) for v in b.values())
    assert b["inputs"].max() < 300 and np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    if not packed:  # plain causal: no segment ids, so attention takes its unsegmented path
        assert set(b) == {"inputs", "targets", "loss_mask"} and (b["loss_mask"] == 1).all()
        return
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    starts = np.concatenate([np.ones((16, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert np.array_equal(pos == 0, starts)  # positions restart exactly where a document starts
    assert np.all(np.diff(seg, axis=1) >= 0) and np.all(seg[:, 0] == 1)
    assert np.array_equal(mask[:, :-1], (seg[:, 1:] == seg[:, :-1]).astype(np.float32))
    assert seg.max() > 1 and mask.min() == 0
    assert throughput.max_segments([b]) == seg.max()  # ids count the documents from 1 in each row


def test_max_segments_counts_documents_per_row():
    rows = np.array([[1, 1, 2, 3, 3, 3], [1, 1, 1, 1, 1, 1]], np.int32)
    assert throughput.max_segments([{"segment_ids": rows}, {"segment_ids": rows[1:]}]) == 3
    assert throughput.max_segments([{"inputs": rows}]) == 1  # plain batches: one document a row


def test_checkpoint_io_records_a_state_it_saved_and_read_back(tmp_path):
    """8 emulated devices as fsdp 8: a sharded state saved and restored twice."""
    sets = [
        a
        for s in (
            "model.d_model=64",
            "model.n_heads=4",
            "model.n_layers=2",
            "model.vocab_size=512",
            "mesh.fsdp=8",
        )
        for a in ("--set", s)
    ]
    assert (
        checkpoint_io.main(["--experiment", "gpt2_124m", "--repeats", "2", "--out", str(tmp_path), *sets])
        == 0
    )
    r = json.loads((tmp_path / "checkpoint_io-gpt2_124m-cpu8.json").read_text())
    params = flops.count_params(config.from_dict(r["config"]).model)
    assert r["state_bytes"] > 3 * 4 * params  # fp32 parameters and two moments, plus the step
    assert r["disk_bytes"] > 0.5 * r["state_bytes"]  # trained-like moments do not compress away
    assert 0 < r["blocking_s"] <= r["commit_s"] and r["restore_s"] > 0 and r["load_params_s"] > 0
    assert len(r["all_s"]["commit"]) == 2 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}


def test_generate_speed_records_each_batch_size(tmp_path):
    """A tiny llama (GQA) on 8 emulated devices, data 4 x tensor 2: batches of 1 and 6 rows
    (padded to the 4 batch shards), prompt 20 tokens, 6 new."""
    sets = ("model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64")
    sets += ("model.n_layers=2", "model.vocab_size=512", "mesh.tensor=2")
    argv = ["--experiment", "llama_1b", "--batch", "1,6", "--prompt-len", "20", "--new-tokens", "6"]
    argv += ["--repeats", "1", "--out", str(tmp_path), *(a for s in sets for a in ("--set", s))]
    assert generate_speed.main(argv) == 0
    r = json.loads((tmp_path / "generate-llama_1b-cpu8.json").read_text())
    assert [x["batch"] for x in r["results"]] == [1, 6] and r["mesh"] == {"data": 4, "fsdp": 1, "tensor": 2}
    for x in r["results"]:
        assert x["prefill_s"] > 0 and x["decode_tokens_per_s"] > 0
        assert x["weights_gb_per_s"] == pytest.approx(r["weight_bytes"] / x["ms_per_step"] / 1e6)
