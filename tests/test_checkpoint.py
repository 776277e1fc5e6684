"""Checkpoints and resumption, on 8 emulated devices: a resumed, killed, preempted or
re-meshed run must end exactly where the uninterrupted one does.

Most runs here keep the learning rate constant after warm-up (`optim.min_lr_ratio=1`), so a
run's first k steps do not depend on `train.steps`, and a short run can be compared with a long
one step by step; `test_sigterm_in_process_under_the_cosine_schedule` covers the default
schedule.
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

from lmjax import checkpoint, config, sharding, step
from lmjax.data import loader
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


def stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def signal_when_logged(child: subprocess.Popen, metrics: Path, *signals: signal.Signals) -> None:
    """Once step 3 is logged, send `signals` to the frozen child: they land within a step."""
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            child.send_signal(signal.SIGSTOP)
            for s in signals:
                child.send_signal(s)
            child.send_signal(signal.SIGCONT)
            return
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: STEPS steps on mesh (8, 1, 1), checkpoints every EVERY steps."""
    workdir = tmp_path_factory.mktemp("reference")
    assert main(argv(workdir, f"train.steps={STEPS}")) == 0
    return workdir


@pytest.fixture(scope="module")
def finished(reference, tmp_path_factory) -> Path:
    """A copy of the reference for the resumes that must be refused (the reference stays as
    it is even if one is wrongly accepted)."""
    return copy_run(reference, tmp_path_factory.mktemp("finished") / "run")


def test_checkpoints_kept_and_what_they_hold(reference):
    ckpts = checkpoint.Checkpoints(reference)
    assert ckpts.steps() == [16, 20, 24]  # checkpoint.keep=3
    saved = ckpts.newest_readable()
    ckpts.close()
    assert saved.step == STEPS and saved.exp.train.steps == STEPS
    assert saved.data["loader"] == {"next_index": STEPS}  # the batch step 25 would take
    assert len(saved.data["corpus"]) == 20 and len(saved.data["identity"]) == 20
    # Nothing that runs code on load: every file is JSON, a commit marker, or tensorstore's
    # OCDBT array storage (a manifest, and data files under d/).
    for path in (reference / "checkpoints").rglob("*"):
        if not path.is_file() or path.name == "commit_success.txt":
            continue
        if path.name == "manifest.ocdbt" or path.parent.name == "d":
            assert not path.read_bytes().startswith(b"\x80")  # no pickle protocol header either
        else:
            json.loads(path.read_text())


def test_keep_every_keeps_old_checkpoints_too(tmp_path):
    sets = ("train.steps=16", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.keep_every=8")
    assert main(argv(tmp_path, *sets)) == 0
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [8, 14, 16]


def test_stop_and_resume_equals_the_uninterrupted_run(reference, tmp_path, capsys):
    assert main(argv(tmp_path, "train.steps=10")) == 0
    assert main(argv(tmp_path, f"train.steps={STEPS}")) == 0
    assert f"resuming from step 10 of {STEPS}" in capsys.readouterr().err
    straight, resumed = losses(reference), losses(tmp_path)
    assert list(resumed) == list(straight) == list(range(1, STEPS + 1))
    assert resumed == straight  # bitwise, every step: the same batches and the same state
    assert_bitwise_equal(params_of(tmp_path), params_of(reference))


def test_kill_during_an_async_save_then_resume(reference, tmp_path, capsys):
    """SIGKILL while a checkpoint after the first is being written (frozen with SIGSTOP first,
    to be sure): the half-written folder is never taken, and the resumed run still equals the
    reference."""
    child = train_subprocess(tmp_path, f"train.steps={STEPS}")
    folder, seen = tmp_path / "checkpoints", None
    deadline = time.time() + 120
    while seen is None and time.time() < deadline and child.poll() is None:
        writing = list(folder.glob("*.orbax-checkpoint-tmp*")) if folder.exists() else []
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
    assert resumed_from == killed_at - EVERY  # the previous checkpoint, complete
    assert_bitwise_equal(params_of(tmp_path), params_of(reference))
    # metrics.jsonl is one history: lines of the redone steps were moved aside, not repeated.
    assert list(losses(tmp_path)) == list(range(1, STEPS + 1))
    discarded = [
        json.loads(x)["step"] for x in (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    ]
    assert discarded and min(discarded) == resumed_from + 1


def test_sigterm_saves_exits_0_and_resumes(reference, tmp_path, capsys):
    child = train_subprocess(tmp_path, "train.steps=400")
    signal_when_logged(child, tmp_path / "metrics.jsonl", signal.SIGTERM)
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


@pytest.mark.parametrize("at", [1, 10])  # the step that compiles, and one whose metrics are read late
def test_sigterm_in_process_under_the_cosine_schedule(tmp_path, capsys, monkeypatch, at):
    cosine = ("optim.min_lr_ratio=0.1", f"train.steps={STEPS}")
    straight = tmp_path / "straight"
    assert main(argv(straight, *cosine)) == 0

    calls = {"n": 0}
    real_device_get = jax.device_get

    def device_get(x):  # the loop reads each step's metrics once, in order
        if isinstance(x, dict) and "loss" in x:
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGTERM)  # lands while step `at` is being read
        return real_device_get(x)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(jax, "device_get", device_get)
    assert main(argv(interrupted, *cosine)) == 0
    monkeypatch.undo()
    err = capsys.readouterr().err
    stopped = int(err.split("stopped by SIGTERM at step ")[1].split()[0])
    # Step 1 is read at once (it compiled), so a signal then stops at step 1; step 10 is read
    # one step late, while step 11 is in flight, which finishes: the stop is at step 11.
    assert stopped == {1: 1, 10: 11}[at]
    assert checkpoint.Checkpoints(interrupted).steps()[-1] == stopped

    assert main(argv(interrupted, *cosine)) == 0
    assert losses(interrupted) == losses(straight)
    assert_bitwise_equal(params_of(interrupted), params_of(straight))


@pytest.mark.parametrize(
    ("second", "status", "stdout"),
    [("SIGTERM", 128 + signal.SIGTERM, ""), ("SIGINT", 0, "KeyboardInterrupt True\nafter True\n")],
)
def test_a_second_signal_stops_at_once(second, status, stdout):
    """A second SIGTERM ends the process; a second SIGINT raises KeyboardInterrupt (a notebook's
    kernel survives it) and the handlers are put back."""
    script = (
        "import os, signal, time\n"
        "from lmjax.stop_signals import StopRequests\n"
        # Python's own handler, whatever this process inherited: a background job starts with
        # SIGINT ignored, and StopRequests puts back what it found.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "try:\n"
        "    with StopRequests() as stop:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        assert stop.requested == 'SIGINT'\n"
        f"        os.kill(os.getpid(), signal.{second})\n"
        "        time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('KeyboardInterrupt', stop.interrupted)\n"
        "print('after', signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert f"second signal ({second})" in done.stderr and done.stdout == stdout


def test_a_second_signal_ends_a_process_blocked_on_the_device():
    """Python runs signal handlers only between bytecodes; a main thread blocked in a long
    device computation still ends on the second signal, within the grace period."""
    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from lmjax.stop_signals import StopRequests\n"
        "spin = jax.jit(lambda x: jax.lax.while_loop(lambda v: v >= 0, lambda v: v * 0.5 + 1, x))\n"
        "with StopRequests():\n"
        "    print('blocked', flush=True)\n"
        "    spin(jnp.float32(0)).block_until_ready()  # never returns\n"
        "print('finished')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline() == "blocked\n"
        time.sleep(0.5)  # inside the computation
        child.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        sent = time.time()
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert time.time() - sent < 15 and "second signal (SIGTERM) while blocked" in err


def test_restore_on_another_mesh_and_train_on(reference, tmp_path, capsys):
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


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(reference, tmp_path, capsys):
    truncated = copy_run(reference, tmp_path / "truncated")
    # Every data file cut in half: cutting only the biggest once left a restorable checkpoint
    # (1 run in ~10 of the suite; OCDBT's layout differs between saves).
    for data_file in [p for p in (truncated / "checkpoints/24/params").rglob("*") if p.parent.name == "d"]:
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
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
    last = stderr_lines(capsys)[-1]
    assert last.startswith("lmjax: error: no usable checkpoint in") and "step 16:" in last


def test_a_restore_that_fails_for_another_reason_renames_nothing(reference, tmp_path):
    """Not every failure is damage: a target that does not fit (here a wider model; in life,
    memory) stops with the cause, and no good checkpoint is set aside."""
    run = copy_run(reference, tmp_path / "run")
    exp = config.apply_overrides(checkpoint.Checkpoints(run).newest_readable().exp, ["model.d_model=64"])
    mesh = sharding.make_mesh(exp)
    ckpts = checkpoint.Checkpoints(run, log=lambda m: None)
    with sharding.use(mesh, exp.mesh.rules), pytest.raises(config.UserError, match="its files look intact"):
        ckpts.restore_newest(lambda saved: step.abstract_state(exp, _adamw(exp), mesh)[1])
    assert ckpts.steps() == [16, 20, 24] and not list((run / "checkpoints").glob("*.damaged"))


def _adamw(exp):
    from lmjax import optim

    return optim.make(exp.optim, exp.train.steps)


def poison_step(monkeypatch, nan_at: int) -> None:
    """The batch of step `nan_at` (of a fresh run) gets a NaN loss mask: that step's loss and
    gradient are non-finite, as a diverging run's would be."""
    next_batch, taken = loader.TrainBatches.__next__, [0]

    def poisoned(self):
        batch = next_batch(self)
        taken[0] += 1
        if taken[0] == nan_at:
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        return batch

    monkeypatch.setattr(loader.TrainBatches, "__next__", poisoned)


@pytest.mark.parametrize("nan_at", [7, 8])  # read one step late; read at once before a save
def test_a_non_finite_gradient_stops_before_its_checkpoint(tmp_path, capsys, monkeypatch, nan_at):
    poison_step(monkeypatch, nan_at)
    assert main(argv(tmp_path, f"train.steps={STEPS}")) == 3
    err = capsys.readouterr().err
    assert f"step {nan_at}: loss nan, gradient norm nan; stopped without saving it" in err
    assert "the newest checkpoint, step 4, is the last good state" in err
    assert checkpoint.Checkpoints(tmp_path).steps() == [4]  # not 8, which step 8 reached
    assert max(losses(tmp_path)) == nan_at - 1

    monkeypatch.undo()
    assert main(argv(tmp_path, "train.steps=12")) == 0  # without the poison, it trains on
    assert "resuming from step 4" in capsys.readouterr().err


def test_load_params_reads_no_optimizer_state_and_touches_nothing(reference, tmp_path):
    run = copy_run(reference, tmp_path / "run")
    shutil.rmtree(run / "checkpoints/24/train_state")
    in_flight = run / "checkpoints/28.orbax-checkpoint-tmp-1"  # as if that run were saving now
    in_flight.mkdir()
    params, exp = checkpoint.load_params(run, log=lambda m: None)
    assert exp.train.steps == STEPS and exp.model.vocab_size == 512
    assert_bitwise_equal([np.asarray(x) for x in jax.tree.leaves(params)], params_of(reference))
    assert in_flight.is_dir()


def test_warm_start_takes_parameters_and_tokenizer(reference, tmp_path, capsys):
    source = copy_run(reference, tmp_path / "source")
    # lr 1e-30: the one step changes nothing, so the parameters are exactly the warm start's.
    warm = tmp_path / "warm"
    assert main(argv(warm, "train.steps=1", f"checkpoint.init_from={source}", "optim.lr=1e-30")) == 0
    assert f"warm start from {source}" in capsys.readouterr().err
    assert_bitwise_equal(params_of(warm), params_of(reference))
    saved = checkpoint.Checkpoints(warm).newest_readable()
    assert saved.step == 1 and saved.exp.data.tokenizer_path == str(warm / "tokenizer.model")

    shutil.rmtree(source)  # the warm-started run no longer needs it
    assert main(argv(warm, "train.steps=3", f"checkpoint.init_from={source}", "optim.lr=1e-30")) == 0
    assert "resuming from step 1 of 3" in capsys.readouterr().err

    assert main(argv(tmp_path / "wide", f"checkpoint.init_from={reference}", "model.d_model=64")) == 2
    assert "has shape" in capsys.readouterr().err
    assert main(argv(tmp_path / "none", f"checkpoint.init_from={tmp_path / 'missing'}")) == 2
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
        ("optim.name=muon", "change the optimizer state"),
        ("model.qk_norm=true", "model.qk_norm=True but the checkpoint"),
    ],
)
def test_a_resume_that_would_change_the_run_exits_2(finished, change, message, capsys):
    before = sorted(p.name for p in (finished / "checkpoints").iterdir())
    assert main(argv(finished, f"train.steps={STEPS}", change)) == 2
    err = stderr_lines(capsys)
    assert err[-1].startswith("lmjax: error: ") and message in err[-1]
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == before


def test_a_run_at_its_last_step_has_nothing_to_do(finished, capsys):
    assert main(argv(finished, f"train.steps={STEPS}")) == 0
    assert f"already reached train.steps={STEPS}" in capsys.readouterr().err


def test_a_workdir_without_checkpoint_keeps_its_model(tmp_path, capsys, monkeypatch):
    poison_step(monkeypatch, 1)
    assert main(argv(tmp_path, "train.steps=2", "checkpoint.every=0")) == 3
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "config.json").exists()
    capsys.readouterr()
    assert main(argv(tmp_path, "train.steps=2", "model.d_model=64")) == 2
    assert (
        "model.d_model=64 but the run already in this workdir was trained with 32" in capsys.readouterr().err
    )
    assert main(argv(tmp_path, "train.steps=2")) == 0  # the same run starts over


def test_moved_corpus_files_resume_and_changed_ones_stop(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 30)
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    sets = ("data.source=files", f"data.path={corpus}", "data.vocab_size=300", cache)
    assert main(argv(tmp_path / "run", "train.steps=2", *sets)) == 0

    for path in corpus.iterdir():  # copied to another machine: new times, same text
        os.utime(path, (1e9, 1e9))
    capsys.readouterr()
    assert main(argv(tmp_path / "run", "train.steps=3", *sets)) == 0
    assert "the corpus files moved or were touched since the checkpoint at step 2" in capsys.readouterr().err

    (corpus / "0.py").write_text("changed = True\n" * 30)
    assert main(argv(tmp_path / "run", "train.steps=4", *sets)) == 2
    assert "the corpus tokenizes differently from the one the checkpoint at step 3" in capsys.readouterr().err
