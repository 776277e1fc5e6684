"""Faults a hostile cluster and a careless user bring, replayed: nothing bad is saved as good,
one trainer per run, and every failure is one line with a status (2 for what a user can fix),
never a traceback, a hang or lost data. The slow cases (disk full on a small file system, a
killed peer) are benchmarks/fault_drill.py's."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import metrics_of, tiny_train_argv
from test_checkpoint import params_of, signal_when_logged, train_subprocess

from lmjax import checkpoint, evaluate, generate, optim, run_lock, sharding, step, storage
from lmjax.data import loader
from lmjax.train import main

FAST = ("optim.lr=1e-2", "optim.warmup_steps=2", "train.log_every=1", "train.eval_every=0")


def argv(workdir: Path | str, *sets: str) -> list[str]:
    return tiny_train_argv(workdir, *FAST, *sets)


def last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# --- nothing bad is saved as good -------------------------------------------------------------


def test_an_exploding_update_is_not_checkpointed_and_a_lower_lr_trains_on(tmp_path, capsys):
    exploding = ("optim.lr=1e9", "optim.warmup_steps=0", "checkpoint.every=1", "train.steps=4")
    assert main(tiny_train_argv(tmp_path, *exploding)) == 3
    line = last_line(capsys)
    assert line.startswith("lmjax: error: step 1: ") and "no checkpoint was saved" in line
    assert checkpoint.Checkpoints(tmp_path).steps() == []
    # The advice works: a lower learning rate starts over and trains.
    assert main(tiny_train_argv(tmp_path, "optim.lr=1e-2", "checkpoint.every=1", "train.steps=4")) == 0


def test_a_checkpoint_of_non_finite_parameters_is_passed_over(tmp_path, capsys):
    """A newer checkpoint whose parameters read back as NaN (as a corrupted weight file can):
    generation and evaluation take the one before it; training sets it aside and resumes there."""
    run = tmp_path / "run"
    assert main(argv(run, "train.steps=4", "checkpoint.every=2")) == 0
    good = params_of(run)
    exp = checkpoint.newest_saved(run).exp
    mesh = sharding.make_mesh(exp)
    ckpts = checkpoint.Checkpoints(run, exp.checkpoint, log=lambda m: None)
    with sharding.use(mesh, exp.mesh.rules):
        saved, state = ckpts.restore_newest(
            lambda _: step.abstract_state(exp, optim.make(exp.optim, 4), mesh)[1]
        )
        state["params"] = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state["params"])
        state["step"] = state["step"] + 2
        ckpts.save(state, saved.data, dataclasses.replace(exp, train=dataclasses.replace(exp.train, steps=6)))
        ckpts.wait()
    ckpts.close()
    assert checkpoint.Checkpoints(run).steps() == [2, 4, 6]

    capsys.readouterr()
    assert generate.sample(run, ["def "], max_tokens=4, temperature=0.0)
    assert evaluate.evaluate(run)["step"] == 4
    assert f"checkpoint {run / 'checkpoints' / '6'} is damaged (NonFinite" in capsys.readouterr().err
    assert main(argv(run, "train.steps=6", "checkpoint.every=2")) == 0
    err = capsys.readouterr().err
    assert "resuming from step 4 of 6" in err and "moved the damaged checkpoint" in err
    assert all(np.isfinite(x).all() for x in params_of(run)) and len(good) == len(params_of(run))


# --- one trainer per run ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_second_trainer_exits_2_naming_the_first(where, tmp_path, request, capsys):
    workdir = str(tmp_path / "run") if where == "local" else request.getfixturevalue("bucket") + "/run"
    held = run_lock.acquire(workdir)  # as a trainer running there holds it
    try:
        assert main(argv(workdir, "train.steps=2")) == 2
        line = last_line(capsys)
        assert f"another lmjax.train is running in {workdir}: pid {os.getpid()} on " in line
    finally:
        held.release()
    assert main(argv(workdir, "train.steps=2")) == 0  # released: the next one runs


def test_the_lock_of_a_killed_trainer_is_taken_over(tmp_path):
    """A process that took the lock and was killed (-9): the kernel dropped its flock."""
    code = (
        f"from lmjax import run_lock; run_lock.acquire({str(tmp_path)!r}); print('held', flush=True); input()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "held"
    child.kill()
    child.wait()
    assert "pid" in (tmp_path / run_lock.NAME).read_text()  # its record stays; the lock does not
    run_lock.acquire(tmp_path).release()


def test_a_stale_lock_on_a_bucket_is_taken_over_and_a_fresh_one_is_not(bucket):
    lock = storage.path(f"{bucket}/run/{run_lock.NAME}")
    holder = {"host": "gone", "pid": 1, "started": "then"}
    lock.write_text(json.dumps({**holder, "heartbeat": time.time() - run_lock.STALE_S - 1}))
    run_lock.acquire(f"{bucket}/run").release()  # taken over
    lock.write_text(json.dumps({**holder, "heartbeat": time.time()}))
    with pytest.raises(Exception, match="pid 1 on gone, started then"):
        run_lock.acquire(f"{bucket}/run")


# --- every failure one line -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A file system of a given size in KiB (tmpfs; mounting needs root, which CI has)."""
    mounted = []

    def make(kib: int) -> Path:
        folder = tmp_path / f"disk{kib}k"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small file system here: {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        assert subprocess.run(["umount", str(folder)]).returncode == 0, "a file is left open there"


@pytest.mark.parametrize(("kib", "what"), [(8, "start"), (160, "save")])
def test_a_full_disk_is_one_line_exit_2_and_leaves_no_temporary_file(small_disk, kib, what, capsys):
    """8 KiB: full when the run writes its tokenizer at the start; 160 KiB: full at a save."""
    disk = small_disk(kib)
    assert main(argv(disk / "run", "train.steps=4", "checkpoint.every=2")) == 2
    line = last_line(capsys)
    assert line.startswith("lmjax: error: ") and "No space left on device" in line, line
    if what == "save":
        assert "was not saved" in line
    assert not [p for p in disk.rglob("*.tmp")]


def test_an_evaluation_that_cannot_be_written_still_gives_its_numbers(small_disk, capsys):
    disk = small_disk(1024)
    assert main(argv(disk / "run", "train.steps=2")) == 0
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # the rest of the disk, taken
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(disk / "run")]) == 2
    line = last_line(capsys)
    assert f"{disk / 'run' / 'eval.json'} was not written (No space left on device)" in line
    assert '"step": 2' in line and '"loss": ' in line and '"bits_per_byte": ' in line
    filler.unlink()


def test_a_write_that_fails_leaves_no_temporary_file(small_disk):
    disk = small_disk(64)
    with pytest.raises(OSError, match="No space left on device"):
        storage.write_atomic(disk / "config.json", b"x" * 200_000)
    assert list(disk.iterdir()) == []


def test_an_empty_workdir_is_refused(capsys):
    assert main(argv("", "train.steps=2")) == 2
    assert last_line(capsys) == "lmjax: error: --workdir is empty; name the run's folder or bucket"


def test_a_huge_vocabulary_is_refused_before_any_work(tmp_path, capsys):
    assert main(argv(tmp_path, "model.vocab_size=100000000000")) == 2
    assert "model.vocab_size=100000000000 must be in [0, 4194304]" in last_line(capsys)


def test_a_missing_warm_start_exits_2_with_one_line_and_no_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "lmjax.train",
        *argv(tmp_path / "run", f"checkpoint.init_from={tmp_path}/none"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("lmjax: error: checkpoint.init_from=") and "Traceback" not in done.stderr


def test_prompt_bytes_that_are_not_utf8_are_replaced(short_run, capsys):
    assert generate.main(["--workdir", str(short_run), "--prompt", "def \udcff", "--max-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("def \ufffd")


# --- nothing lost ---------------------------------------------------------------------------


def test_a_kill_before_the_final_evaluation_is_made_good_by_the_next_run(tmp_path, capsys):
    assert main(argv(tmp_path, "train.steps=4")) == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    final = json.loads(lines[-1])
    assert "eval_loss" in final
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # killed before it was logged
    capsys.readouterr()
    assert main(argv(tmp_path, "train.steps=4")) == 0
    assert "already reached" not in capsys.readouterr().err
    again = metrics_of(tmp_path)[-1]
    assert again == final  # the same checkpoint, the same batches: the same numbers
    assert main(argv(tmp_path, "train.steps=4")) == 0
    assert "already reached" in capsys.readouterr().err


def test_a_relative_data_path_resumes_from_another_directory(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 30)
    data = ("data.source=files", "data.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}")
    monkeypatch.chdir(tmp_path)
    assert main(argv(tmp_path / "run", "train.steps=2", "data.path=corpus", *data)) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["path"]
    assert saved == str(corpus)  # the saved config names the files wherever it is read from
    monkeypatch.chdir(tmp_path / "run")
    capsys.readouterr()
    assert main(argv(tmp_path / "run", "train.steps=3", f"data.path={corpus}", *data)) == 0
    assert "resuming from step 2 of 3" in capsys.readouterr().err


def test_sighup_stops_with_a_checkpoint_like_sigterm(tmp_path):
    child = train_subprocess(tmp_path, "train.steps=400", "train.log_every=1", "checkpoint.every=100")
    signal_when_logged(child, tmp_path / "metrics.jsonl", signal.SIGHUP)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGHUP at step")]
    assert len(stopped) == 1 and (tmp_path / "checkpoints" / stopped[0].split()[5]).is_dir()


def test_evaluation_window_ids_are_made_without_walking_them(stdlib_corpus):
    """The validation windows of EvalBatches, made with numpy, are those of the grain datasets
    the training batches draw from, in the same order."""
    splits = stdlib_corpus.splits("validation")
    walked = np.concatenate([np.asarray(list(ds)) for ds in loader._window_ids(splits, 32, "validation")])
    every = loader.EvalBatches(splits, [1.0], 32, 8, n_batches=0)
    assert np.array_equal(every._window_ids[: every.windows], walked)
    some = loader.EvalBatches(splits, [1.0], 32, 8, n_batches=3)
    assert np.array_equal(some._window_ids, walked[:24])


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ("..stdlib_tiny", "no experiment named '..stdlib_tiny'"),
        ("raises.py", "raises.py:2: RuntimeError: a bug in the experiment"),
        ("syntax.py", "syntax.py:1: SyntaxError"),
    ],
)
def test_a_broken_experiment_is_one_line_naming_where(experiment, message, tmp_path, capsys):
    (tmp_path / "raises.py").write_text("import math\nraise RuntimeError('a bug in the experiment')\n")
    (tmp_path / "syntax.py").write_text("def config(:\n")
    name = experiment if experiment.startswith(".") else str(tmp_path / experiment)
    assert main(["--experiment", name, "--workdir", str(tmp_path / "run")]) == 2
    line = last_line(capsys)
    assert line.startswith("lmjax: error: ") and message in line


def _read_lock(lock_file: storage.Path) -> dict:
    """The lock object's holder. The test server rewrites an object in place (GCS swaps it whole),
    so a read during a heartbeat may see part of it: read again."""
    for _ in range(50):
        try:
            return json.loads(lock_file.read_text())
        except json.JSONDecodeError:
            time.sleep(0.02)
    raise AssertionError(f"{lock_file} never read back whole")


def test_a_bucket_lock_refreshes_its_heartbeat_and_keeps_its_start_time(bucket, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.2)
    lock_file = storage.path(f"{bucket}/run/{run_lock.NAME}")
    held = run_lock.acquire(f"{bucket}/run")
    try:
        first = _read_lock(lock_file)
        deadline = time.time() + 30
        # beats until more than a second has passed: a start time is written to the second
        while (now := _read_lock(lock_file))["heartbeat"] < first["heartbeat"] + 1.5:
            assert time.time() < deadline, "the heartbeat never came"
            time.sleep(0.1)
        assert now["heartbeat"] > first["heartbeat"] and now["started"] == first["started"]
        assert now["pid"] == os.getpid()
    finally:
        held.release()
    assert not lock_file.exists()
