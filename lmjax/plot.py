"""`python -m lmjax.plot DIR [DIR ...] [--x tokens|step|time] [-o out.png]`

Training loss (solid) and held-out loss (dashed, with markers) of one or several runs on one
chart, one colour per run, read from each DIR/metrics.jsonl. From a notebook:
`lmjax.plot.plot_runs(["runs/a", "runs/b"])` returns the matplotlib Figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from lmjax import storage
from lmjax.config import UserError

X_AXES = ("tokens", "step", "time")
_X_LABELS = {"tokens": "tokens", "step": "step", "time": "training time (s)"}


@dataclasses.dataclass
class Curves:
    """One run's losses against step, tokens and time; the held-out points take their tokens
    and time from the training lines (eval lines carry only the step)."""

    label: str
    train: dict[str, list[float]]  # x axis or "loss" -> values, one per training line
    held_out: dict[str, list[float]]  # x axis or "loss" -> values, one per held-out line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.plot", description=__doc__.split("\n\n")[1])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run folders (each with a metrics.jsonl)")
    parser.add_argument("--x", choices=X_AXES, default="tokens", help="horizontal axis (default: tokens)")
    parser.add_argument(
        "-o", "--out", help="PNG to write (default: DIR/loss.png for one run, loss.png for several)"
    )
    parser.add_argument("--ylim", nargs=2, type=float, metavar=("LOW", "HIGH"), help="loss axis range")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = Path(args.out) if args.out else default_out(args.dirs)
        plot_runs(args.dirs, x=args.x, out=out, ylim=args.ylim)
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
) -> Figure:
    """A matplotlib Figure of the runs' losses against `x`; saved as a PNG to `out` if given.
    The figure is drawn by Agg without pyplot, so no window opens and a notebook's backend is
    left as it was (show it with `IPython.display.Image(out)` or `display(fig)`)."""
    if x not in X_AXES:
        raise UserError(f"--x {x}: give one of {', '.join(X_AXES)}")
    runs = [read_run(storage.path(d), label) for d, label in zip(dirs, _labels(dirs), strict=True)]
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        ax.plot(run.train[x], run.train["loss"], color=colour, label=f"{run.label} train")
        if run.held_out["loss"]:
            ax.plot(
                run.held_out[x],
                run.held_out["loss"],
                color=colour,
                linestyle="--",
                marker="o",
                label=f"{run.label} held-out",
            )
    _decorate(ax, x, ylim)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return fig


def _decorate(ax: Axes, x: str, ylim: Sequence[float] | None) -> None:
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel("loss (nats per token)")
    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter())  # 1.5M rather than 1.5e6
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend()


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
    train_x = {
        "step": [float(r["step"]) for r in train],
        "tokens": [float(r["tokens"]) for r in train],
        "time": _continued_time([float(r["time"]) for r in train]),
    }
    steps = [float(r["step"]) for r in held_out]
    return Curves(
        label,
        train={**train_x, "loss": [r["loss"] for r in train]},
        held_out={
            "step": steps,
            "tokens": _at_steps(steps, train_x["step"], train_x["tokens"]),
            "time": _at_steps(steps, train_x["step"], train_x["time"]),
            "loss": [r["eval_loss"] for r in held_out],
        },
    )


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


def _at_steps(steps: list[float], known_steps: list[float], known: list[float]) -> list[float]:
    """`known` (tokens or time at the training lines) at `steps`, linearly interpolated."""
    return np.interp(steps, known_steps, known).tolist()


if __name__ == "__main__":
    sys.exit(main())
