"""`train.tensorboard=true`: TensorBoard event files whose scalars are metrics.jsonl's numbers,
redone steps of a resumed run purged. Read back with tensorboardX's protobuf classes and a small
TFRecord reader (tensorboardX has no reader, and TensorBoard's would be another dependency)."""

import shutil
import struct
from pathlib import Path

import pytest
from conftest import metrics_of, tiny_train_argv
from tensorboardX.proto import event_pb2

from lmjax import train

STEPS = ("train.steps=6", "train.log_every=2", "train.eval_every=3", "checkpoint.every=3")


def test_scalars_equal_metrics_jsonl_and_redone_steps_are_purged(tmp_path):
    argv = tiny_train_argv(tmp_path, *STEPS, "train.tensorboard=true")
    assert train.main(argv) == 0
    assert scalars(tmp_path / "tensorboard") == scalars_of_metrics(tmp_path)

    # Resume from step 3: steps 4-6 are redone, and shown once.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    assert train.main(argv) == 0
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    shown = scalars(tmp_path / "tensorboard")
    assert shown == scalars_of_metrics(tmp_path)
    assert [step for step, _ in shown["loss"]] == [2, 4, 6]
    assert [step for step, _ in shown["eval_loss"]] == [3, 6]
    assert {"grad_norm", "lr", "tokens_per_s", "eval_bpb", "eval_perplexity"} <= set(shown)


def test_off_by_default(tmp_path):
    assert train.main(tiny_train_argv(tmp_path, "train.steps=2")) == 0
    assert not (tmp_path / "tensorboard").exists()


def scalars_of_metrics(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for record in metrics_of(workdir):
        for key, value in record.items():
            if key not in ("step", "tokens", "time"):
                # TensorBoard keeps float32
                found.setdefault(key, []).append((record["step"], pytest.approx(value, rel=1e-6)))
    return found


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them: a session start at step S (tensorboardX's
    purge_step) hides the earlier events at steps >= S."""
    events: list[tuple[str, int, float]] = []
    for path in sorted(folder.glob("events.out.tfevents.*")):  # named by start time
        for event in map(event_pb2.Event.FromString, records(path)):
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                events = [e for e in events if e[1] < event.step]
            for value in event.summary.value:
                events.append((value.tag, event.step, value.simple_value))
    found: dict[str, list[tuple[int, float]]] = {}
    for tag, step, value in events:
        found.setdefault(tag, []).append((step, value))
    return found


def records(path: Path) -> list[bytes]:
    """TFRecord framing: length (uint64), its CRC, the data, its CRC (CRCs not checked)."""
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        at += 12
        out.append(data[at : at + length])
        at += length + 4
    return out
