"""A run's checkpoints, on Orbax: `WORKDIR/checkpoints/<step>/` holds four items, saved and
restored together:

  params       the model's parameters, alone, so evaluation and generation skip the rest
  train_state  optimizer state, step and RNG key
  data         the loader's position (the batch the next step takes) and the corpus' cache key
               and identity (`Corpus.identity`)
  config       the resolved experiment

Saves are asynchronous: the arrays are copied off the devices before `save` returns, then
written in the background into `<step>.orbax-checkpoint-tmp`, which is renamed into place only
when every item is written; on a bucket, which has no rename, Orbax writes `<step>/` directly
and marks it complete with a `commit_success.txt` object written last. A killed save is
therefore never listed, and its leftovers are removed when the next run opens the folder. A
save that fails raises `SaveFailed` (exit 2), naming the step that was not saved. Arrays are
stored by tensorstore (zarr/OCDBT) and everything else as JSON: nothing in a checkpoint runs
code when it is read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from lmjax import config, distributed, sharding, step, storage
from lmjax.config import UserError

if TYPE_CHECKING:  # for a type only: the data stack (sentencepiece) stays off generation's path
    from lmjax.data.cache import Corpus

Log = Callable[[str], None]


# When a save fails (a full disk, a bucket gone), Orbax's threads log a traceback for each array
# and tensorstore's callbacks find Orbax's event loop closed; the failure is raised to lmjax as
# well, which reports it in one line (SaveFailed). These keep the one line from being buried.
class _FailedSaveTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        from_orbax = "orbax" in record.pathname or "orbax" in text or "tensorstore_spec" in text
        return not (from_orbax and record.levelno >= logging.ERROR)


Unraisable = Callable[["sys.UnraisableHookArgs"], object]


def _quiet_closed_loops(default: Unraisable) -> Unraisable:
    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        closed = (
            isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
        )
        if not closed:
            default(unraisable)

    return hook


logging.getLogger("absl").addFilter(_FailedSaveTracebacks())
logging.getLogger("asyncio").addFilter(_FailedSaveTracebacks())
sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)


class SaveFailed(UserError):
    """A checkpoint could not be written (no space, no permission, the bucket gone): exit 2,
    with the step that was not saved and why."""


@dataclasses.dataclass
class Saved:
    """A checkpoint's step and its JSON items, read before its arrays are."""

    step: int
    exp: config.Experiment
    data: dict


class Checkpoints:
    """Save and restore the checkpoints of the run in `workdir`."""

    def __init__(
        self,
        workdir: storage.PathLike,
        cfg: config.Checkpoint | None = None,
        log: Log = print,
        read_only: bool = False,
    ):
        """`read_only`: for reading another run's checkpoints (it may be saving right now):
        nothing is cleaned up, renamed or written."""
        cfg = cfg or config.Checkpoint()
        self.folder, self.log, self.read_only = storage.path(workdir) / "checkpoints", log, read_only
        self._in_flight: int | None = None  # the step of the save that may still be running
        self._closed = False
        keep: list[ocp.checkpoint_managers.PreservationPolicy] = [ocp.checkpoint_managers.LatestN(n=cfg.keep)]
        if cfg.keep_every:
            keep.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=cfg.keep_every))
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if read_only:  # orbax warns that a read-only manager will not save: we know
            absl_log.setLevel(logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
                enable_async_checkpointing=True,
                cleanup_tmp_directories=not read_only,  # what a killed save of this run left
                read_only=read_only,
                create=False,
            )
            self._manager = ocp.CheckpointManager(self.folder, options=options)
        finally:
            absl_log.setLevel(level)

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint folder, oldest first (their contents unchecked)."""
        return sorted(self._manager.all_steps()) if self.folder.is_dir() else []

    def newest_readable(self) -> Saved | None:
        """The JSON items of the newest checkpoint whose JSON reads back: a cheap first look."""
        for s in reversed(self.steps()):
            try:
                return self._read_json(s)
            except Exception:  # noqa: BLE001 - restore_newest reports it
                continue
        return None

    def save(self, state: step.State, data: dict, exp: config.Experiment) -> None:
        """Start saving `state` (at its step) with the loader state `data`; returns once the
        arrays are off the devices, so the next step may reuse (donate) their buffers."""
        items = _pack(state)
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(items["params"]),
            train_state=ocp.args.StandardSave(items["train_state"]),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config.to_dict(exp)),
        )
        s = int(jax.device_get(state["step"]))
        self.wait()  # what failed in the background save before this one is reported as its own
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._manager.save(s, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - tensorstore, gcsfs and the OS raise many types
            raise self._failed(e, s) from e
        self._in_flight = s

    def saving(self) -> bool:
        """Whether a save is still being written in the background (a cheap check: no waiting)."""
        return self._manager.is_saving_in_progress()

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete on disk; SaveFailed if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, self._in_flight) from e
        finally:
            self._in_flight = None

    def _failed(self, e: Exception, s: int | None) -> SaveFailed:
        which = f"the checkpoint of step {s}" if s is not None else "a checkpoint"
        return SaveFailed(
            f"{which} was not saved in {self.folder} ({storage.describe_error(e)}); free space or "
            "fix the permissions there, then run again to resume from the newest saved step"
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._manager.close()

    def restore_newest(
        self, target: Callable[[Saved], step.State], items: tuple[str, ...] = ("params", "train_state")
    ) -> tuple[Saved, step.State] | None:
        """The newest checkpoint that reads back whole, or None when there are none.

        `target(saved)` gives the abstract state (shapes and shardings, on any mesh) to restore
        into, and may raise UserError to refuse the checkpoint. A damaged checkpoint (empty,
        truncated, a file missing) is reported and the one before it tried; once an older one
        has restored, the damaged newer ones are renamed `<step>.damaged` so later saves can
        take their steps. With none readable the run stops (exit 2) and nothing is renamed. Any
        other failure (memory, a shape that does not fit) stops at once, with nothing renamed."""
        damaged: list[tuple[int, str]] = []
        for s in reversed(self.steps()):
            try:
                saved = self._read_json(s)
            except Exception as e:  # noqa: BLE001 - sorted by _is_damage
                self._damaged(s, e, damaged)
                continue
            abstract = _pack(target(saved))  # a UserError here is the user's to fix: not damage
            args = ocp.args.Composite(**{k: ocp.args.StandardRestore(abstract[k]) for k in items})
            try:
                restored, failure = self._manager.restore(s, args=args), None
                if not _all_finite(restored["params"]):  # bytes that read back, but as NaN or inf
                    failure = NonFinite("its parameters hold NaN or inf")
            except Exception as e:  # noqa: BLE001
                failure = e
            failure = _agreed_failure(s, failure, self.folder / str(s))
            if failure is not None:
                self._damaged(s, failure, damaged)
                continue
            if not self.read_only:
                for bad, _ in damaged:
                    self._set_aside(bad)
            return saved, _unpack(restored)
        if damaged:
            listing = "; ".join(f"step {s}: {why}" for s, why in damaged)
            raise UserError(
                f"no usable checkpoint in {self.folder} ({listing}); restore a copy, or move the folder "
                "away to start this run over"
            )
        return None

    def _read_json(self, s: int) -> Saved:
        json_items = ocp.args.Composite(data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
        items = self._manager.restore(s, args=json_items)
        return Saved(s, config.from_dict(items["config"]), dict(items["data"]))

    def _damaged(self, s: int, e: Exception, damaged: list[tuple[int, str]]) -> None:
        """Note checkpoint `s` as damaged, or re-raise what is not damage as a UserError."""
        where = self.folder / str(s)
        if not _is_damage(e):
            raise UserError(
                f"could not restore {where} ({_short(e)}); its files look intact: fix the cause "
                "(memory, a changed model) and run again"
            ) from e
        damaged.append((s, _short(e)))
        self.log(f"checkpoint {where} is damaged ({_short(e)}); trying the one before it")

    def _set_aside(self, s: int) -> None:
        src = self.folder / str(s)
        dst = src.with_name(f"{s}.damaged")
        n = 1
        while dst.exists():
            dst, n = src.with_name(f"{s}.damaged{n}"), n + 1
        if jax.process_index() == 0 and src.exists():
            storage.move_folder(src, dst)
            self.log(f"moved the damaged checkpoint {src} to {dst}")
        if jax.process_count() > 1:  # every process sees the rename before it lists steps again
            multihost_utils.sync_global_devices(f"lmjax set aside checkpoint {s}")
        self._manager.reload()


def load_params(
    workdir: storage.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    model: config.Model | None = None,
    log: Log = print,
) -> tuple[nnx.State, config.Experiment]:
    """(parameters, resolved experiment) from the newest usable checkpoint of the run in
    `workdir`, without reading its optimizer state (`load_newest`)."""
    params, saved = load_newest(workdir, mesh, model, log)
    return params, saved.exp


# What generation and evaluation may change of a run's experiment: how they run, not shapes.
READ_MAY_CHANGE = (
    "mesh.",
    "train.batch_size",
    "model.attention",
    "model.dtype",
    "model.scan_layers",
    "model.remat",
    "model.loss_chunk",
)


def saved_experiment(workdir: storage.PathLike, overrides: list[str], log: Log = print) -> Saved:
    """The newest checkpoint's step and JSON items in `workdir`, its experiment with `overrides`
    (READ_MAY_CHANGE: the mesh mostly) applied and checked against this machine's devices: what
    generation and evaluation run."""
    for override in overrides:
        key = override.partition("=")[0].strip()
        if not key.startswith(READ_MAY_CHANGE):
            raise UserError(
                f"--set {key}: reading a run may change only {', '.join(READ_MAY_CHANGE)}; the "
                "rest is the checkpoint's"
            )
    saved = newest_saved(workdir, log)
    exp = config.apply_overrides(saved.exp, overrides)
    config.validate(exp)
    sharding.mesh_shape(exp, jax.device_count())  # a bad --set mesh.* fails before the tokenizer loads
    return dataclasses.replace(saved, exp=exp)


def newest_saved(workdir: storage.PathLike, log: Log = print) -> Saved:
    """The step and JSON items of the newest checkpoint of the run in `workdir` whose JSON reads
    back, read without touching the run (it may be training); UserError when there is none."""
    ckpts = Checkpoints(workdir, log=log, read_only=True)
    try:
        saved = ckpts.newest_readable()
    finally:
        ckpts.close()
    if saved is None:
        raise _no_checkpoint(workdir)
    return saved


def _no_checkpoint(workdir: storage.PathLike) -> UserError:
    return UserError(f"{storage.path(workdir)} holds no checkpoint; train a run there first (lmjax.train)")


def load_newest(
    workdir: storage.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    model: config.Model | None = None,
    log: Log = print,
) -> tuple[nnx.State, Saved]:
    """(parameters, the checkpoint's step and JSON items) from the newest usable checkpoint of
    the run in `workdir`, without reading its optimizer state.

    `mesh`: lay them out on it by the experiment's rules (run inside `sharding.use`); default:
    on this process's first device. `model`: restore into this model's dtypes instead of the saved one's,
    after checking that every parameter has the same shape (a warm start). UserError (exit 2)
    when there is no checkpoint or a shape differs."""
    workdir = storage.path(workdir)
    ckpts = Checkpoints(workdir, log=log, read_only=True)  # that run may be saving right now
    if not ckpts.steps():
        raise _no_checkpoint(workdir)

    def target(saved: Saved) -> step.State:
        _, abstract = step.abstract_model(saved.exp.model)
        if model is not None:
            _, ours = step.abstract_model(model)
            _check_same_shapes(abstract, ours, f"{workdir} (step {saved.step})")
            abstract = ours
        if mesh is None:
            shardings = jax.tree.map(
                lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract
            )
        else:
            shardings = sharding.state_shardings(abstract, mesh)
        return {"params": step.with_shardings(abstract, shardings)}

    try:
        found = ckpts.restore_newest(target, items=("params",))
    finally:
        ckpts.close()
    assert found is not None  # there were steps: restore_newest returned one or raised
    saved, restored = found
    return restored["params"], saved


def _check_same_shapes(saved: nnx.State, ours: nnx.State, where: str) -> None:
    theirs = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(saved)}
    mine = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(ours)}
    for name in sorted(theirs.keys() | mine.keys()):
        if theirs.get(name) != mine.get(name):
            raise UserError(
                f"checkpoint.init_from: parameter {name} has shape {theirs.get(name)} in {where} but "
                f"{mine.get(name)} in this model; a warm start needs the same model.* shapes"
            )


def _pack(state: step.State) -> dict[str, Any]:
    """The train state dict -> the checkpoint's array items (params apart from the rest)."""
    return {"params": state["params"], "train_state": {k: v for k, v in state.items() if k != "params"}}


def _unpack(restored: Mapping[str, Any]) -> step.State:
    """Orbax's Composite result -> the train state dict."""
    out = {"params": restored["params"]}
    if "train_state" in restored:
        out.update(restored["train_state"])
    return out


class NonFinite(ValueError):
    """A checkpoint whose parameters read back with NaN or inf in them."""


def _all_finite(tree: nnx.State) -> bool:
    """Whether this process's shards of every leaf are finite, checked on the host: the leaves
    of a restored state may lie on other devices than the mesh in use. (Processes compare
    their answers in `_agreed_failure`.)"""
    shards = (s.data for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.replica_id == 0)
    return all(np.isfinite(np.asarray(shard)).all() for shard in shards)


# Failures that mean a checkpoint's files are missing or corrupt, as tensorstore, orbax and
# json report them, or hold values no training step makes good use of; anything else (out of
# memory, a shape mismatch) is not the files' fault.
_DAMAGE_TYPES = (FileNotFoundError, EOFError, json.JSONDecodeError, NonFinite)
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")


def _agreed_failure(s: int, failure: Exception | None, where: storage.Path) -> Exception | None:
    """This process's restore outcome of step `s`, made the same on every process. Each reads
    only its own shards, so a damaged one may fail on its process alone; then the others wait
    in Orbax's barrier after their reads and cannot follow it to an older step: this process
    stops the run (exit 2; the others end through the heartbeat) and says what to move."""
    verdict = "ok" if failure is None else "damaged" if _is_damage(failure) else "failed"
    try:  # processes that failed too answer at once; ones that read theirs never answer
        verdicts = distributed.agree(
            f"restore {s}", verdict, distributed.prompt_answer_s if failure else distributed.WAIT_S
        )
    except Exception:  # noqa: BLE001 - jax's DEADLINE_EXCEEDED
        raise UserError(
            f"could not restore {where} on this process ({_short(failure)}) while other processes "
            f"could; move {where} aside (or restore its files) and run again"
        ) from failure
    worst = next((v for v in ("failed", "damaged") if v in verdicts), "ok")
    if worst == verdict:
        return failure
    at = f"process {verdicts.index(worst)}"  # what this process reports as its own failure
    return FileNotFoundError(f"damaged on {at}") if worst == "damaged" else RuntimeError(f"failed on {at}")


def _is_damage(e: BaseException | None) -> bool:
    while e is not None:
        text = str(e).strip("'\"")
        if isinstance(e, _DAMAGE_TYPES) or text.startswith(_DAMAGE_CODES):
            return True
        if isinstance(e, KeyError) and "was not found in the checkpoint" in text:  # an empty folder
            return True
        e = e.__cause__ or e.__context__
    return False


def _short(e: Exception) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:160]}"


def data_state(loader_state: dict, corpus: Corpus) -> dict:
    """The `data` item: where the loader is, and which tokenized corpus it walks (the cache
    entry's key, and `Corpus.identity`, which survives moving the files)."""
    return {
        "loader": json.loads(json.dumps(loader_state)),  # fails here, not in the background save
        "corpus": corpus.entry.name,
        "identity": corpus.identity,
    }
