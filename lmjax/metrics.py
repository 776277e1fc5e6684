"""Run output: `WORKDIR/metrics.jsonl` (one JSON object per logged step), a progress bar (a
widget in Jupyter and Colab, text in a terminal), and TensorBoard event files in
`WORKDIR/tensorboard` when asked (`train.tensorboard`).

A bucket has no append: for a workdir there, these files grow in a local staging folder and
are uploaded whole at every checkpoint, evaluation and at the end (`Logger.sync`), so a step
costs no request; what a preempted host had not uploaded belongs to steps after the newest
checkpoint, which the resumed run redoes and logs again."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
from tqdm.auto import tqdm

from lmjax import storage
from lmjax.config import UserError

Record = dict[str, float]  # one metrics.jsonl line: "step" and what was measured at it


class Logger:
    """Appends to metrics.jsonl, which keeps one consistent history: a run that restarts at
    `first_step` (a resume, or step 0) first moves the lines of later steps, whose work is
    being redone, to metrics.discarded.jsonl. `active=False` (all processes but the first of a
    multi-process run): writes and prints nothing. `tensorboard=True`: every record's metrics
    also go to TensorBoard scalars in WORKDIR/tensorboard.

    `time_offset`: the `time` of the last line kept (0 if none), where a resumed session's
    clock starts, so `time` in metrics.jsonl runs on across sessions; the time between a
    session's last logged line and its stop is not counted.

    The bar's clock starts when the first step is done: that step holds the compilation, which
    would make the first rate and time left far off the steady ones."""

    def __init__(
        self,
        workdir: storage.Path,
        total_steps: int,
        first_step: int = 0,
        progress: bool = True,
        active: bool = True,
        tensorboard: bool = False,
    ):
        self._file = None
        self._tensorboard = None
        self.time_offset = 0.0
        # where the files grow: the workdir itself, or a local stand-in for a bucket's
        self._bucket = workdir if storage.is_bucket(workdir) else None
        self._local = storage.staging_folder() if self._bucket else workdir
        if active:
            kept = _discard_after(workdir / "metrics.jsonl", first_step, workdir / "metrics.discarded.jsonl")
            self.time_offset = next((r["time"] for r, _ in reversed(kept) if "time" in r), 0.0)
            if self._bucket:
                (self._local / "metrics.jsonl").write_text("".join(line for _, line in kept))
            self._file = open(self._local / "metrics.jsonl", "a")
            if tensorboard:
                self._tensorboard = TensorBoard(self._local / "tensorboard", first_step)
        self._bar = tqdm(
            total=total_steps,
            initial=first_step,
            disable=not (progress and active),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self._clock_started = False

    def write(self, record: Record) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: say which file could not take the line
            raise OSError(e.errno, e.strerror, self._file.name) from None
        if self._tensorboard is not None:
            self._tensorboard.write(record)
        shown = {
            k: record[k] for k in ("loss", "eval_loss", "eval_bpb", "tokens_per_s", "mfu") if k in record
        }
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._clock_started:
            self._bar.update(steps)
            return
        # The first steps: counted, but left out of the rate, as `initial` steps are.
        self._clock_started = True
        self._bar.n = self._bar.initial = self._bar.last_print_n = self._bar.n + steps
        self._bar.unpause()  # the clock starts now
        self._bar.refresh()

    def print(self, message: str) -> None:
        """A line kept above the bar (process 0's only)."""
        if self._file is not None:
            self._bar.write(message, file=sys.stderr)

    def sync(self) -> None:
        """Upload the files to a bucket workdir, each replaced whole (local workdirs: nothing to do)."""
        if self._bucket is not None and self._file is not None:
            self._file.flush()
            storage.upload_folder(self._local, self._bucket)

    def close(self, quietly: bool = False) -> None:
        """Close the files (and upload them to a bucket workdir). `quietly`: after an error,
        which a failure here must not hide (a full disk fails both)."""
        try:
            self._bar.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
            self.sync()
        except Exception:
            if not quietly:
                raise
        finally:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    if not quietly:
                        raise
            if self._bucket is not None:
                shutil.rmtree(self._local, ignore_errors=True)


class TensorBoard:
    """Scalars for TensorBoard (tensorboardX: no TensorFlow needed), tagged with metrics.jsonl's
    keys. A run restarting at `first_step` marks the steps after it as purged, so TensorBoard
    shows redone steps once, as metrics.jsonl does."""

    NOT_SCALARS = ("step", "tokens", "time")  # the x axes, not metrics

    def __init__(self, folder: storage.Path, first_step: int):
        try:  # optional: not every accelerator image has tensorboardX
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise UserError(
                "train.tensorboard=true needs tensorboardX: pip install tensorboardX (or set it false)"
            ) from e
        self._writer = SummaryWriter(str(folder), purge_step=first_step + 1)

    def write(self, record: Record) -> None:
        for key, value in record.items():
            if key not in self.NOT_SCALARS:
                self._writer.add_scalar(key, value, record["step"])
        self._writer.flush()  # a run that dies without close (a non-finite loss) keeps its scalars

    def close(self) -> None:
        self._writer.close()


def _discard_after(path: storage.Path, step: int, discarded: storage.Path) -> list[tuple[Record, str]]:
    """Moves the lines of steps after `step` to `discarded`; returns the (record, line) kept."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    records = [_record_of(line) for line in lines]  # each line parsed once
    keep = [r is not None and r["step"] <= step for r in records]
    if not all(keep):
        gone = "".join(line for line, k in zip(lines, keep, strict=True) if not k)
        before = discarded.read_text() if discarded.exists() else ""  # no append on a bucket
        storage.write_atomic(discarded, (before + gone).encode())
        storage.write_atomic(path, "".join(line for line, k in zip(lines, keep, strict=True) if k).encode())
    return [(r, line) for r, line, k in zip(records, lines, keep, strict=True) if k]


def records(text: str) -> list[Record]:
    """The records of metrics.jsonl's text, without a line a kill cut short."""
    return [r for r in map(_record_of, text.splitlines()) if r is not None]


def _record_of(line: str) -> Record | None:
    """A line's record, or None for a line cut short by a kill (it counts as a later step)."""
    try:
        record = json.loads(line)
        float(record["step"])
    except (ValueError, KeyError, TypeError):
        return None
    return record


class Throughput:
    """Tokens per second between readings; `restart` leaves out what should not count
    (compilation, evaluation)."""

    def __init__(self) -> None:
        self.restart(0)

    def restart(self, tokens: int) -> None:
        self._time, self._tokens = time.time(), tokens

    def read(self, tokens: int) -> float:
        rate = (tokens - self._tokens) / max(time.time() - self._time, 1e-9)
        self.restart(tokens)
        return rate


class StepTrace:
    """A `jax.profiler` trace of steps first..last (1-based) into `folder`, for TensorBoard's
    profile plugin or Perfetto. The last traced step is waited for, so the trace holds it;
    `stop` ends a trace an error interrupted."""

    def __init__(self, folder: storage.Path, steps: tuple[int, ...], log: Callable[[str], None]):
        self.folder, self.log = folder, log
        self._local = folder
        self.first, self.last = steps if steps else (0, -1)
        self._running = False

    def before(self, step: int) -> None:
        if step == self.first:
            if storage.is_bucket(self.folder):  # jax writes local files: uploaded at the end
                self._local = storage.staging_folder()
            jax.profiler.start_trace(str(self._local))
            self._running = True

    def after(self, step: int, outputs: Any) -> None:
        """`outputs`: the step's results (any pytree of arrays), waited for on the last step."""
        if step == self.last:
            jax.block_until_ready(outputs)
            self.stop()
            self.log(f"profile of steps {self.first}-{self.last} in {self.folder}")

    def stop(self) -> None:
        if self._running:
            jax.profiler.stop_trace()
            self._running = False
            if self._local != self.folder:
                storage.upload_folder(self._local, self.folder)
