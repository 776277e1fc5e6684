"""Checkpoints and resumption, on 8 emulated devices: a resumed, killed, preempted or
re-meshed run must end exactly where the uninterrupted one does.

The learning rate is constant after warm-up (`optim.min_lr_ratio=1`), so a run's first k steps
do not depend on `train.steps`, and a short run can be compared with a long one step by step.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import metrics_of, tiny_train_argv

from lmjax import checkpoint
from lmjax.train import main

STEPS, EVERY = 24, 4
SETTINGS = (
    "optim.lr=1e-2",
    "optim.warmup_steps=2",
    "optim.min_lr_ratio=1.0",
    "train.log_every=1",
    "train.eval_every=0",
    f"checkpoint.every={EVERY}",
)


def argv(workdir: Path, *sets: str) -> list[str]:
    return tiny_train_argv(workdir, *SETTINGS, *sets)


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_of(workdir) if "loss" in r}


def params_of(workdir: Path) -> list[np.ndarray]:
    params, _ = checkpoint.load_params(workdir, log=lambda m: None)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def assert_bitwise_equal(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def train_subprocess(workdir: Path, *sets: str, devices: int = 8) -> subprocess.Popen:
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}  # cache folders come from conftest
    cmd = [sys.executable, "-m", "lmjax.train", *argv(workdir, *sets)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: STEPS steps on mesh (8, 1, 1), checkpoints every EVERY steps."""
    workdir = tmp_path_factory.mktemp("reference")
    assert main(argv(workdir, f"train.steps={STEPS}")) == 0
    return workdir


def test_checkpoints_kept_and_their_contents(reference):
    ckpts = checkpoint.Checkpoints(reference)
    assert ckpts.steps() == [16, 20, 24]  # checkpoint.keep=3
    saved = ckpts.newest_readable()
    ckpts.close()
    assert saved.step == STEPS and saved.exp.train.steps == STEPS
    assert saved.data["loader"] == {"next_index": STEPS}  # the batch step 25 would take
    assert len(saved.data["corpus"]) == 20  # the token cache entry's key
    for path in (reference / "checkpoints").rglob("*"):  # tensorstore chunks and JSON: no pickle
        if path.is_file():
            assert path.read_bytes()[:2] not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def test_keep_every_keeps_old_checkpoints_too(tmp_path):
    assert (
        main(
            argv(
                tmp_path,
                "train.steps=16",
                "checkpoint.every=2",
                "checkpoint.keep=2",
                "checkpoint.keep_every=8",
            )
        )
        == 0
    )
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [8, 14, 16]


def test_stop_and_resume_equals_the_uninterrupted_run(reference, tmp_path, capsys):
    assert main(argv(tmp_path, "train.steps=10")) == 0
    assert main(argv(tmp_path, f"train.steps={STEPS}")) == 0
    assert f"resuming from step 10 of {STEPS}" in capsys.readouterr().err
    straight, resumed = losses(reference), losses(tmp_path)
    assert set(resumed) == set(straight) - {11}  # the first step of each run holds the compile
    assert all(resumed[s] == straight[s] for s in resumed)  # bitwise: same batches, same state
    assert_bitwise_equal(params_of(tmp_path), params_of(reference))


def test_kill_during_an_async_save_then_resume(reference, tmp_path, capsys):
    """SIGKILL while checkpoint 8 is being written (frozen with SIGSTOP first, to be sure):
    the half-written folder is never taken, and the resumed run still equals the reference."""
    child = train_subprocess(tmp_path, "train.steps=400")
    folder, seen = tmp_path / "checkpoints", None
    deadline = time.time() + 120
    while seen is None and time.time() < deadline and child.poll() is None:
        writing = [p for p in folder.glob("*.orbax-checkpoint-tmp*")] if folder.exists() else []
        if writing and int(writing[0].name.split(".")[0]) >= 2 * EVERY:
            child.send_signal(signal.SIGSTOP)
            if writing[0].exists():  # still being written, now frozen
                seen = writing[0]
            else:
                child.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    child.kill()
    child.communicate()
    assert seen is not None and seen.exists(), "never caught a save in flight"
    killed_at = int(seen.name.split(".")[0])

    capsys.readouterr()
    assert main(argv(tmp_path, f"train.steps={STEPS}")) == 0
    assert not seen.exists()  # the next run cleared the leftovers
    resumed_from = int(capsys.readouterr().err.split("resuming from step ")[1].split()[0])
    assert resumed_from < killed_at  # the previous complete checkpoint
    steps = [r["step"] for r in metrics_of(tmp_path) if "loss" in r]
    assert steps == sorted(set(steps))  # one history: the redone steps' first lines moved aside
    discarded = [
        json.loads(x)["step"] for x in (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    ]
    assert discarded and min(discarded) == resumed_from + 1
    assert_bitwise_equal(params_of(tmp_path), params_of(reference))


def test_sigterm_saves_exits_0_and_resumes(reference, tmp_path, capsys):
    child = train_subprocess(tmp_path, "train.steps=400")
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:  # step 3 was logged
            child.send_signal(signal.SIGSTOP)  # so that it stops within a step or two of here
            child.send_signal(signal.SIGTERM)
            child.send_signal(signal.SIGCONT)
            break
        time.sleep(0.005)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 1, err
    at = int(stopped[0].split()[5])
    assert 3 <= at < STEPS and (tmp_path / "checkpoints" / str(at)).is_dir()

    capsys.readouterr()
    assert main(argv(tmp_path, f"train.steps={STEPS}")) == 0
    assert f"resuming from step {at} of {STEPS}" in capsys.readouterr().err
    assert_bitwise_equal(params_of(tmp_path), params_of(reference))


def test_a_second_signal_exits_at_once():
    script = (
        "import os, signal, time\n"
        "from lmjax.stop_signals import StopRequests\n"
        "with StopRequests() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert stop.requested == 'SIGINT'\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "second signal (SIGTERM)" in done.stderr and "not reached" not in done.stdout


def test_restore_on_another_mesh_and_train_on(reference, tmp_path, capsys):
    from lmjax import config, sharding

    saved = params_of(reference)
    exp = checkpoint.Checkpoints(reference).newest_readable().exp
    exp = config.apply_overrides(exp, ["mesh.data=2", "mesh.tensor=4"])
    mesh = sharding.make_mesh(exp)
    with sharding.use(mesh, exp.mesh.rules):
        params, _ = checkpoint.load_params(reference, mesh, log=lambda m: None)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))  # really sharded
    assert_bitwise_equal([np.asarray(x) for x in jax.tree.leaves(params)], saved)

    run = copy_run(reference, tmp_path / "tensor")
    assert main(argv(run, "mesh.data=2", "mesh.tensor=4", f"train.steps={STEPS + 4}")) == 0
    assert f"resuming from step {STEPS}" in capsys.readouterr().err
    assert max(losses(run)) == STEPS + 4

    one = copy_run(reference, tmp_path / "one")
    child = train_subprocess(one, "mesh.data=1", f"train.steps={STEPS + 2}", devices=1)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    assert f"resuming from step {STEPS}" in err and "on 1 cpu devices" in err
    assert max(losses(one)) == STEPS + 2


# Orbax leaves the reads of a truncated file un-awaited when it gives up on them.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(reference, tmp_path, capsys):
    truncated = copy_run(reference, tmp_path / "truncated")
    biggest = max(
        (truncated / "checkpoints/24/params").rglob("*"), key=lambda p: p.is_file() and p.stat().st_size
    )
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    assert main(argv(truncated, f"train.steps={STEPS + 2}")) == 0
    err = capsys.readouterr().err
    assert "checkpoints/24 is damaged" in err and "resuming from step 20" in err
    assert (truncated / "checkpoints/24.damaged").is_dir()  # set aside, not deleted
    assert checkpoint.Checkpoints(truncated).steps()[-2:] == [24, 26]

    empty = copy_run(reference, tmp_path / "empty")
    (empty / "checkpoints/28").mkdir()  # e.g. a copy that stopped early
    assert main(argv(empty, "train.steps=28")) == 0
    assert "resuming from step 24" in capsys.readouterr().err

    none = copy_run(reference, tmp_path / "none")
    for step_folder in (none / "checkpoints").iterdir():
        shutil.rmtree(step_folder)
        step_folder.mkdir()
    assert main(argv(none, f"train.steps={STEPS}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmjax: error: no usable checkpoint in") and len(err) == 4


def test_a_non_finite_loss_stops_before_its_checkpoint(tmp_path, capsys):
    # Step 8 is a checkpoint step: its NaN must be seen before that checkpoint is written.
    assert main(argv(tmp_path, f"train.steps={STEPS}", "train.nan_at_step=8")) == 3
    err = capsys.readouterr().err
    assert "gradient norm nan at step 8; stopped without saving it" in err
    assert "the newest checkpoint, step 4, is the last good state" in err
    assert checkpoint.Checkpoints(tmp_path).steps() == [4]
    assert max(losses(tmp_path)) == 7

    assert main(argv(tmp_path, "train.steps=12")) == 0  # without the poison, it trains on
    assert "resuming from step 4" in capsys.readouterr().err


def test_load_params_reads_no_optimizer_state(reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    shutil.rmtree(run / "checkpoints/24/train_state")
    params, exp = checkpoint.load_params(run, log=lambda m: None)
    assert exp.train.steps == STEPS and exp.model.vocab_size == 512
    assert_bitwise_equal([np.asarray(x) for x in jax.tree.leaves(params)], params_of(reference))


def test_warm_start_takes_parameters_and_tokenizer(reference, tmp_path, capsys):
    # lr 1e-30: the one step changes nothing, so the parameters are exactly the warm start's.
    warm = tmp_path / "warm"
    assert main(argv(warm, "train.steps=1", f"checkpoint.init_from={reference}", "optim.lr=1e-30")) == 0
    assert f"warm start from {reference}" in capsys.readouterr().err
    assert_bitwise_equal(params_of(warm), params_of(reference))
    ckpts = checkpoint.Checkpoints(warm)
    saved = ckpts.newest_readable()
    assert saved.step == 1 and saved.exp.data.tokenizer_path == str(reference / "tokenizer.model")

    assert main(argv(tmp_path / "wide", f"checkpoint.init_from={reference}", "model.d_model=64")) == 2
    assert "parameter" in capsys.readouterr().err
    assert main(argv(tmp_path / "none", f"checkpoint.init_from={tmp_path / 'warm-missing'}")) == 2
    assert "has no tokenizer.model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model.d_model=64", "model.d_model=64 but the checkpoint at step 24 was trained with 32"),
        ("train.seed=1", "train.seed=1 but the checkpoint"),
        ("train.batch_size=16", "train.batch_size=16 but the checkpoint"),
        ("data.vocab_size=300", "data.vocab_size=300 but the checkpoint"),
        ("train.steps=10", "train.steps=10 is below step 24"),
        ("optim.clip_norm=0", "change the optimizer state"),
    ],
)
def test_a_resume_that_would_change_the_run_exits_2(reference, change, message, capsys):
    before = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert main(argv(reference, f"train.steps={STEPS}", change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == before


def test_a_run_at_its_last_step_has_nothing_to_do(reference, capsys):
    assert main(argv(reference, f"train.steps={STEPS}")) == 0
    assert f"already reached train.steps={STEPS}" in capsys.readouterr().err


def test_changed_corpus_files_stop_a_resume(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 30)
    sets = (
        "data.source=files",
        f"data.path={corpus}",
        "data.vocab_size=300",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert main(argv(tmp_path / "run", "train.steps=2", *sets)) == 0
    (corpus / "0.py").write_text("changed = True\n" * 30)
    assert main(argv(tmp_path / "run", "train.steps=4", *sets)) == 2
    assert (
        "the corpus differs from the one the checkpoint at step 2 was trained on" in capsys.readouterr().err
    )
