"""Starting a run in its workdir: resume it from its newest checkpoint, warm-start it from
another run's parameters, or begin afresh; and the checks that keep a resumed run the run it
was (config, tokenizer, corpus)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import jax
import optax
from flax import nnx

from lmjax import checkpoint, config, step, storage
from lmjax.config import UserError
from lmjax.data import chat_jinja, loader
from lmjax.data.cache import Corpus

# What a resumed run may change: how it runs, not what it computes. Every other model, data and
# train setting (shapes, seed, batch, corpus, tokenizer) must match the checkpoint's.
RESUME_MAY_CHANGE = (
    "name",
    "mesh.",
    "checkpoint.",
    "optim.",  # announced; those that shape the optimizer state are checked below
    "train.steps",
    "train.microbatches",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.peak_tflops",
    "train.progress",
    "train.profile_steps",
    "train.xla_flags",
    "train.heartbeat_timeout_s",
    "train.tensorboard",
    "model.attention",
    "model.remat",
    "model.remat_names",
    "model.loss_chunk",
    "model.max_segments",
    "model.z_loss",  # the objective only, like optim.*: announced
    "data.cache_dir",
    "data.max_build_mb",
)


def check_resume(
    saved: config.Experiment, new: config.Experiment, step: int, what: str, warm_start_hint: str
) -> list[str]:
    """Raise UserError for a change from `saved` (`what`: the checkpoint at `step`, or a run's
    config.json) that a resumed run cannot take; return the allowed changes to what it
    computes (optimizer settings, the schedule's length), to be announced.
    `new.model.vocab_size=0` means the tokenizer's, i.e. the saved one."""
    if new.model.vocab_size == 0:
        vocab = saved.model.vocab_size
        new = dataclasses.replace(new, model=dataclasses.replace(new.model, vocab_size=vocab))
    # Where the corpus lies may change (the files moved, a relative path became absolute): what
    # it holds is checked once it is tokenized (`Corpus.identity`, in `start_state`).
    moved = [
        f"{k}: {v!r} -> {config.flat(new)[k]!r}"
        for k, v in config.flat(saved).items()
        if k.startswith(("data.path", "data.mixture")) and config.flat(new)[k] != v
    ]
    saved, new = _without_data_paths(saved), _without_data_paths(new)
    before, after = config.flat(saved), config.flat(new)
    changed = [k for k in after if before.get(k) != after[k]]
    for key in changed:
        config.require(
            key.startswith(RESUME_MAY_CHANGE),
            f"{key}={after[key]!r} but {what} was trained with {before.get(key)!r}; a resumed run "
            f"cannot change it: set it back, or start a new --workdir with "
            f"--set checkpoint.init_from={warm_start_hint} to begin from its parameters",
        )
    o, so = new.optim, saved.optim
    config.require(
        o.name == so.name and (o.clip_norm > 0) == (so.clip_norm > 0),
        f"optim.name={o.name}, optim.clip_norm={o.clip_norm} change the optimizer state {what} "
        f"holds (name {so.name}, clip_norm {so.clip_norm}); keep its optimizer or warm-start a new run",
    )
    config.require(
        new.train.steps >= step,
        f"train.steps={new.train.steps} is below step {step} that this run already reached; "
        f"raise train.steps to continue it",
    )
    notes = moved + [
        f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed if k.startswith(("optim.", "model.z_loss"))
    ]
    if "train.steps" in changed:
        notes.append(
            f"train.steps: {saved.train.steps} -> {new.train.steps} (the learning-rate schedule now "
            f"ends at step {new.train.steps})"
        )
    return notes


def _without_data_paths(exp: config.Experiment) -> config.Experiment:
    d = exp.data
    mixture = tuple(dataclasses.replace(s, path="") for s in d.mixture)
    return dataclasses.replace(exp, data=dataclasses.replace(d, path="", mixture=mixture))


def with_absolute_paths(exp: config.Experiment) -> config.Experiment:
    """Local data, tokenizer and warm-start paths made absolute, so the run's saved config names
    the same files whatever directory it is resumed from (buckets are left as they are)."""

    def absolute(name: str) -> str:
        return os.fspath(storage.path(name)) if name else name

    d = exp.data
    mixture = tuple(dataclasses.replace(s, path=absolute(s.path)) for s in d.mixture)
    data = dataclasses.replace(
        d,
        path=absolute(d.path),
        mixture=mixture,
        tokenizer_path=absolute(d.tokenizer_path),
        chat_template=absolute(d.chat_template),
    )
    ckpt = dataclasses.replace(exp.checkpoint, init_from=absolute(exp.checkpoint.init_from))
    return dataclasses.replace(exp, data=data, checkpoint=ckpt)


def check_workdir(
    exp: config.Experiment, workdir: storage.Path, ckpts: checkpoint.Checkpoints
) -> config.Experiment:
    """Before any tokenizing: refuse a setting a resumed run cannot change (against the newest
    checkpoint, or the config.json of a run that has none yet), and keep the run's tokenizer and
    chat template in its workdir (`_with_run_files`). Returns the experiment reading those.
    (`start_state` checks again the checkpoint it restores: an older one when it is damaged.)"""
    saved = ckpts.newest_readable()
    exp = _with_run_files(exp, workdir, fresh=saved is None)
    if saved:
        check_resume(saved.exp, exp, saved.step, f"the checkpoint at step {saved.step}", str(workdir))
    elif (workdir / "config.json").exists():
        check_resume(_read_config(workdir), exp, 0, "the run already in this workdir", str(workdir))
    return exp


def resolve_from_data(exp: config.Experiment, corpus: Corpus) -> config.Experiment:
    """Fill in what the data decides: the vocabulary, and the documents per row that the
    packed attention kernel is sized for."""
    exp = with_vocab(exp, corpus.tokenizer.vocab_size)
    if exp.model.max_segments == 0:
        splits = corpus.splits("train") + corpus.splits("validation")
        most = loader.max_segments(splits, exp.model.seq_len)
        exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, max_segments=most))
    return exp


def start_state(
    exp: config.Experiment,
    workdir: storage.Path,
    corpus: Corpus,
    ckpts: checkpoint.Checkpoints,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    log: Callable[[str], None],
) -> tuple[nnx.GraphDef, step.State, step.State, checkpoint.Saved | None]:
    """(graphdef, state, shardings, the checkpoint resumed or None): the newest usable
    checkpoint restored onto `mesh`, else a warm start from `checkpoint.init_from`, else a
    fresh initialisation. Runs under `sharding.use(mesh, ...)`."""

    def restore_target(saved: checkpoint.Saved) -> step.State:
        what = f"the checkpoint at step {saved.step}"
        # Checked again after `check_workdir`: this may be an older checkpoint than the newest
        # (damaged) one, the vocabulary is now the data's, and the changes it allows are announced.
        for change in check_resume(saved.exp, exp, saved.step, what, str(workdir)):
            log(f"resuming with a changed setting: {change}")
        if saved.data["identity"] != corpus.identity:
            raise UserError(
                f"the corpus tokenizes differently from the one {what} was trained on (its files "
                f"or tokenizer changed); restore them, or warm-start a new run from {workdir} with "
                "checkpoint.init_from"
            )
        if saved.data["corpus"] != corpus.entry.name:
            log(f"the corpus files moved or were touched since {what}, but tokenize the same")
        return abstract

    resumed = None
    if ckpts.steps():  # the restore target, built only when there is something to restore
        graphdef, abstract, shardings = step.abstract_state(exp, tx, mesh)
        resumed = ckpts.restore_newest(restore_target)
    if resumed:
        saved, state = resumed
        log(f"resuming from step {saved.step} of {exp.train.steps} ({ckpts.folder / str(saved.step)})")
        return graphdef, state, shardings, saved
    warm = None
    if exp.checkpoint.init_from:
        warm, _ = checkpoint.load_params(exp.checkpoint.init_from, mesh, model=exp.model, log=log)
        log(f"warm start from {exp.checkpoint.init_from}: its parameters, fresh optimizer, step 0")
    graphdef, state, shardings = step.init_state(exp, tx, mesh, params=warm)
    return graphdef, state, shardings, None


def _with_run_files(exp: config.Experiment, workdir: storage.Path, fresh: bool) -> config.Experiment:
    """The tokenizer and chat template the run reads, kept in its workdir so that resuming it,
    lmjax.chat and lmjax.serve do not depend on other folders: a warm start keeps the tokenizer
    its parameters were trained with (unless data.tokenizer_path says otherwise) and the chat
    template it was imported with; a template given as data.chat_template is kept too. Files
    are copied when the run starts (`fresh`); a resumed run reads its copies."""
    source = exp.checkpoint.init_from
    data = exp.data
    if source and not data.tokenizer_path:
        missing = f"checkpoint.init_from={source} has no tokenizer.model, so it is no run's workdir"
        tokenizer = _copied(
            storage.path(source) / "tokenizer.model", workdir / "tokenizer.model", fresh, missing
        )
        data = dataclasses.replace(data, tokenizer_path=tokenizer)
    kept = workdir / chat_jinja.JINJA_FILE
    given = storage.path(data.chat_template) if data.chat_template else None
    if given is None and source and (storage.path(source) / chat_jinja.JINJA_FILE).exists():
        given = storage.path(source) / chat_jinja.JINJA_FILE
    if fresh and given is not None and given != kept:
        missing = f"data.chat_template={given} does not exist"
        data = dataclasses.replace(data, chat_template=_copied(given, kept, fresh, missing))
    elif not fresh and kept.exists():
        data = dataclasses.replace(data, chat_template=str(kept))
    return dataclasses.replace(exp, data=data)


def _copied(theirs: storage.Path, mine: storage.Path, fresh: bool, missing: str) -> str:
    """`mine`, copied from `theirs` when the run starts (`fresh`); `missing` says what is wrong
    when there is no `theirs`."""
    if fresh:
        if not theirs.exists():
            raise UserError(f"{missing}; train that run first, or give another")
        storage.write_atomic(mine, theirs.read_bytes())
    return str(mine)


def _read_config(workdir: storage.Path) -> config.Experiment:
    try:
        return config.from_dict(json.loads((workdir / "config.json").read_text()))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"{workdir / 'config.json'} is not a config this lmjax can read ({e}); use a new --workdir"
        ) from None


def with_vocab(exp: config.Experiment, tokenizer_vocab: int) -> config.Experiment:
    """Fill model.vocab_size from the tokenizer, or check an explicit one can hold it."""
    if exp.model.vocab_size == 0:
        return dataclasses.replace(exp, model=dataclasses.replace(exp.model, vocab_size=tokenizer_vocab))
    if exp.model.vocab_size < tokenizer_vocab:
        raise UserError(
            f"model.vocab_size={exp.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab} pieces; set model.vocab_size=0 to take the tokenizer's"
        )
    return exp
