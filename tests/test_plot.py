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

    lines = plot.plot_runs([short_run, logged_run], x="step", smooth=0).axes[0].get_lines()
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
    train_line, eval_line = plot.plot_runs([tmp_path], x="time", smooth=0).axes[0].get_lines()
    assert list(train_line.get_xdata()) == times
    assert list(eval_line.get_xdata()) == [times[2], times[5]]


def write_metrics(workdir: Path, records: list[dict]) -> Path:
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return workdir


def legend_of(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


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
    train_line, eval_line = plot.plot_runs([resumed_run(tmp_path)], x=x, smooth=0).axes[0].get_lines()
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
    assert legend_of(plot.plot_runs([first, second]).axes[0]) == [f"{first} train", f"{second} train"]


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


# 5, 13/3, 27/7, 3.4: each point the average of the points so far weighted 0.5 ** age (by hand)
LOSSES = [5.0, 4.0, 3.5, 3.0]
LOSSES_SMOOTHED_HALF = [5.0, 13 / 3, 27 / 7, 3.4]


def full_run(tmp_path: Path, name: str, bpb_per_loss: float = 0.5, tokens_per_s: bool = True) -> Path:
    """Train lines at steps 1-4 with every field the loop logs (the first, holding the
    compilation, without tokens_per_s), held-out lines at steps 2 and 4."""
    lines = []
    for step, loss in enumerate(LOSSES, start=1):
        line = {"step": step, "loss": loss, "grad_norm": 2 * loss, "lr": 0.1 * step, "tokens": 10 * step}
        lines.append({**line, "time": float(step), **({"tokens_per_s": 100.0 * step} if step > 1 else {})})
    if not tokens_per_s:
        lines = [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]
    evals = [{"step": s, "eval_loss": e, "eval_bpb": e * bpb_per_loss} for s, e in [(2, 4.5), (4, 3.5)]]
    return write_metrics(tmp_path / name, [*lines, *evals])


def test_smoothing_draws_the_debiased_moving_average_over_the_faint_raw_curve(tmp_path):
    ax = plot.plot_runs([resumed_run(tmp_path)], x="step", smooth=0.5).axes[0]
    raw, train_line, eval_line = ax.get_lines()
    assert list(raw.get_ydata()) == LOSSES and raw.get_alpha() < 0.5
    assert list(train_line.get_ydata()) == pytest.approx(LOSSES_SMOOTHED_HALF)
    assert list(train_line.get_xdata()) == list(raw.get_xdata()) == [10, 20, 30, 40]
    assert list(eval_line.get_ydata()) == [4.5, 3.2]  # held-out lines are not smoothed
    assert raw.get_color() == train_line.get_color() and train_line.get_alpha() is None
    assert legend_of(ax) == ["resumed train", "resumed held-out"]
    assert len(plot.plot_runs([tmp_path / "resumed"], smooth=0).axes[0].get_lines()) == 2
    assert list(plot.smoothed([7.0, 7.0, 7.0], 0.9)) == pytest.approx([7.0, 7.0, 7.0])  # no pull to 0


def test_panels_beside_the_loss_show_the_logged_fields(tmp_path):
    fig = plot.plot_runs([full_run(tmp_path, "a")], x="step", smooth=0.5)
    loss_ax, lr_ax, grad_ax, speed_ax = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes[1:]] == ["learning rate", "gradient norm", "tokens/s"]
    (lr_line,) = lr_ax.get_lines()
    assert list(lr_line.get_ydata()) == pytest.approx([0.1, 0.2, 0.3, 0.4])  # a schedule: not smoothed
    grad_raw, grad_smoothed = grad_ax.get_lines()
    assert list(grad_raw.get_ydata()) == [2 * loss for loss in LOSSES]
    assert list(grad_smoothed.get_ydata()) == pytest.approx([2 * v for v in LOSSES_SMOOTHED_HALF])
    speed_raw, _ = speed_ax.get_lines()
    assert list(speed_raw.get_xdata()) == [2, 3, 4]  # the compiling step's line has none
    assert {line.get_color() for ax in fig.axes for line in ax.get_lines()} == {"C0"}
    assert loss_ax.get_xlabel() == speed_ax.get_xlabel() == "step" and grad_ax.get_xlabel() == ""


def test_a_field_no_run_logs_has_no_panel(tmp_path):
    runs = [full_run(tmp_path, name, tokens_per_s=False) for name in "ab"]
    fig = plot.plot_runs(runs)
    assert [ax.get_ylabel() for ax in fig.axes[1:]] == ["learning rate", "gradient norm"]
    assert [ax.get_ylabel() for ax in plot.plot_runs([*runs, full_run(tmp_path, "c")]).axes[1:]] == [
        "learning rate",
        "gradient norm",
        "tokens/s",
    ]
    assert len(plot.plot_runs([resumed_run(tmp_path)]).axes) == 1  # only loss, tokens and time


def test_bits_per_byte_are_a_second_axis_of_the_loss(tmp_path):
    fig = plot.plot_runs([full_run(tmp_path, "a"), full_run(tmp_path, "b")])
    (bpb_ax,) = fig.axes[0].child_axes
    assert bpb_ax.get_ylabel() == "held-out bits per byte"
    fig.draw_without_rendering()  # a secondary axis takes its range when drawn
    assert bpb_ax.get_ylim() == pytest.approx([0.5 * v for v in fig.axes[0].get_ylim()])


def test_runs_that_convert_to_bits_per_byte_differently_get_a_panel(tmp_path):
    """Different tokenizers or held-out texts: one second axis cannot serve both runs."""
    fig = plot.plot_runs(
        [full_run(tmp_path, "a", bpb_per_loss=0.5), full_run(tmp_path, "b", bpb_per_loss=0.25)]
    )
    assert not fig.axes[0].child_axes
    assert fig.axes[-1].get_ylabel() == "held-out bits per byte"
    assert [list(line.get_ydata()) for line in fig.axes[-1].get_lines()] == [[2.25, 1.75], [1.125, 0.875]]


def test_held_out_mode_compares_runs_by_their_held_out_curves(tmp_path):
    runs = [full_run(tmp_path, "lr_low"), full_run(tmp_path, "lr_high"), resumed_run(tmp_path)]
    fig = plot.plot_runs(runs, x="step", held_out=True)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert legend_of(ax) == ["lr_low", "lr_high", "resumed"]
    assert [list(line.get_ydata()) for line in lines] == [[4.5, 3.5], [4.5, 3.5], [4.5, 3.2]]
    assert [list(line.get_xdata()) for line in lines] == [[2, 4], [2, 4], [15, 40]]
    assert len({line.get_color() for line in lines}) == 3
    assert "held-out" in ax.get_ylabel() and ax.child_axes[0].get_ylabel() == "held-out bits per byte"


def test_cli_options_write_one_png(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    runs = [str(full_run(tmp_path, "a")), str(full_run(tmp_path, "b", bpb_per_loss=0.25))]
    assert plot.main([*runs, "--held-out", "--smooth", "0", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert plot.main([*runs, "--smooth", "0.9", "-o", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out), str(out)]


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--smooth", "1.5"], "--smooth"),
        (["--smooth", "1"], "--smooth"),
        (["--smooth", "-0.1"], "--smooth"),
        (["--held-out"], "held-out line"),  # a run not evaluated yet
    ],
)
def test_a_bad_smoothing_or_nothing_held_out_exits_2_in_one_line(tmp_path, capsys, argv, named):
    workdir = write_metrics(tmp_path / "run", [{"step": 1, "loss": 2.0, "tokens": 8, "time": 1.0}])
    out = tmp_path / "out.png"
    assert plot.main([str(workdir), *argv, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmjax: error: ") and err.count("\n") == 1 and named in err
    assert not out.exists()
