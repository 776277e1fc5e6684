"""The fault drill: what careless users and a hostile cluster do to a run, each as a real
process, and what came of it.

    python benchmarks/fault_drill.py [--only NAME ...]

Every case runs `python -m lmjax.*` commands on the one-layer stdlib_tiny of the tests (the
token cache is shared) and is judged on what a user sees and keeps: the exit status expected,
one `lmjax: error:` line and no Python traceback for an error, no hang (each command has a
time limit), and afterwards the data intact (checkpoints finite and resumable, metrics one line
per step, no temporary files). Cases that need a bucket start fake-gcs-server (tests/gcs.py);
cases that fill a disk mount a small tmpfs (root only). Writes
`benchmarks/results/fault_drill.json`: every case's outcome and the totals.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import gcs  # noqa: E402 (tests/gcs.py: a real GCS server on 127.0.0.1)
from conftest import TINY_TRAIN_SETS  # noqa: E402 (the tests' tiny model and corpus settings)

LIMIT_S = 240  # a command still running after this long is a hang
BASE = (*TINY_TRAIN_SETS, "optim.warmup_steps=2", "train.log_every=1", "train.eval_every=0")


class Drill:
    """Runs commands in a scratch folder and keeps what each case found."""

    def __init__(self, root: Path):
        self.root, self.results = root, []

    def train(self, workdir: Path | str, *sets: str, experiment: str = "stdlib_tiny") -> list[str]:
        sets_args = [a for s in (*BASE, *sets) for a in ("--set", s)]
        return [
            sys.executable,
            "-m",
            "lmjax.train",
            "--experiment",
            experiment,
            "--workdir",
            str(workdir),
            *sets_args,
        ]

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, timeout=LIMIT_S, cwd=self.root, **kwargs
            )
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(cmd, -9, e.stdout or "", (e.stderr or "") + "\n<hung>")

    def start(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=self.root)


def judged(done: subprocess.CompletedProcess, status: int) -> dict:
    """What a command showed: its status against the one expected, a traceback, a hang, and
    whether an error came as one `lmjax: error:` line."""
    err = done.stderr or ""
    lines = [line for line in err.splitlines() if line.strip()]
    return {
        "status": done.returncode,
        "expected": status,
        "traceback": "Traceback (most recent call last)" in err,
        "hang": "<hung>" in err,
        "one_line_error": status == 0 or bool(lines and lines[-1].startswith("lmjax: error: ")),
        "last_line": lines[-1][:300] if lines else "",
    }


def wait_for_logged_steps(workdir: Path, steps: int) -> None:
    metrics, deadline = workdir / "metrics.jsonl", time.time() + LIMIT_S
    while time.time() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= steps
    ):
        time.sleep(0.01)


def finished(child: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = child.communicate(timeout=LIMIT_S)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def metrics_once_per_step(workdir: Path) -> bool:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    return len(steps) == len(set(steps))


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


# --- the cases: each returns (outcomes of its commands, whether the data is intact) -----------

Case = Callable[[Drill, Path], tuple[list[dict], bool]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


def user_error(name: str, *sets: str, experiment: str = "stdlib_tiny", workdir: str | None = None) -> None:
    @case(name)
    def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
        where = here / "run" if workdir is None else workdir
        done = drill.run(drill.train(where, *sets, experiment=experiment))
        return [judged(done, 2)], workdir is not None or not (here / "run").exists()


user_error("set mesh.rules=5", "mesh.rules=5")
user_error("set mesh.rules=[1,2]", "mesh.rules=[1,2]")
user_error('set mesh.rules=[["batch"]]', 'mesh.rules=[["batch"]]')
user_error("set model.remat_names=5", "model.remat_names=5")
user_error("set train.profile_steps=5", "train.profile_steps=5")
user_error("set model.vocab_size huge", "model.vocab_size=100000000000")
user_error("set optim.lr=inf", "optim.lr=inf")
user_error("set optim.lr=nan", "optim.lr=nan")
user_error("set an unknown key", "train.stepz=3")
user_error("experiment ..stdlib_tiny", experiment="..stdlib_tiny")
user_error("data.path matches nothing", "data.source=jsonl", "data.path=/nonexistent/*.jsonl")
user_error("checkpoint.init_from missing", "checkpoint.init_from=/nonexistent/run")
user_error("workdir empty", workdir="")
user_error("workdir on a missing bucket", workdir="gs://no-such-bucket-lmjax/run")


@case("experiment file raises")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    (here / "bad.py").write_text("raise RuntimeError('a bug')\n")
    return [judged(drill.run(drill.train(here / "run", experiment=str(here / "bad.py"))), 2)], True


@case("experiment file does not parse")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    (here / "bad.py").write_text("def config(:\n")
    return [judged(drill.run(drill.train(here / "run", experiment=str(here / "bad.py"))), 2)], True


@case("workdir is a file")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    (here / "run").write_text("a file")
    return [judged(drill.run(drill.train(here / "run")), 2)], (here / "run").read_text() == "a file"


@case("plan with train.profile_steps=5")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    cmd = [
        sys.executable,
        "-m",
        "lmjax.plan",
        "--experiment",
        "stdlib_tiny",
        "--set",
        "train.profile_steps=5",
    ]
    return [judged(drill.run(cmd), 2)], True


@case("evaluate a folder without checkpoints")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    (here / "run").mkdir()
    cmd = [sys.executable, "-m", "lmjax.evaluate", "--workdir", str(here / "run")]
    return [judged(drill.run(cmd), 2)], True


@case("generate with a prompt that is not UTF-8")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    first = judged(drill.run(drill.train(here / "run", "train.steps=2")), 0)
    cmd = [sys.executable, "-m", "lmjax.generate", "--workdir", str(here / "run"), "--max-tokens", "2"]
    done = drill.run([*cmd, "--prompt", os.fsdecode(b"def \xff")])
    return [first, judged(done, 0)], done.stdout.startswith("def \ufffd")


@case("exploding learning rate, then a lower one")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    boom = drill.run(
        drill.train(
            here / "run", "optim.lr=1e9", "optim.warmup_steps=0", "checkpoint.every=1", "train.steps=4"
        )
    )
    calm = drill.run(drill.train(here / "run", "optim.lr=1e-2", "checkpoint.every=1", "train.steps=4"))
    return [judged(boom, 3), judged(calm, 0)], "nan" not in (here / "run" / "metrics.jsonl").read_text()


@case("two trainers started together on one workdir")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    cmd = drill.train(here / "run", "train.steps=30", "checkpoint.every=5")
    children = [drill.start(cmd) for _ in range(2)]
    done = [finished(c) for c in children]
    statuses = sorted(d.returncode for d in done)
    results = [judged(d, d.returncode if statuses == [0, 2] else 0) for d in done]
    return results, statuses == [0, 2] and metrics_once_per_step(here / "run")


@case("the same command twice on a finished run, together")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    cmd = drill.train(here / "run", "train.steps=4")
    first = judged(drill.run(cmd), 0)
    children = [drill.start(cmd) for _ in range(2)]
    done = [finished(c) for c in children]
    results = [first, *(judged(d, d.returncode if d.returncode in (0, 2) else 0) for d in done)]
    return results, metrics_once_per_step(here / "run")


@case("kill -9 while training, then resume")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    child = drill.start(drill.train(here / "run", "train.steps=200", "checkpoint.every=3"))
    deadline = time.time() + LIMIT_S
    while time.time() < deadline and not (here / "run" / "checkpoints" / "6").exists():
        time.sleep(0.02)
    child.kill()
    child.communicate()
    resumed = drill.run(drill.train(here / "run", "train.steps=12", "checkpoint.every=3"))
    return [judged(resumed, 0)], "resuming from step" in resumed.stderr and metrics_once_per_step(
        here / "run"
    )


@case("killed after the final checkpoint, before its evaluation")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    first = judged(drill.run(drill.train(here / "run", "train.steps=4")), 0)
    metrics = here / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + "\n")  # the evaluation's line, never written
    again = drill.run(drill.train(here / "run", "train.steps=4"))
    return [first, judged(again, 0)], json.loads(metrics.read_text().splitlines()[-1]) == json.loads(
        lines[-1]
    )


@case("SIGHUP while training")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    child = drill.start(drill.train(here / "run", "train.steps=400", "checkpoint.every=100"))
    wait_for_logged_steps(here / "run", 3)
    child.send_signal(signal.SIGHUP)
    done = finished(child)
    err = done.stderr
    return [judged(done, 0)], "stopped by SIGHUP" in err


@case("Ctrl-C twice while training")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    child = drill.start(drill.train(here / "run", "train.steps=400", "checkpoint.every=5"))
    wait_for_logged_steps(here / "run", 3)
    child.send_signal(signal.SIGINT)
    time.sleep(0.05)  # two signals sent at once arrive as one
    child.send_signal(signal.SIGINT)
    done = finished(child)
    err = done.stderr
    outcome = judged(done, 130) | {"one_line_error": err.strip().splitlines()[-1] == "lmjax: interrupted"}
    resumed = drill.run(drill.train(here / "run", "train.steps=12", "checkpoint.every=5"))
    return [outcome, judged(resumed, 0)], metrics_once_per_step(here / "run")


@case("a relative data.path, resumed from another directory")
def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
    corpus = here / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 30)
    data = ("data.source=files", "data.vocab_size=300", f"data.cache_dir={here / 'cache'}")
    cmd = drill.train(here / "run", "train.steps=2", "data.path=corpus", *data)
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, cwd=here)
    (here / "elsewhere").mkdir()
    cmd = drill.train(here / "run", "train.steps=3", f"data.path={corpus}", *data)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT_S, cwd=here / "elsewhere")
    return [judged(first, 0), judged(again, 0)], "resuming from step 2" in again.stderr


def damaged_cache(name: str, damage: Callable[[Path], None]) -> None:
    @case(name)
    def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
        cache_dir = f"data.cache_dir={here / 'cache'}"
        first = judged(drill.run(drill.train(here / "run", "train.steps=2", cache_dir)), 0)
        entry = next(p for p in (here / "cache").iterdir() if (p / "meta.json").exists())
        damage(entry)
        again = drill.run(drill.train(here / "again", "train.steps=2", cache_dir))
        return [first, judged(again, 0)], "is damaged" in again.stderr


damaged_cache("token cache: a shard deleted", lambda e: next(e.glob("c0/train-*.array_record")).unlink())
damaged_cache(
    "token cache: a shard truncated",
    lambda e: os.truncate(p := next(e.glob("c0/train-*.array_record")), p.stat().st_size // 2),
)
damaged_cache("token cache: meta.json garbage", lambda e: (e / "meta.json").write_text("{not json"))
damaged_cache("token cache: starts deleted", lambda e: (e / "c0" / "validation-starts.npy").unlink())


def small_disk(here: Path, kib: int) -> Path | None:
    folder = here / f"disk{kib}k"
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True
    )
    return folder if done.returncode == 0 else None


def full_disk(name: str, kib: int) -> None:
    @case(name)
    def _(drill: Drill, here: Path) -> tuple[list[dict], bool]:
        disk = small_disk(here, kib)
        if disk is None:
            raise RuntimeError("mounting a tmpfs needs root")
        try:
            done = drill.run(drill.train(disk / "run", "train.steps=4", "checkpoint.every=2"))
            return [judged(done, 2)], no_temporary_files(disk)
        finally:
            subprocess.run(["umount", str(disk)], check=False)


full_disk("disk full at the start", 8)
full_disk("disk full at a save", 160)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "lmjax-jax-cache"))
    os.environ.setdefault("LMJAX_CACHE", str(Path(tempfile.gettempdir()) / "lmjax-test-data"))
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
    server = gcs.Server()
    cases = {}
    try:
        with tempfile.TemporaryDirectory(prefix="lmjax-drill-") as tmp:
            for n, (name, run_case) in enumerate(CASES.items()):
                if args.only and name not in args.only:
                    continue
                here = Path(tmp) / f"case{n}"
                here.mkdir()
                started = time.time()
                try:
                    outcomes, intact = run_case(Drill(here), here)
                except Exception as e:  # noqa: BLE001 - the drill itself failed: recorded, not hidden
                    outcomes, intact = [{"drill_error": f"{type(e).__name__}: {e}"}], False
                passed = intact and all(
                    o.get("status") == o.get("expected")
                    and not o["traceback"]
                    and not o["hang"]
                    and o["one_line_error"]
                    for o in outcomes
                )
                cases[name] = {
                    "passed": passed,
                    "data_intact": intact,
                    "seconds": round(time.time() - started, 1),
                    "commands": outcomes,
                }
                print(f"{'ok  ' if passed else 'FAIL'} {name} ({cases[name]['seconds']} s)", flush=True)
                shutil.rmtree(here, ignore_errors=True)
    finally:
        server.stop()
    commands = [o for c in cases.values() for o in c["commands"]]
    summary = {
        "cases": len(cases),
        "passed": sum(c["passed"] for c in cases.values()),
        "commands": len(commands),
        "tracebacks": sum(bool(o.get("traceback")) for o in commands),
        "hangs": sum(bool(o.get("hang")) for o in commands),
        "data_not_intact": sum(not c["data_intact"] for c in cases.values()),
        "wrong_status": sum(o.get("status") != o.get("expected") for o in commands),
    }
    record = {
        "benchmark": "fault_drill",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPU cores",
        "summary": summary,
        "cases": cases,
    }
    if not args.only:
        (REPO / "benchmarks" / "results" / "fault_drill.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if summary["passed"] == summary["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
