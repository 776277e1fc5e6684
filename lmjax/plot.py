"""`python -m lmjax.plot DIR [DIR ...] [--x tokens|step|time] [--smooth S] [--held-out] [-o out.png]`

One PNG of one or several runs, one colour per run, read from each DIR/metrics.jsonl: training
loss (smoothed, the raw curve faint behind it) and held-out loss (dashed, with markers), with
held-out bits per byte on a second axis; beside it, panels of learning rate, gradient norm and
tokens/s. `--held-out` compares runs by their held-out curves alone. From a notebook:
`lmjax.plot.plot_runs(["runs/a", "runs/b"])` returns the matplotlib Figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter
from scipy.signal import lfilter

from lmjax import storage
from lmjax.config import UserError

X_AXES = ("tokens", "step", "time")
_X_LABELS = {"tokens": "tokens", "step": "step", "time": "training time (s)"}
DEFAULT_SMOOTH = 0.6  # TensorBoard's default: little lag on runs of a few dozen logged lines
# metrics.jsonl fields drawn beside the loss (a panel no run logs is left out), and their labels
SIDE_PANELS = {"lr": "learning rate", "grad_norm": "gradient norm", "tokens_per_s": "tokens/s"}
SMOOTHED = ("loss", "grad_norm", "tokens_per_s")  # noisy step to step; lr is a schedule, drawn as is
BPB_LABEL = "held-out bits per byte"
RAW_ALPHA = 0.25


@dataclasses.dataclass
class Curves:
    """One run's metrics.jsonl as columns, NaN where a line lacks the field. The held-out points
    take their tokens and time from the training lines (eval lines carry only the step)."""

    label: str
    train: dict[str, np.ndarray]  # x axis or field ("loss", "lr", ...) -> one value per training line
    held_out: dict[str, np.ndarray]  # x axis or field ("eval_loss", "eval_bpb") -> one per held-out line

    def series(self, lines: str, field: str, x: str) -> tuple[np.ndarray, np.ndarray]:
        """(x, field) of the `lines` ("train" or "held_out") that have `field`."""
        columns = getattr(self, lines)
        if field not in columns:
            return np.array([]), np.array([])
        logged = ~np.isnan(columns[field])
        return columns[x][logged], columns[field][logged]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.plot", description=__doc__.split("\n\n")[1])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--x", choices=X_AXES, default="tokens", help="horizontal axis (default: tokens)")
    parser.add_argument(
        "-o", "--out", help="PNG to write (default: DIR/loss.png for one run, loss.png for several)"
    )
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="loss axis range")
    parser.add_argument(
        "--smooth",
        type=float,
        default=DEFAULT_SMOOTH,
        metavar="S",
        help=f"weight in [0, 1) of a debiased moving average of the training curves (default: "
        f"{DEFAULT_SMOOTH}; 0: raw)",
    )
    parser.add_argument(
        "--held-out", action="store_true", help="only the held-out curves, to compare runs by them"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = Path(args.out) if args.out else default_out(args.dirs)
        plot_runs(args.dirs, x=args.x, out=out, ylim=args.ylim, smooth=args.smooth, held_out=args.held_out)
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # -o under a file, a folder without permission
        print(
            f"lmjax: error: {e.filename}: {e.strerror}" if e.filename else f"lmjax: error: {e}",
            file=sys.stderr,
        )
        return 2
    print(out)
    return 0


def default_out(dirs: Sequence[str | Path]) -> Path:
    """DIR/loss.png for one local run; loss.png here for several, or for a run on a bucket."""
    one_local = len(dirs) == 1 and not storage.is_bucket(dirs[0])
    return Path(dirs[0]) / "loss.png" if one_local else Path("loss.png")


def plot_runs(
    dirs: Sequence[str | Path],
    x: str = "tokens",
    out: str | Path | None = None,
    ylim: Sequence[float] | None = None,
    smooth: float = DEFAULT_SMOOTH,
    held_out: bool = False,
) -> Figure:
    """A matplotlib Figure of the runs against `x` (its first axes: the loss); saved as a PNG
    to `out` if given. `smooth`: weight of the training curves' moving average (0: raw).
    `held_out`: only the held-out curves, labelled by run. The figure is drawn by Agg without
    pyplot, so no window opens and a notebook's backend is left as it was (show it with
    `IPython.display.Image(out)` or `display(fig)`)."""
    if x not in X_AXES:
        raise UserError(f"--x {x}: give one of {', '.join(X_AXES)}")
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth {smooth}: give a weight in [0, 1) (0 draws the raw curves)")
    runs = [read_run(storage.path(d), label) for d, label in zip(dirs, _labels(dirs), strict=True)]
    if held_out and not any(run.held_out["eval_loss"].size for run in runs):
        raise UserError("--held-out: none of these runs has a held-out line yet (train.eval_every)")
    bpb_per_loss = _shared_bpb_per_loss(runs)
    fields = _side_fields(runs, held_out, bpb_axis=bpb_per_loss is not None)
    fig, loss_ax, side_axes = _layout(len(fields))
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        if held_out:
            _plot_held_out(loss_ax, run, x, colour, label=run.label)
        else:
            _plot_smoothed(loss_ax, *run.series("train", "loss", x), smooth, colour, f"{run.label} train")
            _plot_held_out(loss_ax, run, x, colour, label=f"{run.label} held-out")
        for ax, field in zip(side_axes, fields, strict=True):
            if field == "eval_bpb":
                ax.plot(*run.series("held_out", field, x), color=colour, linestyle="--", marker="o")
            elif field in SMOOTHED:
                _plot_smoothed(ax, *run.series("train", field, x), smooth, colour, f"_{run.label} {field}")
            else:
                ax.plot(*run.series("train", field, x), color=colour)
    _decorate(loss_ax, side_axes, fields, x, ylim, held_out)
    if bpb_per_loss is not None:
        scale = (lambda loss: loss * bpb_per_loss, lambda bpb: bpb / bpb_per_loss)
        loss_ax.secondary_yaxis("right", functions=scale).set_ylabel(BPB_LABEL)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return fig


def smoothed(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard's debiased exponential moving average: each point is the average of the
    points so far weighted by `weight ** age`, so the start is not dragged toward 0."""
    values = np.asarray(values, dtype=float)
    biased = lfilter([1 - weight], [1, -weight], values)  # m_t = weight * m_{t-1} + (1 - weight) * v_t
    return biased / (1 - weight ** np.arange(1, values.size + 1))


def _plot_smoothed(ax: Axes, xs: np.ndarray, ys: np.ndarray, weight: float, colour: str, label: str) -> None:
    """The smoothed curve, with the raw one faint behind it (just the raw one for weight 0)."""
    if weight > 0:
        ax.plot(xs, ys, color=colour, alpha=RAW_ALPHA, linewidth=1, label=f"_{label} (raw)")
        ys = smoothed(ys, weight)
    ax.plot(xs, ys, color=colour, label=label)


def _plot_held_out(ax: Axes, run: Curves, x: str, colour: str, label: str) -> None:
    xs, losses = run.series("held_out", "eval_loss", x)
    if losses.size:
        ax.plot(xs, losses, color=colour, linestyle="--", marker="o", label=label)


def _side_fields(runs: list[Curves], held_out: bool, bpb_axis: bool) -> list[str]:
    """The fields of the panels beside the loss: those of SIDE_PANELS some run logs (none for
    `held_out`), and held-out bits per byte where the loss panel has no axis for it."""
    logged = {f for run in runs for f, values in run.train.items() if np.isfinite(values).any()}
    fields = [] if held_out else [f for f in SIDE_PANELS if f in logged]
    if not bpb_axis and any(np.isfinite(run.held_out["eval_bpb"]).any() for run in runs):
        fields.append("eval_bpb")  # runs that turn nats into bits per byte differently: a panel
    return fields


def _shared_bpb_per_loss(runs: list[Curves]) -> float | None:
    """Bits per byte per nat of held-out loss, where every run's held-out lines agree on it (one
    tokenizer and held-out text: one scale on a second axis serves all); else None."""
    ratios = np.concatenate([run.held_out["eval_bpb"] / run.held_out["eval_loss"] for run in runs])
    ratios = ratios[np.isfinite(ratios)]
    if not ratios.size or not np.allclose(ratios, ratios[0], rtol=1e-4):
        return None
    return float(ratios[0])


def _layout(side_panels: int) -> tuple[Figure, Axes, list[Axes]]:
    """The loss panel on the left; the side panels stacked in a narrower column on its right,
    sharing its x axis. The loss panel is created first: `fig.axes[0]`."""
    if not side_panels:
        fig = Figure(figsize=(8, 5), layout="constrained")
        return fig, fig.add_subplot(), []
    fig = Figure(figsize=(13, max(5.5, 1.8 * side_panels)), layout="constrained")
    grid = fig.add_gridspec(side_panels, 2, width_ratios=(2, 1))
    loss_ax = fig.add_subplot(grid[:, 0])
    return fig, loss_ax, [fig.add_subplot(grid[i, 1], sharex=loss_ax) for i in range(side_panels)]


def _decorate(
    loss_ax: Axes,
    side_axes: list[Axes],
    fields: list[str],
    x: str,
    ylim: Sequence[float] | None,
    held_out: bool,
) -> None:
    loss_ax.set_ylabel("held-out loss (nats per token)" if held_out else "loss (nats per token)")
    if ylim:
        loss_ax.set_ylim(*ylim)
    loss_ax.legend()
    for ax, field in zip(side_axes, fields, strict=True):
        ax.set_ylabel(BPB_LABEL if field == "eval_bpb" else SIDE_PANELS[field])
        if field == "tokens_per_s":
            ax.yaxis.set_major_formatter(EngFormatter())
        ax.tick_params(labelbottom=ax is side_axes[-1])  # one x axis labelled under the column
    for ax in [loss_ax, *side_axes[-1:]]:
        ax.set_xlabel(_X_LABELS[x])
    for ax in [loss_ax, *side_axes]:
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())  # 1.5M rather than 1.5e6
        ax.grid(alpha=0.3)


def _labels(dirs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name; the path as given where two names are the same."""
    names = [storage.path(d).name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs, strict=True)]


def read_run(workdir: storage.Path, label: str) -> Curves:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path} not found: give run folders that `python -m lmjax.train --workdir DIR` has logged to"
        )
    records = _records(path)
    train = [r for r in records if "loss" in r]
    if not train:
        raise UserError(f"{path} has no training loss yet: let the run log a step (train.log_every) first")
    held_out = [r for r in records if "eval_loss" in r]
    columns = _columns(train, {k for r in train for k in r})
    columns["time"] = np.array(_continued_time(columns["time"].tolist()))
    steps = _columns(held_out, {"step"})["step"]
    return Curves(
        label,
        train=columns,
        held_out={
            **_columns(held_out, {"step", "eval_loss", "eval_bpb"}),
            "tokens": np.interp(steps, columns["step"], columns["tokens"]),
            "time": np.interp(steps, columns["step"], columns["time"]),
        },
    )


def _columns(records: list[dict[str, float]], keys: set[str]) -> dict[str, np.ndarray]:
    """`keys` of the records as float arrays, NaN where a record lacks one."""
    return {k: np.array([r.get(k, math.nan) for r in records], dtype=float) for k in keys}


def _records(path: storage.Path) -> list[dict[str, float]]:
    """metrics.jsonl's lines in step order, without a last line a kill cut short."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return sorted((r for r in records if "step" in r), key=lambda r: r["step"])


def _continued_time(times: list[float]) -> list[float]:
    """`time` runs on across a resumed run's sessions; in files written before it did, each
    session restarted the clock: a drop in `time` starts a session, which adds on."""
    return list(accumulate(b - a if b >= a else b for a, b in zip([0.0, *times], times, strict=False)))


if __name__ == "__main__":
    sys.exit(main())
