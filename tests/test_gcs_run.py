"""Runs on a bucket, against a real GCS server (fake-gcs-server, tests/gcs.py): a workdir on
gs:// trains, resumes after SIGTERM and after a kill in the middle of a save, and reads back
in generation, evaluation and export exactly as a local workdir does; a bucket that refuses
writes stops a run before its first step, and a checkpoint that cannot be written is an
error (exit 2), never a warning with exit 0."""

import json
import signal
import time
from pathlib import Path

import pytest
import test_multihost as multihost
from conftest import tiny_train_argv
from etils import epath
from test_checkpoint import EVERY, SETTINGS, STEPS, assert_bitwise_equal, params_of, train_subprocess
from test_multihost import assert_close, train_cmd, two_processes

from lmjax import evaluate, generate, storage
from lmjax.hf import export
from lmjax.train import main


def argv(workdir: str | Path, *sets: str) -> list[str]:
    return tiny_train_argv(workdir, *SETTINGS, *sets)


def losses(workdir: str | Path) -> dict[int, float]:
    lines = storage.path(workdir).joinpath("metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def prefix(url: str) -> str:
    return url.removeprefix("gs://lmjax-test/")


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """The uninterrupted run in a local folder."""
    workdir = tmp_path_factory.mktemp("local")
    assert main(argv(workdir, f"train.steps={STEPS}")) == 0
    return workdir


@pytest.fixture(scope="module")
def on_bucket(gcs_server, tmp_path_factory, local) -> str:
    """The same run with its workdir on the bucket, started from an empty folder so that no
    local path can stand in for the bucket."""
    import os

    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    try:
        workdir = "gs://lmjax-test/on_bucket/run"
        assert main(argv(workdir, f"train.steps={STEPS}")) == 0
        assert os.listdir(".") == []  # nothing local named "gs:"
    finally:
        os.chdir(here)
    return workdir


def test_a_run_on_a_bucket_equals_the_local_run(on_bucket, local, gcs_server):
    names = gcs_server.names(prefix(on_bucket))
    assert {"config.json", "tokenizer.model", "metrics.jsonl"} <= {n.split("/")[-1] for n in names}
    assert {f"{prefix(on_bucket)}/checkpoints/{s}/commit_success.txt" for s in (16, 20, 24)} <= set(names)
    assert losses(on_bucket) == losses(local)  # bitwise, every step
    assert_bitwise_equal(params_of(on_bucket), params_of(local))
    assert epath.Path(on_bucket, "tokenizer.model").read_bytes() == (local / "tokenizer.model").read_bytes()


def test_generate_evaluate_and_export_read_a_run_on_a_bucket(on_bucket, local, tmp_path):
    prompt = dict(prompts=["def "], max_tokens=12, temperature=0.0)
    assert generate.sample(on_bucket, **prompt) == generate.sample(local, **prompt)
    assert evaluate.evaluate(on_bucket)["loss"] == evaluate.evaluate(local)["loss"]
    assert json.loads(epath.Path(on_bucket, "eval.json").read_text())["step"] == STEPS
    assert export.main(["--workdir", on_bucket, "--to", "hf", str(tmp_path / "from_bucket")]) == 0
    assert export.main(["--workdir", str(local), "--to", "hf", str(tmp_path / "from_local")]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "from_bucket" / name).read_bytes() == (tmp_path / "from_local" / name).read_bytes()


def test_sigterm_then_resume_on_a_bucket_equals_the_uninterrupted_local_run(
    gcs_server, local, bucket, capsys
):
    workdir = f"{bucket}/run"
    child = train_subprocess(workdir, "train.steps=400")
    marker = f"{prefix(workdir)}/checkpoints/{EVERY}/commit_success.txt"
    deadline = time.time() + 120
    while child.poll() is None and time.time() < deadline:
        if marker in gcs_server.names(prefix(workdir)):
            child.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    stopped = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 1, err
    at = int(stopped[0].split()[5])
    assert EVERY <= at < STEPS
    assert f"{prefix(workdir)}/checkpoints/{at}/commit_success.txt" in gcs_server.names(prefix(workdir))
    assert set(losses(workdir)) == set(range(1, at + 1))  # uploaded at the stop's checkpoint

    capsys.readouterr()
    assert main(argv(workdir, f"train.steps={STEPS}")) == 0
    assert f"resuming from step {at} of {STEPS}" in capsys.readouterr().err
    assert losses(workdir) == losses(local)
    assert_bitwise_equal(params_of(workdir), params_of(local))


def test_kill_during_a_save_on_a_bucket_then_resume(gcs_server, local, bucket, capsys):
    """SIGKILL while a checkpoint's objects are being written (Orbax writes `<step>/` in place
    on a bucket and `commit_success.txt` last): that step is never taken, the one before is."""
    workdir = f"{bucket}/run"
    child = train_subprocess(workdir, f"train.steps={STEPS}")
    killed_at = None
    deadline = time.time() + 120
    while killed_at is None and child.poll() is None and time.time() < deadline:
        under = [n.split("/checkpoints/")[1] for n in gcs_server.names(f"{prefix(workdir)}/checkpoints/")]
        steps = {int(n.split("/")[0]) for n in under if n.split("/")[0].isdigit()}
        committed = {
            int(n.split("/")[0]) for n in under if n.count("/") == 1 and n.endswith("/commit_success.txt")
        }
        writing = sorted(s for s in steps - committed if s >= 2 * EVERY)
        if writing:
            child.send_signal(signal.SIGSTOP)
            names = gcs_server.names(f"{prefix(workdir)}/checkpoints/{writing[0]}/")
            if not any(n.endswith("commit_success.txt") for n in names):
                killed_at = writing[0]  # frozen before its marker
            else:
                child.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    child.kill()
    child.communicate()
    assert killed_at is not None, "never caught a save in flight"

    capsys.readouterr()
    assert main(argv(workdir, f"train.steps={STEPS}")) == 0
    resumed_from = int(capsys.readouterr().err.split("resuming from step ")[1].split()[0])
    assert resumed_from == killed_at - EVERY
    assert losses(workdir) == losses(local)
    assert_bitwise_equal(params_of(workdir), params_of(local))


def test_a_bucket_that_refuses_writes_exits_2_before_the_first_step(gcs_server, capsys):
    assert main(argv("gs://no-such-bucket-lmjax/run", "train.steps=2")) == 2
    err = capsys.readouterr().err
    assert "cannot write the workdir gs://no-such-bucket-lmjax/run" in err
    assert "credentials" in err and "tokenizing" not in err and "params, mesh" not in err


def test_a_workdir_that_is_a_file_exits_2_before_the_first_step(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert main(argv(tmp_path / "run", "train.steps=2")) == 2
    assert "cannot write the workdir" in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_written_exits_2_naming_it(tmp_path, capsys):
    """The checkpoints folder is a file: the first save fails for real (the OS refuses it)."""
    (tmp_path / "checkpoints").write_text("in the way")
    assert main(argv(tmp_path, "train.steps=6")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmjax: error: the checkpoint of step 4 was not saved in ")
    assert not any("warning" in line for line in err)


def test_two_processes_with_the_workdir_and_token_cache_on_a_bucket(gcs_server, bucket, tmp_path):
    one = tmp_path / "one"  # the same run in one process of 8 devices, locally
    assert main(tiny_train_argv(one, *multihost.SETTINGS)) == 0
    workdir, cache_dir = f"{bucket}/run", f"{bucket}/cache"
    children = two_processes(train_cmd(workdir, f"data.cache_dir={cache_dir}"), tmp_path / "train")
    try:
        codes = [c.wait(timeout=240) for c in children]
    finally:
        for c in children:
            c.kill()
    errs = [(tmp_path / f"train.p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], errs
    assert f"tokenizing stdlib corpus into {cache_dir}/" in errs[0]  # built once, by process 0
    assert any(n.endswith("/meta.json") for n in gcs_server.names(f"{prefix(cache_dir)}/"))
    assert_close(losses(workdir), losses(one), range(1, multihost.STEPS + 1))


def test_a_damaged_checkpoint_on_a_bucket_is_set_aside_and_the_one_before_taken(gcs_server, bucket, capsys):
    workdir = f"{bucket}/run"
    assert main(argv(workdir, f"train.steps={2 * EVERY}")) == 0
    params = [n for n in gcs_server.names(f"{prefix(workdir)}/checkpoints/{2 * EVERY}/params/") if "/d/" in n]
    storage.path(f"gs://lmjax-test/{params[0]}").unlink()  # an array's data object gone
    capsys.readouterr()
    assert main(argv(workdir, f"train.steps={3 * EVERY}")) == 0
    err = capsys.readouterr().err
    assert f"resuming from step {EVERY} of {3 * EVERY}" in err and "moved the damaged checkpoint" in err
    names = gcs_server.names(f"{prefix(workdir)}/checkpoints/")
    assert any(f"/checkpoints/{2 * EVERY}.damaged/" in n for n in names)
