"""The training loop: `run(exp, workdir)` builds the mesh, data, sharded state (resumed from the
workdir's newest checkpoint where there is one: resume.py) and jitted step, and trains, logging
to WORKDIR/metrics.jsonl and saving checkpoints (checkpoint.py). The workdir may be a local
folder or a bucket (storage.py). `lmjax.train` is its command line.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable

import jax

from lmjax import (
    checkpoint,
    config,
    distributed,
    evaluate,
    flops,
    optim,
    resume,
    run_lock,
    sharding,
    step,
    storage,
    xla_flags,
)
from lmjax.data import cache, loader
from lmjax.metrics import Logger, StepTrace, Throughput, records
from lmjax.stop_signals import StopRequests

_EVAL_LOGGED = ("eval_loss", "eval_perplexity", "eval_bpb")  # the numbers lmjax.evaluate writes

# Signs of an accelerator that jax could use, cheap to look for: NVIDIA's tool or device file, a
# TPU VM's chips (/dev/accel* on v2-v4, VFIO groups on v5e and later).
NVIDIA_SMI = "nvidia-smi"
NVIDIA_DEVICES = ("/dev/nvidia0",)
TPU_DEVICES = ("/dev/accel0", "/dev/vfio/[0-9]*")


class Diverged(Exception):
    """The loss or gradient became non-finite: exit status 3, the last good checkpoint kept."""


def run(exp: config.Experiment, workdir: storage.PathLike) -> dict[str, float]:
    """Train `exp` (validated) in `workdir`, resuming from its newest checkpoint if it has one;
    returns the last logged metrics and held-out results. Once training starts, SIGTERM/SIGINT
    stop it after the current step with a checkpoint (stop_signals); before, nothing is lost to
    them. A workdir that cannot be written stops the run before any work (UserError), a
    checkpoint that cannot be saved stops it at that save (checkpoint.SaveFailed)."""
    # Both before anything touches the devices: XLA reads its flags when the backend starts.
    if exp.train.xla_flags:
        xla_flags.apply(log=_print)
    distributed.initialize(exp.train.heartbeat_timeout_s, log=_print)
    if warning := unused_accelerator_warning(jax.default_backend()):
        _print(f"lmjax: warning: {warning}")

    workdir = storage.path(workdir)
    sharding.mesh_shape(exp, jax.device_count())  # the mesh and batch, before any tokenizing
    new_folder = not storage.is_bucket(workdir) and not workdir.exists()
    storage.check_writable(workdir, "the workdir")  # a bad bucket or credentials: exit 2 now
    # Before Orbax opens the checkpoints: its clean-up would delete a running trainer's save.
    lock = _take_lock(workdir)
    try:
        return _run_locked(exp, workdir)
    finally:
        if lock is not None:
            lock.release()
        # process 0's alone: another process's removal would pull the folder from under it
        if new_folder and distributed.is_main() and [p.name for p in workdir.iterdir()] == [run_lock.NAME]:
            (workdir / run_lock.NAME).unlink()  # a run that stopped before writing anything leaves
            workdir.rmdir()  # no folder behind (a bad data.path, say)


def _take_lock(workdir: storage.Path) -> run_lock.RunLock | None:
    """Process 0 holds the run's lock; every process exits 2 together if another trainer has it."""
    lock, refusal = None, ""
    if distributed.is_main():
        try:
            lock = run_lock.acquire(workdir)
        except config.UserError as e:
            refusal = str(e)
    refusals = [r for r in distributed.agree("run lock", refusal) if r]
    if refusals:
        if lock is not None:
            lock.release()
        raise config.UserError(refusals[0])
    return lock


def _run_locked(exp: config.Experiment, workdir: storage.Path) -> dict[str, float]:
    ckpts = checkpoint.Checkpoints(workdir, exp.checkpoint, log=_print)
    try:
        return _train(exp, workdir, ckpts)
    except KeyboardInterrupt:  # a second Ctrl-C: out at once (an unfinished save is never taken)
        raise
    except BaseException:  # a save in flight finishes, and Orbax is closed (else it reports at exit)
        _finish_saving(ckpts)
        raise


def _train(exp: config.Experiment, workdir: storage.Path, ckpts: checkpoint.Checkpoints) -> dict[str, float]:
    exp = resume.with_absolute_paths(exp)
    exp = resume.check_workdir(exp, workdir, ckpts)  # before any tokenizing
    _require_prepared(exp)
    # Process 0 builds the token cache first: on a shared file system the others then read it.
    corpus = distributed.main_first(lambda: cache.load_or_build(exp.data, log=_print), "token cache")
    distributed.require_same(
        "corpus identity", corpus.identity, "give every host the same data files and data.* settings"
    )
    exp = resume.resolve_from_data(exp, corpus)
    mesh = sharding.make_mesh(exp)  # checked again, now that the vocabulary is known
    m, t = exp.model, exp.train
    tx = optim.make(exp.optim, t.steps)
    with sharding.use(mesh, exp.mesh.rules):
        graphdef, state, shardings, saved = resume.start_state(exp, workdir, corpus, ckpts, tx, mesh, _print)
    first = saved.step if saved else 0
    _write_run_files(workdir, exp, corpus)
    if first == t.steps and _final_evaluation_logged(workdir, t.steps):
        _print(f"the run in {workdir} already reached train.steps={t.steps}; raise it to train on")
        ckpts.close()
        return {}

    peak = flops.peak_tflops(jax.devices()[0].device_kind, t.peak_tflops)
    tokens_per_step = t.batch_size * m.seq_len
    log = Logger(workdir, t.steps, first, t.progress, active=distributed.is_main(), tensorboard=t.tensorboard)
    log.print(
        f"{exp.name}: {m.flavour} {flops.count_params(m) / 1e6:.1f}M params, mesh data x fsdp x tensor = "
        f"{' x '.join(map(str, mesh.devices.shape))} on {jax.device_count()} {jax.default_backend()} devices"
    )

    with sharding.use(mesh, exp.mesh.rules), StopRequests() as stop:
        placement = sharding.BatchPlacement(mesh, t.batch_size)
        held_out = evaluate.held_out(
            exp, corpus, graphdef, shardings["params"], placement, "validation", t.eval_batches
        )
        if first == t.steps:  # its last checkpoint was saved, then the run stopped before evaluating it
            scores = held_out(state["params"])
            log.write({"step": first, **{k: scores[k] for k in _EVAL_LOGGED}})
            log.print(_held_out_note(first, scores))
            log.close()
            ckpts.close()
            return scores
        train_step = step.make_train_step(graphdef, tx, exp, shardings, mesh)
        source = loader.TrainBatches(
            corpus.splits("train"), corpus.weights, m.seq_len, t.batch_size, t.seed, rows=placement.rows
        )
        if saved:
            source.set_state(saved.data["loader"])
        # The next batch goes to the devices while a step runs; its state is that of the batch
        # the next step takes, which is what a checkpoint must hold.
        train_batches = loader.DevicePrefetch(source, placement.put)
        # `time` runs on from the last kept line of a resumed run (metrics.Logger.time_offset)
        start, throughput = time.time() - log.time_offset, Throughput()
        last: dict[str, float] = {}
        saves = _Saves(ckpts, log.print)

        def settle(done: int, metrics: dict[str, jax.Array]) -> None:
            """Read step `done`'s metrics (the device has the next step queued meanwhile), stop
            on a non-finite loss or gradient, and log the steps that are logged."""
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
                saves.wait()
                what = f"loss {values['loss']}, gradient norm {values['grad_norm']}"
                raise Diverged(_diverged_message(done, what, ckpts.steps()))
            compiled_here = done == first + 1 and t.steps > done  # this step holds the compilation
            if done % t.log_every == 0 or done == t.steps:
                tokens = done * tokens_per_step
                record = {"step": done, **values, "tokens": tokens, "time": time.time() - start}
                if not compiled_here:
                    record["tokens_per_s"] = throughput.read(tokens)
                    if peak:
                        record["mfu"] = flops.mfu(record["tokens_per_s"], m, mesh.devices.size, peak)
                log.write(record)
                last.update(record)
            if compiled_here:
                throughput.restart(done * tokens_per_step)

        pending = None  # (step, metrics) read one step late: the device is busy meanwhile
        trace = StepTrace(workdir / "profile", t.profile_steps, log.print)
        every = exp.checkpoint.every
        stop_vote = distributed.StopVote(mesh)
        stopped_at = 0
        try:
            for done in range(first + 1, t.steps + 1):
                trace.before(done)
                state, metrics = train_step(state, next(train_batches))
                trace.after(done, metrics)
                if pending:
                    settle(*pending)
                pending = (done, metrics)
                log.advance()
                saves.note_if_finished()
                save_due = (every and done % every == 0) or done == t.steps
                evaluate_now = (t.eval_every and done % t.eval_every == 0) or done == t.steps
                stopping = done < t.steps and stop_vote(done, stop.requested)  # at the last step: finish
                if done == first + 1 or save_due or evaluate_now or stopping:
                    settle(*pending)  # a checkpoint is written only after its loss is known finite
                    pending = None
                    stopping = done < t.steps and stop_vote(done, stop.requested)  # a signal during that wait
                if save_due or stopping:
                    # The loss of step `done` was that of the parameters before its update: the
                    # updated ones a checkpoint would keep are checked on a held-out batch.
                    check = held_out.first_batch_loss(state["params"])
                    if not math.isfinite(check):
                        saves.wait()
                        what = f"its update gives parameters whose held-out loss is {check}"
                        raise Diverged(_diverged_message(done, what, ckpts.steps()))
                    saves.save(done, state, checkpoint.data_state(train_batches.get_state(), corpus), exp)
                    log.sync()  # a bucket's copy of the metrics: every step up to this checkpoint
                if stopping:
                    stopped_at = done
                    break
                if evaluate_now:
                    scores = held_out(state["params"])
                    last.update(scores)
                    log.write({"step": done, **{k: scores[k] for k in _EVAL_LOGGED}})
                    log.print(_held_out_note(done, scores))
                    log.sync()
                    throughput.restart(done * tokens_per_step)
        except BaseException:
            trace.stop()  # a trace an error cut short
            log.close(quietly=True)  # what was logged is kept (and uploaded to a bucket)
            raise
        trace.stop()
        saves.wait()  # the last save: SaveFailed (exit 2) if it could not be written
        ckpts.close()
        log.close()
    if stopped_at:
        by = stop.requested or "a signal to another process"
        _print(
            f"stopped by {by} at step {stopped_at} of {t.steps}; saved in {ckpts.folder / str(stopped_at)}; "
            "run the same command to resume"
        )
        return last
    _print(
        f"done: {t.steps} steps, loss {last['loss']:.4f}, held-out loss {last['eval_loss']:.4f}, "
        f"{last['eval_bpb']:.4f} bits/byte ({workdir})"
    )
    return last


class _Saves:
    """The run's checkpoint saves, each noted ("step N: checkpoint saved to DIR") once it is
    complete on disk: a save is written in the background, so its note comes steps later."""

    def __init__(self, ckpts: checkpoint.Checkpoints, log: Callable[[str], None]):
        self._ckpts, self._log = ckpts, log
        self._writing: int | None = None  # the step whose save may still be running
        self._failure: checkpoint.SaveFailed | None = None  # found early, raised on time

    def save(self, done: int, state: step.State, data: dict, exp: config.Experiment) -> None:
        self.wait()  # the save before: noted before this one starts
        self._ckpts.save(state, data, exp)
        self._writing = done

    def note_if_finished(self) -> None:
        """Note the save in flight if it has finished; never waits. A failed one is raised at
        the next save or the end: processes may see it finish at different steps, but meet
        those at the same one."""
        if self._writing is not None and not self._ckpts.saving():
            try:
                self.wait()
            except checkpoint.SaveFailed as e:
                self._failure = e

    def wait(self) -> None:
        """Wait for the save in flight and note it; checkpoint.SaveFailed if it failed."""
        if self._failure is not None:
            raise self._failure
        self._ckpts.wait()
        if self._writing is not None:
            self._log(f"step {self._writing}: checkpoint saved to {self._ckpts.folder / str(self._writing)}")
            self._writing = None


def _held_out_note(done: int, scores: dict[str, float]) -> str:
    return f"step {done}: held-out loss {scores['eval_loss']:.4f}, {scores['eval_bpb']:.4f} bits/byte"


def unused_accelerator_warning(backend: str) -> str:
    """A warning when jax runs on the CPU (`backend`) of a machine with an NVIDIA GPU or a TPU,
    naming the lmjax extra that brings jax's wheels for it; "" otherwise, and when JAX_PLATFORMS
    chose the platform."""
    if backend != "cpu" or os.environ.get("JAX_PLATFORMS"):
        return ""
    if any(glob.glob(pattern) for pattern in TPU_DEVICES):
        return "this machine has a TPU but jax runs on the CPU; for jax's TPU wheels: pip install -e '.[tpu]'"
    if shutil.which(NVIDIA_SMI) or any(glob.glob(pattern) for pattern in NVIDIA_DEVICES):
        return (
            "this machine has an NVIDIA GPU but jax runs on the CPU; for jax's CUDA wheels: "
            "pip install -e '.[cuda]' (NVIDIA driver 580 or newer; '.[cuda12]' below)"
        )
    return ""


def _diverged_message(step: int, what: str, saved_steps: list[int]) -> str:
    kept = "no checkpoint was saved"
    if saved_steps:
        kept = f"the newest checkpoint, step {saved_steps[-1]}, is the last good state"
    return (
        f"step {step}: {what}; stopped without saving it: {kept}. Lower optim.lr or raise "
        "optim.warmup_steps, then run again to resume"
    )


def _write_run_files(workdir: storage.Path, exp: config.Experiment, corpus: cache.Corpus) -> None:
    """The resolved config (replaced whole, never half-written) and the tokenizer, by process 0."""
    if not distributed.is_main():
        return
    storage.write_atomic(workdir / "config.json", (json.dumps(config.to_dict(exp), indent=2) + "\n").encode())
    corpus.tokenizer.save(workdir / "tokenizer.model")


def _require_prepared(exp: config.Experiment) -> None:
    """In a run of several processes, a missing token cache of more than data.max_build_mb of
    input is a UserError on every process: tokenizing it on process 0 would keep every other
    host waiting (hours for a large corpus), so it is prepared first, on Apache Beam."""
    if jax.process_count() == 1:
        return
    missing = 0 if cache.is_built(exp.data) else cache.input_bytes(exp.data)
    most = max(int(v) for v in distributed.agree("token cache input to build", str(missing)))
    if most > exp.data.max_build_mb * 1e6:
        raise config.UserError(
            f"the token cache of this corpus ({most / 1e9:.1f} GB of input) is missing, and a run of "
            f"{jax.process_count()} processes tokenizes at most data.max_build_mb={exp.data.max_build_mb} "
            f"MB itself; prepare it first on Apache Beam: python -m lmjax.data prepare --experiment "
            f"{exp.name} (with this run's --set flags) --runner DirectRunner --direct_num_workers=N "
            "--direct_running_mode=multi_processing (or Dataflow: docs/data-at-scale.md), into a "
            "data.cache_dir every host reads"
        )


def _final_evaluation_logged(workdir: storage.Path, steps: int) -> bool:
    """Whether metrics.jsonl holds the held-out result of step `steps` (the end of the run)."""
    path = workdir / "metrics.jsonl"
    logged = records(path.read_text()) if path.exists() else []
    return any(r["step"] == steps and "eval_loss" in r for r in logged)


def _print(message: str) -> None:
    """Progress notes, from process 0 only (errors go through lmjax.train, from every process)."""
    if distributed.is_main():
        print(message, file=sys.stderr)


def _finish_saving(ckpts: checkpoint.Checkpoints) -> None:
    """Let a save in flight (a good state) complete after an error ended the loop; a failure
    here is reported, not raised over that error."""
    try:
        ckpts.wait()
        ckpts.close()
    except Exception as e:  # noqa: BLE001
        _print(f"lmjax: warning: the last checkpoint save failed: {type(e).__name__}: {e}")
