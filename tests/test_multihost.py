"""Several processes, one run: two `python -m lmjax.train` processes of 4 CPU devices each
(JAX's multi-process runtime, gloo collectives, a coordinator on a free localhost port)
against one process of 8 devices.

Losses agree within LOSS_TOLERANCE, not bitwise: the two runs reduce over the batch and the
devices in different orders (gloo across processes, in-process sums in one), which moves
float32 losses by ~1e-7 relative per step; a few Adam steps amplify that a little. 1e-4 is
far above that drift and far below what a wrong row, a missed shard or a wrong restore does
(~1e-2 and more).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DATA, metrics_of, tiny_train_argv

from lmjax import distributed
from lmjax.config import UserError
from lmjax.data import loader
from lmjax.train import main

STEPS, EVERY = 6, 3
LOSS_TOLERANCE = 1e-4
HEARTBEAT_S = 5
SETTINGS = (
    "optim.lr=1e-2",
    "optim.warmup_steps=2",
    "optim.min_lr_ratio=1.0",  # a constant rate after warm-up: a resumed run's steps match
    "train.log_every=1",
    "train.eval_every=0",
    f"checkpoint.every={EVERY}",
    f"train.steps={STEPS}",
    f"train.heartbeat_timeout_s={HEARTBEAT_S}",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTED: list[subprocess.Popen] = []  # every child, killed after its test whatever happened


@pytest.fixture(autouse=True)
def no_child_left():
    yield
    while STARTED:
        child = STARTED.pop()
        if child.poll() is None:
            child.kill()
        child.wait()


def two_processes(
    cmd: list[str], logs: Path, extra_env: tuple[dict, dict] = ({}, {})
) -> list[subprocess.Popen]:
    """`cmd` started as processes 0 and 1 of 2, each with 4 CPU devices (and `extra_env`);
    stderr to `logs`."""
    port = free_port()
    children = []
    for i in range(2):
        env = {
            **os.environ,  # the compilation and corpus caches come from conftest
            "JAX_NUM_CPU_DEVICES": "4",
            "LMJAX_COORDINATOR": f"127.0.0.1:{port}",
            "LMJAX_NUM_PROCESSES": "2",
            "LMJAX_PROCESS_ID": str(i),
            **extra_env[i],
        }
        with open(logs.with_name(f"{logs.name}.p{i}.log"), "w") as err:
            children.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True))
    STARTED.extend(children)
    return children


def train_cmd(workdir: Path, *sets: str) -> list[str]:
    return [sys.executable, "-m", "lmjax.train", *tiny_train_argv(workdir, *SETTINGS, *sets)]


def train_two(workdir: Path, *sets: str) -> list[str]:
    """Train in two processes to the end; their stderr."""
    children = two_processes(train_cmd(workdir, *sets), workdir)
    codes = [c.wait(timeout=240) for c in children]
    errs = [workdir.with_name(f"{workdir.name}.p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], errs
    return errs


def losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics_of(workdir) if "loss" in r}


def assert_close(a: dict[int, float], b: dict[int, float], steps: range) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= LOSS_TOLERANCE * abs(b[s]), (s, a[s], b[s])


def resumed_from(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` whose newest checkpoint is `step`'s."""
    shutil.copytree(src, dst)
    for later in (dst / "checkpoints").iterdir():
        if int(later.name) > step:
            shutil.rmtree(later)
    return dst


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """One process, 8 devices (this one), mesh (8, 1, 1)."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    assert main(tiny_train_argv(workdir, *SETTINGS)) == 0
    return workdir


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, list[str]]:
    """The same run in two processes of 4 devices; (workdir, each process's stderr)."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    return workdir, train_two(workdir)


def test_two_processes_train_like_one(one, two):
    workdir, _ = two
    assert_close(losses(workdir), losses(one), range(1, STEPS + 1))


def test_only_process_0_writes_and_prints(two):
    workdir, (err0, err1) = two
    assert len(losses(workdir)) == STEPS  # one line per step: process 1 wrote none
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == STEPS
    assert "2 processes, 8 devices (4 per process)" in err0 and "done:" in err0
    lmjax_lines = [line for line in err1.splitlines() if line.startswith(("lmjax", "done", "stdlib_tiny"))]
    assert lmjax_lines == [] and "done:" not in err1


def test_a_checkpoint_of_two_processes_resumes_in_one(one, two, tmp_path, capsys):
    workdir = resumed_from(two[0], tmp_path / "run", EVERY)
    assert main(tiny_train_argv(workdir, *SETTINGS)) == 0
    assert f"resuming from step {EVERY}" in capsys.readouterr().err
    assert_close(losses(workdir), losses(one), range(1, STEPS + 1))


def test_a_checkpoint_of_one_process_resumes_in_two(one, tmp_path):
    workdir = resumed_from(one, tmp_path / "run", EVERY)
    err0, _ = train_two(workdir)
    assert f"resuming from step {EVERY}" in err0
    assert_close(losses(workdir), losses(one), range(1, STEPS + 1))


def test_a_shard_damaged_on_one_process_stops_the_run_with_what_to_move(tmp_path):
    """With the state sharded over both processes (fsdp 8) each reads only its own shards, so
    process 1 alone finds step 6 damaged, while process 0 has read its part and waits in
    Orbax's barrier: it cannot follow process 1 to step 3. Process 1 stops naming the folder
    to move, process 0 ends soon after; moved aside, the run resumes from step 3."""
    workdir = tmp_path / "run"
    sharded = ("mesh.data=1", "mesh.fsdp=8")
    train_two(workdir, *sharded)
    first = losses(workdir)
    shards = (workdir / f"checkpoints/{STEPS}").rglob("*")
    data_files = [p for p in shards if "ocdbt.process_1" in str(p) and p.is_file() and p.parent.name == "d"]
    assert data_files
    for data_file in data_files:
        data_file.write_bytes(b"")
    children = two_processes(train_cmd(workdir, *sharded, f"train.steps={STEPS + 2}"), workdir)
    started = time.time()
    codes = [c.wait(timeout=120) for c in children]
    err1 = workdir.with_name("run.p1.log").read_text()
    # Process 1 exits through JAX's shutdown barrier, which process 0 never reaches: JAX turns
    # its status 2 into an abort (134); the line that says what to do is printed before.
    assert codes[0] != 0 and codes[1] != 0 and time.time() - started < 120, err1[-2000:]
    damaged = workdir / f"checkpoints/{STEPS}"
    assert f"could not restore {damaged} on this process" in err1 and f"move {damaged} aside" in err1
    damaged.rename(tmp_path / "set_aside")
    err0, _ = train_two(workdir, *sharded, f"train.steps={STEPS + 2}")
    assert f"resuming from step {EVERY}" in err0
    assert_close(losses(workdir), first, range(1, STEPS + 1))


# Exchanges through the coordinator, outside any training: process 0 goes first in
# main_first (process 1 sees its file), and require_same fails on both when values differ.
EXCHANGE = """
import os, sys, time
from pathlib import Path
from lmjax import distributed
from lmjax.config import UserError
distributed.initialize(heartbeat_timeout_s=30)
import jax
marker = Path(sys.argv[1]) / "built"
def build():
    if jax.process_index() == 0:
        time.sleep(2)  # process 1 would look before this if it did not wait
        marker.write_text("process 0")
    return marker.read_text()
assert distributed.main_first(build, "marker") == "process 0"
try:
    distributed.require_same("the value", os.environ["VALUE"], "make them equal")
except UserError as e:
    print(f"lmjax: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("values, codes", [(("a", "a"), [0, 0]), (("a", "b"), [2, 2])])
def test_coordinator_exchanges(tmp_path, values, codes):
    env = tuple({"VALUE": v} for v in values)
    children = two_processes([sys.executable, "-c", EXCHANGE, str(tmp_path)], tmp_path / "x", env)
    assert [c.wait(timeout=120) for c in children] == codes, (tmp_path / "x.p1.log").read_text()
    if codes == [2, 2]:
        for i in range(2):
            err = (tmp_path / f"x.p{i}.log").read_text()
            assert "the value differs between processes: a on process 0, b on process 1" in err


# Each process loads its rows of the first batches (mesh fsdp=4 x tensor=2: the tensor pairs
# inside a process, so each holds half the rows), places them, and reports the mesh's process
# layout.
LOAD_ROWS = """
import sys, numpy as np
from lmjax import config, distributed, sharding
from lmjax.data import cache, loader
distributed.initialize(heartbeat_timeout_s=30)
import jax
exp = config.apply_overrides(config.load_experiment("stdlib_tiny"), sys.argv[2:])
corpus = cache.load_or_build(exp.data, log=lambda m: None)
mesh = sharding.make_mesh(exp)
with sharding.use(mesh, exp.mesh.rules):
    placement = sharding.BatchPlacement(mesh, exp.train.batch_size)
rows = placement.rows
t, seq_len = exp.train, exp.model.seq_len
splits = corpus.splits("train")
batches = loader.TrainBatches(splits, corpus.weights, seq_len, t.batch_size, t.seed, rows=rows)
out = {"rows": rows, "processes": np.vectorize(lambda d: d.process_index)(mesh.devices)}
host_batches = [next(batches) for _ in range(3)]
for i, host_batch in enumerate(host_batches):
    out.update({f"{k}{i}": v for k, v in host_batch.items()})
# This host's rows and the whole batch place the same global arrays: each device gets its rows.
whole = next(loader.TrainBatches(splits, corpus.weights, seq_len, t.batch_size, t.seed))
for placed in (placement.put(host_batches[0]), placement.put_global(whole)):
    for k, array in placed.items():
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), whole[k][shard.index])
np.savez(f"{sys.argv[1]}/p{jax.process_index()}.npz", **out)
"""


def test_each_process_loads_its_own_rows(tmp_path, stdlib_corpus):
    sets = [
        f"data.vocab_size={TINY_DATA.vocab_size}",
        f"data.tokenizer_sample_bytes={TINY_DATA.tokenizer_sample_bytes}",
        "model.seq_len=32",
        "train.batch_size=8",
        "mesh.data=1",
        "mesh.fsdp=4",
        "mesh.tensor=2",
    ]
    children = two_processes([sys.executable, "-c", LOAD_ROWS, str(tmp_path), *sets], tmp_path / "load")
    assert [c.wait(timeout=120) for c in children] == [0, 0], (tmp_path / "load.p1.log").read_text()
    got = [np.load(tmp_path / f"p{i}.npz") for i in range(2)]
    # Tensor pairs (the last mesh axis) lie inside one process; fsdp spans both.
    layout = got[0]["processes"]
    assert (layout[..., 0] == layout[..., 1]).all() and set(layout.ravel()) == {0, 1}
    rows = [g["rows"] for g in got]
    assert len(rows[0]) == len(rows[1]) == 4 and not set(rows[0]) & set(rows[1])
    whole = loader.TrainBatches(stdlib_corpus.splits("train"), stdlib_corpus.weights, 32, 8, seed=0)
    for i in range(3):
        expected = next(whole)
        for k, v in expected.items():
            together = np.empty_like(v)
            for r, g in zip(rows, got, strict=True):
                together[r] = g[f"{k}{i}"]
            np.testing.assert_array_equal(together, v, err_msg=f"batch {i} {k}")


def running(workdir: Path, sets: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Two processes of a long run, once process 0 has logged 3 steps."""
    cmd = train_cmd(workdir, "train.steps=100000", "checkpoint.every=0", *sets)
    children = two_processes(cmd, workdir)
    deadline = time.time() + 120
    while len(logged_lines(workdir)) < 3:
        assert time.time() < deadline and children[0].poll() is None, "the run did not start"
        time.sleep(0.1)
    return children


def logged_lines(workdir: Path) -> list[str]:
    path = workdir / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def test_a_killed_process_ends_the_other(tmp_path):
    """SIGKILL process 1 mid-run: process 0 exits non-zero within the heartbeat timeout (plus
    slack for a busy machine), JAX naming the lost process or gloo the lost connection."""
    workdir = tmp_path / "run"
    survivor, victim = running(workdir)
    victim.send_signal(signal.SIGKILL)
    killed = time.time()
    try:
        code = survivor.wait(timeout=HEARTBEAT_S + 20)
    finally:
        survivor.kill()
        victim.wait()
    assert code != 0 and time.time() - killed < HEARTBEAT_S + 20
    err = workdir.with_name(f"{workdir.name}.p0.log").read_text()
    # JAX names the lost process when its heartbeats stop. About 1 run in 6, gloo fails first,
    # in the collective the peer died in (a lost connection, or a message cut short that it
    # reports as "Received data size doesn't match expected size").
    lost = r"stopped sending heartbeats\):\s*1\b|Connection (closed|reset) by peer|gloo::EnforceNotMet"
    assert re.search(lost, err), err[-2000:]


def test_sigterm_to_one_process_stops_both_with_a_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    children = running(workdir)
    children[1].send_signal(signal.SIGTERM)
    assert [c.wait(timeout=60) for c in children] == [0, 0]
    err0 = workdir.with_name(f"{workdir.name}.p0.log").read_text()
    saved = [int(d.name) for d in (workdir / "checkpoints").iterdir()]
    assert len(saved) == 1 and f"stopped by a signal to another process at step {saved[0]}" in err0


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"LMJAX_COORDINATOR": "h:1234"},
            "not set: LMJAX_NUM_PROCESSES .or JAX_NUM_PROCESSES., LMJAX_PROCESS_ID",
        ),
        ({"LMJAX_COORDINATOR": "h:1", "LMJAX_NUM_PROCESSES": "two", "LMJAX_PROCESS_ID": "0"}, "whole"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "0..LMJAX"),
    ],
)
def test_a_half_set_environment_is_a_user_error(env, message):
    with pytest.raises(UserError, match=message):
        distributed.detect(env)


def test_what_the_environment_says():
    assert distributed.detect({}) is None
    assert (
        distributed.detect({"LMJAX_COORDINATOR": "h:1", "LMJAX_NUM_PROCESSES": "1", "LMJAX_PROCESS_ID": "0"})
        is None
    )
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.detect(explicit) == {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3}
    slurm = dict.fromkeys(distributed.SLURM, "0") | {"SLURM_NTASKS": "16"}
    assert distributed.detect(slurm) == {}  # JAX's own SLURM detection takes it from here
    assert distributed.detect(slurm | {"SLURM_NTASKS": "1"}) is None


def test_a_half_set_environment_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMJAX_NUM_PROCESSES", "2")
    assert main(tiny_train_argv(tmp_path, *SETTINGS)) == 2
    assert "LMJAX_COORDINATOR" in capsys.readouterr().err
    monkeypatch.delenv("LMJAX_NUM_PROCESSES")
    assert main(tiny_train_argv(tmp_path, "train.heartbeat_timeout_s=0")) == 2
    assert "train.heartbeat_timeout_s=0 must be positive" in capsys.readouterr().err


def test_a_missing_cache_above_the_limit_stops_every_process_at_once(tmp_path):
    """No process tokenizes a corpus above data.max_build_mb while the others wait: all exit 2
    naming the prepare command, before any tokenizing (the cache folder stays empty)."""
    workdir, empty_cache = tmp_path / "run", tmp_path / "cache"
    sets = (f"data.cache_dir={empty_cache}", "data.max_build_mb=0")
    children = two_processes(train_cmd(workdir, *sets), workdir)
    codes = [c.wait(timeout=120) for c in children]
    errs = [workdir.with_name(f"run.p{i}.log").read_text() for i in range(2)]
    assert codes == [2, 2], errs
    for err in errs:
        assert "the token cache of this corpus" in err and "data.max_build_mb=0" in err, err
        assert "python -m lmjax.data prepare --experiment stdlib_tiny" in err
    assert not empty_cache.exists() or not any(empty_cache.iterdir())
