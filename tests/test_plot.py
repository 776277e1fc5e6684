"""`python -m lmjax.plot`: loss curves of several runs on one chart, in-process."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import metrics_of, tiny_train_argv

from lmjax import plot, train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    """A real run logging every 2 steps, evaluated at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp("logged_run")
    sets = ("train.steps=6", "train.log_every=2", "train.eval_every=3")
    assert train.main(tiny_train_argv(workdir, *sets)) == 0
    return workdir


def test_two_real_runs_on_one_png(short_run, logged_run, tmp_path):
    out = tmp_path / "out.png"
    assert plot.main([str(short_run), str(logged_run), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE) and out.stat().st_size > 1000

    lines = plot.plot_runs([short_run, logged_run], x="step").axes[0].get_lines()
    assert [line.get_label() for line in lines] == [
        f"{short_run.name} train",
        f"{short_run.name} held-out",
        f"{logged_run.name} train",
        f"{logged_run.name} held-out",
    ]
    for (train_line, eval_line), run in zip([lines[:2], lines[2:]], [short_run, logged_run], strict=True):
        records = metrics_of(run)
        trained = [r for r in records if "loss" in r]
        evaluated = [r for r in records if "eval_loss" in r]
        assert list(train_line.get_xdata()) == [r["step"] for r in trained]
        assert list(train_line.get_ydata()) == [r["loss"] for r in trained]
        assert list(eval_line.get_xdata()) == [r["step"] for r in evaluated]
        assert list(eval_line.get_ydata()) == [r["eval_loss"] for r in evaluated]
        assert train_line.get_color() == eval_line.get_color()
        assert (train_line.get_linestyle(), eval_line.get_linestyle()) == ("-", "--")
    assert lines[0].get_color() != lines[2].get_color()
    assert [len(line.get_xdata()) for line in lines] == [1, 1, 3, 2]


def test_a_resumed_runs_time_runs_on_and_is_the_time_axis(tmp_path):
    """The resumed session's clock starts at the last kept line's `time` (step 3's; the last
    kept line is step 3's held-out line, which has none)."""
    argv = tiny_train_argv(tmp_path, "train.steps=6", "train.log_every=1", "train.eval_every=3")
    assert train.main([*argv, "--set", "checkpoint.every=3"]) == 0
    before = {r["step"]: r["time"] for r in metrics_of(tmp_path) if "time" in r}
    shutil.rmtree(tmp_path / "checkpoints" / "6")  # resume from step 3: steps 4-6 are redone
    assert train.main([*argv, "--set", "checkpoint.every=3"]) == 0

    trained = [r for r in metrics_of(tmp_path) if "time" in r]
    times = [r["time"] for r in trained]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5, 6]
    assert times[:3] == [before[1], before[2], before[3]]  # kept as they were
    assert times == sorted(times) and times[3] > before[3]
    train_line, eval_line = plot.plot_runs([tmp_path], x="time").axes[0].get_lines()
    assert list(train_line.get_xdata()) == times
    assert list(eval_line.get_xdata()) == [times[2], times[5]]


def write_metrics(workdir: Path, records: list[dict]) -> Path:
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return workdir


def resumed_run(tmp_path: Path) -> Path:
    """Train lines at steps 10-40 (100 tokens a step), a resume after step 20 restarting the
    clock (as files written before `time` ran on across sessions do), held-out lines at 15
    (between two train lines) and 40; a line cut short by a kill."""
    train_lines = [
        {"step": 10, "loss": 5.0, "tokens": 1000, "time": 2.0},
        {"step": 20, "loss": 4.0, "tokens": 2000, "time": 4.0},
        {"step": 30, "loss": 3.5, "tokens": 3000, "time": 1.0},  # the resumed session
        {"step": 40, "loss": 3.0, "tokens": 4000, "time": 3.0},
    ]
    evals = [{"step": 15, "eval_loss": 4.5}, {"step": 40, "eval_loss": 3.2}]
    workdir = write_metrics(tmp_path / "resumed", [*train_lines[:2], evals[0], *train_lines[2:], evals[1]])
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 41, "lo')
    return workdir


@pytest.mark.parametrize(
    "x, train_x, eval_x",
    [
        ("step", [10, 20, 30, 40], [15, 40]),
        ("tokens", [1000, 2000, 3000, 4000], [1500, 4000]),
        ("time", [2.0, 4.0, 5.0, 7.0], [3.0, 7.0]),  # older file's sessions summed; held-out interpolated
    ],
)
def test_x_axes(tmp_path, x, train_x, eval_x):
    train_line, eval_line = plot.plot_runs([resumed_run(tmp_path)], x=x).axes[0].get_lines()
    assert list(train_line.get_xdata()) == train_x
    assert list(eval_line.get_xdata()) == eval_x
    assert list(train_line.get_ydata()) == [5.0, 4.0, 3.5, 3.0]
    assert list(eval_line.get_ydata()) == [4.5, 3.2]


def test_one_run_writes_its_own_loss_png(tmp_path, capsys):
    workdir = resumed_run(tmp_path)
    assert plot.main([str(workdir), "--x", "time", "--ylim", "2", "6"]) == 0
    assert (workdir / "loss.png").read_bytes().startswith(PNG_SIGNATURE)
    assert capsys.readouterr().out.strip() == str(workdir / "loss.png")


def test_same_folder_names_are_told_apart(tmp_path):
    line = {"step": 1, "loss": 2.0, "tokens": 8, "time": 1.0}
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    first, second = (write_metrics(tmp_path / p / "run", [line]) for p in "xy")
    lines = plot.plot_runs([first, second]).axes[0].get_lines()
    assert [line.get_label() for line in lines] == [f"{first} train", f"{second} train"]


@pytest.mark.parametrize("contents", [None, "", '{"step": 3, "eval_loss": 4.0}\n'])
def test_a_folder_without_training_lines_exits_2_in_one_line(tmp_path, capsys, contents):
    if contents is not None:
        (tmp_path / "metrics.jsonl").write_text(contents)
    assert plot.main([str(tmp_path), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax: error: ") and err.count("\n") == 1 and "metrics.jsonl" in err
    assert not (tmp_path / "out.png").exists()


def test_out_in_a_missing_folder_is_created(tmp_path, capsys):
    out = tmp_path / "plots" / "new" / "x.png"
    assert plot.main([str(resumed_run(tmp_path)), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert capsys.readouterr().out.strip() == str(out)


def test_out_under_a_file_exits_2_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert plot.main([str(resumed_run(tmp_path)), "-o", str(tmp_path / "file" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax: error: ") and err.count("\n") == 1 and "file" in err
