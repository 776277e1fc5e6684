"""Typed experiment config, `--set a.b=value` overrides, and checks that need no jax.

An experiment file defines `config() -> Experiment`. Everything a run does is decided here, so
`WORKDIR/config.json` (see `to_dict`) describes the run completely. Each field's type says what
it may hold (`lmjax.typed`): a `Literal` lists its choices, an `Annotated` bound its range;
`validate` and `--set` check every field against it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from lmjax import typed
from lmjax.typed import Between, Decay, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


Flavour = Literal["gpt2", "llama"]
Dtype = Literal["float32", "bfloat16", "float16"]
Remat = Literal["none", "full", "dots", "named"]
# Activations remat=named can keep (model.py tags them): the q/k/v projections, the attention
# kernel's output, and the MLP's input projections before the activation (gate and up for llama).
RematName = Literal["qkv", "attn_out", "mlp_in"]
# The attention kernels lmjax.attention.dispatch implements; auto picks one for the device.
Attention = Literal["auto", "xla", "cudnn", "cudnn_packed", "pallas", "splash", "reference"]
Mlp = Literal["auto", "gelu", "relu2", "swiglu"]
# chat: conversations (JSONL or Parquet rows of {"messages": [...]}); stdlib_chat: questions
# about the standard library's documented functions, answered from their docstrings
SourceKind = Literal["stdlib", "files", "jsonl", "parquet", "tfds", "chat", "stdlib_chat"]
Tokenizer = Literal["bpe", "unigram"]
OptimName = Literal["adamw", "muon"]
Schedule = Literal["cosine", "wsd"]
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
# Far above any real vocabulary (Gemma's 262k pieces); a typo beyond it would allocate terabytes.
VocabSize = Annotated[int, Between(0, 1 << 22)]


@dataclasses.dataclass(frozen=True)
class Model:
    flavour: Flavour = "gpt2"  # gpt2: LayerNorm, learned positions, GELU | llama: RMSNorm, RoPE, SwiGLU
    vocab_size: VocabSize = 0  # 0: the tokenizer's size; the table is padded to a multiple of 128
    d_model: PositiveInt = 256
    n_layers: PositiveInt = 4
    n_heads: PositiveInt = 4
    n_kv_heads: NonNegativeInt = 0  # 0: n_heads (no grouping)
    d_ff: NonNegativeInt = 0  # 0: 4*d_model (gpt2) or 8/3*d_model rounded up to 256 (llama)
    seq_len: PositiveInt = 256
    tie_embeddings: bool | None = None  # None: tied for gpt2, untied for llama
    dtype: Dtype = "bfloat16"  # activations and matmuls
    param_dtype: Dtype = "float32"  # master weights and optimizer state
    scan_layers: bool = False  # lax.scan over layers: faster compile, slower step on GPU
    remat: Remat = "none"  # none | full | dots (save matmul outputs) | named (save remat_names)
    remat_names: tuple[RematName, ...] = ("qkv", "mlp_in")  # remat=named: what is kept
    attention: Attention = "auto"
    # documents per row the cuDNN packed kernel is sized for; 0: from the data
    max_segments: NonNegativeInt = 0
    loss_chunk: NonNegativeInt = 0  # >0: cross-entropy over this many positions at a time (seq_len % it == 0)
    rope_theta: PositiveFloat = 10000.0
    norm_eps: PositiveFloat = 1e-5
    init_std: PositiveFloat = 0.02
    # Recipe options (docs/recipes.md), all off in the GPT-2 experiments:
    mlp: Mlp = "auto"  # auto (gpt2: gelu, llama: swiglu) | gelu | relu2 (ReLU squared) | swiglu
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (learned scale) before attention
    qkv_bias: bool = False  # llama: biases on the q, k and v projections (Qwen2, Qwen2.5); gpt2 has them
    # >0: each token attends to at most the last sliding_window tokens, itself included (Mistral)
    sliding_window: NonNegativeInt = 0
    zero_init: bool = False  # the residual output projections (w_o, w_out / w_down) start at zero
    logit_softcap: NonNegativeFloat = 0.0  # >0: logits = softcap * tanh(logits / softcap)
    z_loss: NonNegativeFloat = 0.0  # >0: the training loss adds z_loss * logsumexp(logits)^2 (not in eval)

    @property
    def mlp_kind(self) -> str:
        if self.mlp != "auto":
            return self.mlp
        return "swiglu" if self.flavour == "llama" else "gelu"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp_kind == "swiglu":  # three matrices: 8/3 keeps the MLP's parameters at 8*D*D
            return 256 * math.ceil(8 * self.d_model / 3 / 256)
        return 4 * self.d_model

    @property
    def tied(self) -> bool:
        return self.flavour == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def padded_vocab(self) -> int:
        return 128 * math.ceil(self.vocab_size / 128)


@dataclasses.dataclass(frozen=True)
class Source:
    """One corpus. `data.source=mixture` trains on several, drawn by `weight`."""

    source: SourceKind = "stdlib"
    path: str = ""  # files/jsonl/parquet/chat: a file, folder or glob | tfds: data dir or prepared dir
    name: str = ""  # tfds: the dataset name, e.g. lmjax_stdlib
    # jsonl: the field | parquet: the column | tfds: the feature | chat: the messages ("text": "messages")
    field: str = "text"
    weight: PositiveFloat = 1.0  # share of training windows in a mixture


@dataclasses.dataclass(frozen=True)
class Data:
    source: Literal[SourceKind, "mixture"] = "stdlib"  # stdlib: this Python's standard library source
    path: str = ""  # files/jsonl/parquet/chat: a file, folder or glob | tfds: data dir or prepared dir
    name: str = ""  # tfds: the dataset name
    # jsonl: the field | parquet: the column | tfds: the feature | chat: the messages ("text": "messages")
    field: str = "text"
    mixture: tuple[Source, ...] = ()  # source=mixture: the corpora and their weights
    vocab_size: Annotated[int, Between(1, 1 << 22)] = 2048  # sentencepiece vocabulary to train
    tokenizer: Tokenizer = "bpe"
    tokenizer_path: str = ""  # an existing sentencepiece .model instead of training one
    # chat sources: a Jinja chat template (an imported model's chat_template.jinja) to render
    # conversations with; "": lmjax's own pieces. A warm start from a run with one uses it.
    chat_template: str = ""
    tokenizer_sample_bytes: PositiveInt = 4_000_000  # bounded sample the tokenizer trains on
    # documents whose key hash falls below this go to validation
    validation_percent: Annotated[float, Between(0, 50, closed_left=False, closed_right=False)] = 2.0
    cache_dir: str = ""  # "": $LMJAX_CACHE or ~/.cache/lmjax
    # A run of several processes that finds no token cache tokenizes at most this much input
    # itself (process 0, the others waiting); a larger corpus must be prepared first (exit 2).
    max_build_mb: NonNegativeInt = 1000

    def components(self) -> tuple[Source, ...]:
        if self.source == "mixture":
            return self.mixture
        return (Source(self.source, self.path, self.name, self.field),)


@dataclasses.dataclass(frozen=True)
class Mesh:
    data: int = -1  # -1: all devices the other axes leave
    fsdp: int = 1
    tensor: int = 1
    # logical axis -> mesh axis (or axes, or None). Parameters and activations (act_*) differ:
    # weights shard their embed dim over fsdp, activations shard their batch over data+fsdp.
    rules: Rules = (
        ("batch", ("data", "fsdp")),
        ("act_batch", ("data", "fsdp")),
        ("act_seq", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
        ("layers", None),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("positions", None),
    )


# Every logical axis name the model and the batch use; mesh.rules must map each one.
LOGICAL_AXES = tuple(name for name, _ in Mesh.rules)


@dataclasses.dataclass(frozen=True)
class Optim:
    name: OptimName = "adamw"  # muon: Muon for the hidden matrices, AdamW at `lr` for the rest
    lr: PositiveFloat = 3e-4  # AdamW's peak learning rate
    min_lr_ratio: Fraction = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: NonNegativeInt = 100
    schedule: Schedule = "cosine"  # wsd: warmup, stable at lr, linear decay over decay_fraction
    decay_fraction: Fraction = 0.2  # wsd: the share of train.steps spent decaying
    muon_lr: PositiveFloat = 0.02  # muon: the hidden matrices' peak learning rate (same schedule shape)
    muon_momentum: Decay = 0.95  # muon: Nesterov momentum before orthogonalisation
    b1: Decay = 0.9
    b2: Decay = 0.95
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.1
    decay_embeddings: bool = False  # norms and biases are never decayed
    clip_norm: NonNegativeFloat = 1.0  # global gradient norm; 0 disables


@dataclasses.dataclass(frozen=True)
class Train:
    steps: PositiveInt = 200
    batch_size: PositiveInt = 16  # global, in sequences
    microbatches: PositiveInt = 1  # gradient accumulation: batch_size is split into this many
    seed: int = 0
    log_every: PositiveInt = 10
    eval_every: NonNegativeInt = 100  # 0: only at the end
    eval_batches: NonNegativeInt = 8  # held-out batches per evaluation; 0: the whole validation split
    peak_tflops: NonNegativeFloat = 0.0  # 0: the datasheet peak of a known device; MFU omitted on CPU
    progress: bool = True
    profile_steps: tuple[int, ...] = ()  # (first, last): jax.profiler trace of these steps
    xla_flags: bool = True  # set lmjax's verified XLA flags for the backend when XLA_FLAGS is unset
    # Several processes: one that stops answering (killed, its host lost) ends the others after
    # this many seconds, rather than leaving them waiting in a collective. JAX's default: 100.
    heartbeat_timeout_s: PositiveInt = 100
    tensorboard: bool = False  # also write TensorBoard event files to WORKDIR/tensorboard


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    every: NonNegativeInt = 500  # save every N steps (asynchronously) and at the end; 0: only at the end
    keep: PositiveInt = 3  # the newest K checkpoints are kept...
    keep_every: NonNegativeInt = 0  # ...and every M-th step besides (0: none)
    init_from: str = ""  # a run's workdir: start from its parameters (fresh optimizer, step 0)


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str = "unnamed"
    model: Model = Model()
    data: Data = Data()
    mesh: Mesh = Mesh()
    optim: Optim = Optim()
    train: Train = Train()
    checkpoint: Checkpoint = Checkpoint()


# --- loading ---------------------------------------------------------------------------------


def load_experiment(name_or_path: str) -> Experiment:
    """`stdlib_tiny` (shipped as `lmjax.experiments.stdlib_tiny`) or a path to a `.py` file."""
    try:
        module = _experiment_module(name_or_path)
        if not hasattr(module, "config"):
            raise UserError(f"experiment {name_or_path} has no config() function; add one")
        exp = module.config()
    except UserError:
        raise
    except Exception as e:  # the experiment file's own error (a typo, a failing import): where, and what
        raise UserError(f"experiment {name_or_path} failed: {_where(e)}{type(e).__name__}: {e}") from None
    if not isinstance(exp, Experiment):
        raise UserError(f"experiment {name_or_path}: config() must return lmjax.config.Experiment")
    return exp


def _experiment_module(name_or_path: str) -> types.ModuleType:
    if name_or_path.endswith(".py") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"experiment file {path} does not exist; pass an existing .py file")
        spec = importlib.util.spec_from_file_location(f"lmjax_experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    _experiments()
    unknown = UserError(
        f"no experiment named {name_or_path!r}; choose one of {list_experiments()} or pass a path to a "
        ".py file"
    )
    if not name_or_path.isidentifier():
        raise unknown
    try:
        return importlib.import_module(f"lmjax.experiments.{name_or_path}")
    except ModuleNotFoundError as e:
        if e.name != f"lmjax.experiments.{name_or_path}":
            raise
        raise unknown from None


def _where(e: Exception) -> str:
    """ "file:line: " of the experiment's code where `e` was raised (a SyntaxError's own line)."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: "
    frames = traceback.extract_tb(e.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""


def _experiments() -> types.ModuleType:
    """`lmjax.experiments`: the repository's experiments/ folder once lmjax is installed; in a bare
    checkout on PYTHONPATH (the GPU image) mapped here, so experiments load, and import each
    other, all the same."""
    if importlib.util.find_spec("lmjax.experiments") is None:
        folder = Path(__file__).resolve().parent.parent / "experiments"
        spec = importlib.util.spec_from_file_location(
            "lmjax.experiments", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["lmjax.experiments"] = module
        spec.loader.exec_module(module)
        sys.modules["lmjax"].experiments = module
    return importlib.import_module("lmjax.experiments")


def list_experiments() -> list[str]:
    folder = Path(_experiments().__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


# --- overrides -------------------------------------------------------------------------------


def apply_overrides(exp: Experiment, overrides: list[str]) -> Experiment:
    """Apply `section.field=value` strings; each value is parsed and checked by the field's type."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} is not key=value; write e.g. --set train.steps=100")
        exp = _set(exp, key.strip(), raw.strip(), key.strip())
    return exp


def _set(obj: Any, dotted: str, raw: str, full_key: str) -> Any:
    head, _, rest = dotted.partition(".")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if head not in fields:
        raise UserError(f"unknown config key {full_key!r}; valid keys under here: {sorted(fields)}")
    hint = typing.get_type_hints(type(obj), include_extras=True)[head]
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if not rest:
            raise UserError(f"{full_key!r} is a section; set one of its fields, e.g. {full_key}.x=")
        return dataclasses.replace(obj, **{head: _set(current, rest, raw, full_key)})
    if rest:
        raise UserError(f"unknown config key {full_key!r}: {head} has no sub-keys")
    try:
        return dataclasses.replace(obj, **{head: typed.parse(full_key, raw, hint)})
    except ValueError as e:
        raise UserError(str(e)) from None


# --- serialisation ---------------------------------------------------------------------------


def to_dict(exp: Experiment) -> dict:
    return dataclasses.asdict(exp)


# Settings a config.json of an older lmjax may hold that no longer exist: read and ignored, so
# those runs still resume.
_NO_LONGER_READ = ("train.nan_at_step",)


def from_dict(d: dict) -> Experiment:
    """The experiment `to_dict` wrote (config.json, a checkpoint's config); ValueError if it is not one."""
    return typed.structured("", d, Experiment, ignored=_NO_LONGER_READ)


def flat(exp: Experiment) -> dict[str, Any]:
    """`{"model.d_model": 256, ...}`: every setting under its --set key."""
    out: dict[str, Any] = {}
    for key, value in to_dict(exp).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


# --- checks that need no jax -----------------------------------------------------------------


def validate(exp: Experiment) -> None:
    """Raise UserError naming the first impossible setting: every field against its type, then the
    settings that constrain each other. Device-count checks: `sharding.mesh_shape`."""
    try:
        typed.check("", exp, Experiment)
    except ValueError as e:
        raise UserError(str(e)) from None
    m, t, ck = exp.model, exp.train, exp.checkpoint
    require(
        m.d_model % m.n_heads == 0,
        f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; pick heads that divide it",
    )
    require(
        m.kv_heads <= m.n_heads and m.n_heads % m.kv_heads == 0,
        f"model.n_kv_heads={m.n_kv_heads} does not divide model.n_heads={m.n_heads}; "
        "pick a divisor of it (0 means n_heads)",
    )
    require(
        m.flavour == "gpt2" or m.head_dim % 2 == 0,
        f"head dim model.d_model/model.n_heads={m.head_dim} is odd; RoPE needs it even: change either",
    )
    require(
        not (m.qkv_bias and m.flavour == "gpt2"),
        "model.qkv_bias=true is for the llama flavour (Qwen2); gpt2 already biases q, k and v: leave it off",
    )
    require(  # lmjax.attention's fused kernels mask plain causal attention only
        m.sliding_window == 0 or m.attention in ("auto", "xla", "reference"),
        f"model.attention={m.attention} cannot honour model.sliding_window={m.sliding_window}; "
        "use model.attention=xla (or auto)",
    )
    require(
        m.loss_chunk == 0 or m.seq_len % m.loss_chunk == 0,
        f"model.loss_chunk={m.loss_chunk} does not divide model.seq_len={m.seq_len}; pick a divisor or 0",
    )
    require(
        t.batch_size % t.microbatches == 0,
        f"train.microbatches={t.microbatches} does not divide train.batch_size={t.batch_size}",
    )
    require(
        t.profile_steps == ()
        or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1] <= t.steps),
        f"train.profile_steps={list(t.profile_steps)}: give [first, last] steps within 1..train.steps, or []",
    )
    _validate_sources(exp.data)
    missing = [name for name in LOGICAL_AXES if name not in dict(exp.mesh.rules)]
    require(not missing, f"mesh.rules has no rule for {missing}; map each to a mesh axis or null")
    for name, target in exp.mesh.rules:
        targets = set(target) if isinstance(target, tuple) else {target}
        require(
            targets <= {None, "data", "fsdp", "tensor"},
            f"mesh.rules maps {name!r} to {target!r}; use data, fsdp, tensor, a list of them or null",
        )
    require(
        ck.keep_every == 0 or (ck.every > 0 and ck.keep_every % ck.every == 0),
        f"checkpoint.keep_every={ck.keep_every} is not a multiple of checkpoint.every={ck.every}, so "
        "no checkpoint would fall on it; make it a multiple (or 0)",
    )
    axes = [exp.mesh.data, exp.mesh.fsdp, exp.mesh.tensor]
    require(
        all(a == -1 or a > 0 for a in axes) and axes.count(-1) <= 1,
        f"mesh (data, fsdp, tensor)={tuple(axes)}: sizes must be positive, at most one -1",
    )


def _validate_sources(d: Data) -> None:
    require(
        d.source != "mixture" or d.mixture,
        'data.source=mixture needs data.mixture=[{"source": ..., "weight": ...}, ...]',
    )
    for i, c in enumerate(d.components()):
        where = f"data.mixture[{i}]." if d.source == "mixture" else "data."
        require(
            c.source not in ("files", "jsonl", "parquet", "chat") or c.path,
            f"{where}source={c.source} needs {where}path=FILE_FOLDER_OR_GLOB",
        )
        require(
            c.source != "tfds" or c.name or c.path,
            f"{where}source=tfds needs {where}name=DATASET (or {where}path=a prepared dataset folder)",
        )
        require(c.source not in ("jsonl", "parquet", "tfds") or c.field, f"{where}field must name the text")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)
