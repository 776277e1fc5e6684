"""What a training run shows in the terminal: a kept line per evaluation and per checkpoint
saved, a progress bar whose rate leaves out the compilation (tqdm.auto: a widget in notebooks),
and a warning when jax runs on the CPU of a machine with an accelerator."""

import contextlib
import io
import re
from pathlib import Path

import pytest
import tqdm.auto
import tqdm.std
from conftest import metrics_of, tiny_train_argv

from lmjax import loop, metrics, train


class RecordedBar(tqdm.auto.tqdm):
    """The trainer's bar, with the clock it was created with."""

    made: list["RecordedBar"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.created_at = self.start_t
        RecordedBar.made.append(self)


class Run:
    """A finished 4-step run (evaluated and saved every 2 steps), what it printed, and whether
    each checkpoint's folder was there when its line was printed."""

    def __init__(self, workdir: Path, status: int, err: str, folder_at_note: dict[int, bool]):
        self.workdir, self.status, self.err, self.folder_at_note = workdir, status, err, folder_at_note
        self.bar = RecordedBar.made[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("terminal")
    fake_gpu = tmp / "nvidia0"
    fake_gpu.touch()
    folder_at_note: dict[int, bool] = {}
    original_print = metrics.Logger.print

    def print_noting_folders(self: metrics.Logger, message: str) -> None:
        if saved := re.fullmatch(r"step (\d+): checkpoint saved to (.+)", message):
            folder_at_note[int(saved[1])] = Path(saved[2]).is_dir()
        original_print(self, message)

    workdir, err = tmp / "run", io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr(metrics, "tqdm", RecordedBar)
        patch.setattr(metrics.Logger, "print", print_noting_folders)
        # a fake GPU (raising=False: without the probes, the warning's test names what is missing)
        patch.setattr(loop, "NVIDIA_SMI", "no-such-command-lmjax", raising=False)
        patch.setattr(loop, "NVIDIA_DEVICES", (str(fake_gpu),), raising=False)
        patch.setattr(loop, "TPU_DEVICES", (), raising=False)
        patch.delenv("JAX_PLATFORMS", raising=False)
        sets = ("train.steps=4", "train.eval_every=2", "checkpoint.every=2", "train.progress=true")
        status = train.main(tiny_train_argv(workdir, *sets))
    return Run(workdir, status, err.getvalue(), folder_at_note)


def test_each_evaluation_prints_a_line_with_the_logged_numbers(run):
    assert run.status == 0, run.err
    evaluations = [r for r in metrics_of(run.workdir) if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    for r in evaluations:
        line = f"step {r['step']}: held-out loss {r['eval_loss']:.4f}, {r['eval_bpb']:.4f} bits/byte"
        assert line in run.err.splitlines()


def test_each_checkpoint_is_noted_once_its_folder_is_complete(run):
    for s in (2, 4):
        assert f"step {s}: checkpoint saved to {run.workdir / 'checkpoints' / str(s)}" in run.err.splitlines()
    assert run.folder_at_note == {2: True, 4: True}  # never noted before the save is complete


def test_the_bar_clock_starts_after_the_first_step(run):
    assert run.bar.initial == 1  # the compiling step is not in the rate
    assert run.bar.start_t > run.bar.created_at


def test_the_bar_is_tqdm_auto_and_still_drawn_in_a_terminal(run):
    assert metrics.tqdm is tqdm.auto.tqdm  # a widget in Jupyter and Colab
    assert re.search(r"4/4 \[[0-9:]+<[0-9:]+, +[0-9.]+step/s", run.err)


def test_jax_on_the_cpu_of_a_gpu_machine_is_warned_once(run):
    warnings = [line for line in run.err.splitlines() if line.startswith("lmjax: warning:")]
    assert len(warnings) == 1
    assert "NVIDIA GPU but jax runs on the CPU" in warnings[0] and "pip install -e '.[cuda]'" in warnings[0]


def test_the_first_time_left_is_close_to_the_steady_one(tmp_path, monkeypatch):
    """A 100 s compilation in the first step, then 1 s steps: the time left right after step 2
    is that of 1 s steps."""
    now = [0.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: now[0])
    log = metrics.Logger(tmp_path, total_steps=100)
    try:
        now[0] += 100
        log.advance()
        for _ in range(3):
            now[0] += 1
            log.advance()
            bar = log._bar.format_dict
            rate = bar["rate"] or (bar["n"] - bar["initial"]) / bar["elapsed"]
            assert (bar["total"] - bar["n"]) / rate == pytest.approx(bar["total"] - bar["n"], rel=0.1)
    finally:
        log.close()


def test_the_warning_names_the_extra_of_the_accelerator(tmp_path, monkeypatch):
    chip = tmp_path / "accel0"
    chip.touch()
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(loop, "NVIDIA_SMI", "no-such-command-lmjax", raising=False)
    monkeypatch.setattr(loop, "NVIDIA_DEVICES", (str(tmp_path / "nvidia0"),))
    monkeypatch.setattr(loop, "TPU_DEVICES", (str(tmp_path / "vfio" / "[0-9]*"),))
    assert loop.unused_accelerator_warning("cpu") == ""  # nothing there
    monkeypatch.setattr(loop, "TPU_DEVICES", (str(chip),))
    assert "TPU but jax runs on the CPU" in loop.unused_accelerator_warning("cpu")
    assert "pip install -e '.[tpu]'" in loop.unused_accelerator_warning("cpu")
    assert loop.unused_accelerator_warning("tpu") == ""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the CPU chosen on purpose
    assert loop.unused_accelerator_warning("cpu") == ""
