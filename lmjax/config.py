"""Typed experiment config, `--set a.b=value` overrides, and checks that need no jax.

An experiment file defines `config() -> Experiment`. Everything a run does is decided here, so
`WORKDIR/config.json` (see `to_dict`) describes the run completely.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


@dataclasses.dataclass(frozen=True)
class Model:
    flavour: str = "gpt2"  # gpt2: LayerNorm, learned positions, GELU | llama: RMSNorm, RoPE, SwiGLU
    vocab_size: int = 0  # 0: the tokenizer's size; the table is padded to a multiple of 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: n_heads (no grouping)
    d_ff: int = 0  # 0: 4*d_model (gpt2) or 8/3*d_model rounded up to 256 (llama)
    seq_len: int = 256
    tie_embeddings: bool | None = None  # None: tied for gpt2, untied for llama
    dtype: str = "bfloat16"  # activations and matmuls
    param_dtype: str = "float32"  # master weights and optimizer state
    scan_layers: bool = False  # lax.scan over layers: faster compile, slower step on GPU
    remat: str = "none"  # none | full | dots (save matmul outputs) | named (save remat_names)
    remat_names: tuple[str, ...] = ("qkv", "mlp_in")  # remat=named: what is kept (REMAT_NAMES below)
    attention: str = "auto"  # auto | one of attention.IMPLEMENTATIONS (see attention.py)
    max_segments: int = 0  # documents per row the cuDNN packed kernel is sized for; 0: from the data
    loss_chunk: int = 0  # >0: cross-entropy over this many positions at a time (seq_len % it == 0)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Recipe options (README "Recipes"), all off in the GPT-2 experiments:
    mlp: str = "auto"  # auto (gpt2: gelu, llama: swiglu) | gelu | relu2 (ReLU squared) | swiglu
    qk_norm: bool = False  # RMS-normalise each head's queries and keys (learned scale) before attention
    zero_init: bool = False  # the residual output projections (w_o, w_out / w_down) start at zero
    logit_softcap: float = 0.0  # >0: logits = softcap * tanh(logits / softcap)
    z_loss: float = 0.0  # >0: the training loss adds z_loss * logsumexp(logits)^2 (not in eval)

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


SOURCES = ("stdlib", "files", "jsonl", "parquet", "tfds")


@dataclasses.dataclass(frozen=True)
class Source:
    """One corpus. `data.source=mixture` trains on several, drawn by `weight`."""

    source: str = "stdlib"  # stdlib | files | jsonl | parquet | tfds
    path: str = ""  # files/jsonl/parquet: a file, folder or glob | tfds: data dir or prepared dir
    name: str = ""  # tfds: the dataset name, e.g. lmjax_stdlib
    field: str = "text"  # jsonl: the field | parquet: the column | tfds: the feature
    weight: float = 1.0  # share of training windows in a mixture


@dataclasses.dataclass(frozen=True)
class Data:
    source: str = "stdlib"  # stdlib (this Python's standard library source) | one of SOURCES | mixture
    path: str = ""  # files/jsonl/parquet: a file, folder or glob | tfds: data dir or prepared dir
    name: str = ""  # tfds: the dataset name
    field: str = "text"  # jsonl: the field | parquet: the column | tfds: the feature
    mixture: tuple[Source, ...] = ()  # source=mixture: the corpora and their weights
    vocab_size: int = 2048  # sentencepiece vocabulary to train
    tokenizer: str = "bpe"  # bpe | unigram
    tokenizer_path: str = ""  # an existing sentencepiece .model instead of training one
    tokenizer_sample_bytes: int = 4_000_000  # bounded sample the tokenizer trains on
    validation_percent: float = 2.0  # documents whose key hash falls below this go to validation
    cache_dir: str = ""  # "": $LMJAX_CACHE or ~/.cache/lmjax

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


@dataclasses.dataclass(frozen=True)
class Optim:
    name: str = "adamw"  # adamw | muon (Muon for the hidden matrices, AdamW at `lr` for the rest)
    lr: float = 3e-4  # AdamW's peak learning rate
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup, stable at lr, linear decay over decay_fraction)
    decay_fraction: float = 0.2  # wsd: the share of train.steps spent decaying
    muon_lr: float = 0.02  # muon: the hidden matrices' peak learning rate (same schedule shape)
    muon_momentum: float = 0.95  # muon: Nesterov momentum before orthogonalisation
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms and biases are never decayed
    clip_norm: float = 1.0  # global gradient norm; 0 disables


@dataclasses.dataclass(frozen=True)
class Train:
    steps: int = 200
    batch_size: int = 16  # global, in sequences
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8  # held-out batches per evaluation; 0: the whole validation split
    peak_tflops: float = 0.0  # 0: the datasheet peak of a known device; MFU omitted on CPU
    progress: bool = True
    profile_steps: tuple[int, ...] = ()  # (first, last): jax.profiler trace of these steps
    xla_flags: bool = True  # set lmjax's verified XLA flags for the backend when XLA_FLAGS is unset
    nan_at_step: int = 0  # tests: step N's gradients become NaN, to exercise the non-finite stop
    # Several processes: one that stops answering (killed, its host lost) ends the others after
    # this many seconds, rather than leaving them waiting in a collective. JAX's default: 100.
    heartbeat_timeout_s: int = 100
    tensorboard: bool = False  # also write TensorBoard event files to WORKDIR/tensorboard


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    every: int = 500  # save every N steps (asynchronously) and at the end; 0: only at the end
    keep: int = 3  # the newest K checkpoints are kept...
    keep_every: int = 0  # ...and every M-th step besides (0: none)
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
    if name_or_path.endswith(".py") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"experiment file {path} does not exist; pass an existing .py file")
        spec = importlib.util.spec_from_file_location(f"lmjax_experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        _experiments_package()
        try:
            module = importlib.import_module(f"lmjax.experiments.{name_or_path}")
        except ModuleNotFoundError as e:
            if e.name != f"lmjax.experiments.{name_or_path}":
                raise
            raise UserError(
                f"no experiment named {name_or_path!r}; choose one of {list_experiments()} "
                "or pass a path to a .py file"
            ) from None
    if not hasattr(module, "config"):
        raise UserError(f"experiment {name_or_path} has no config() function; add one")
    exp = module.config()
    if not isinstance(exp, Experiment):
        raise UserError(f"experiment {name_or_path}: config() must return lmjax.config.Experiment")
    return exp


def _experiments_package() -> None:
    """`lmjax.experiments` is the repository's experiments/ folder once lmjax is installed; in a
    bare checkout on PYTHONPATH (the GPU image) map it here, so experiments load, and import
    each other, all the same."""
    if importlib.util.find_spec("lmjax.experiments") is not None:
        return
    import sys

    import lmjax

    folder = Path(lmjax.__file__).resolve().parent.parent / "experiments"
    spec = importlib.util.spec_from_file_location(
        "lmjax.experiments", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["lmjax.experiments"] = module
    spec.loader.exec_module(module)
    lmjax.experiments = module


def list_experiments() -> list[str]:
    _experiments_package()
    import lmjax.experiments

    folder = Path(lmjax.experiments.__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


# --- overrides -------------------------------------------------------------------------------


def apply_overrides(exp: Experiment, overrides: list[str]) -> Experiment:
    """Apply `section.field=value` strings; each value is parsed by the field's declared type."""
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
    hint = typing.get_type_hints(type(obj))[head]
    current = getattr(obj, head)
    if dataclasses.is_dataclass(current):
        if not rest:
            raise UserError(f"{full_key!r} is a section; set one of its fields, e.g. {full_key}.x=")
        return dataclasses.replace(obj, **{head: _set(current, rest, raw, full_key)})
    if rest:
        raise UserError(f"unknown config key {full_key!r}: {head} has no sub-keys")
    return dataclasses.replace(obj, **{head: _parse(raw, hint, full_key)})


def _parse(raw: str, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw.lower() in ("none", "null"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _parse(raw, inner, key)
    try:
        if hint is bool:
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw
        return _structured(json.loads(raw), hint, key)  # e.g. mesh.rules, data.mixture, as JSON
    except (ValueError, TypeError):
        name = getattr(hint, "__name__", str(hint))
        raise UserError(f"{key}={raw!r} is not a valid {name}; give a {name} value") from None


def _tuples(x: Any) -> Any:
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x


def _structured(value: Any, hint: Any, key: str) -> Any:
    """JSON lists become tuples; a list of objects for `tuple[Source, ...]` becomes Sources."""
    if hint == tuple[Source, ...]:
        types = typing.get_type_hints(Source)
        for item in value:
            unknown = set(item) - set(types) if isinstance(item, dict) else {"(not an object)"}
            require(not unknown, f"{key}: unknown source fields {sorted(unknown)}; use {sorted(types)}")
            for name, v in item.items():
                ok = (
                    isinstance(v, str) if types[name] is str else type(v) in (int, float) and math.isfinite(v)
                )
                require(ok, f"{key}: {name}={v!r} is not a {types[name].__name__}; give one")
        return tuple(Source(**item) for item in value)
    return _tuples(value)


# --- serialisation ---------------------------------------------------------------------------


def to_dict(exp: Experiment) -> dict:
    return dataclasses.asdict(exp)


def from_dict(d: dict) -> Experiment:
    sections = {f.name: typing.get_type_hints(Experiment)[f.name] for f in dataclasses.fields(Experiment)}
    kwargs = {}
    for name, value in d.items():
        cls = sections[name]
        hints = typing.get_type_hints(cls) if isinstance(value, dict) else {}
        kwargs[name] = (
            cls(**{k: _structured(v, hints[k], k) for k, v in value.items()})
            if isinstance(value, dict)
            else value
        )
    return Experiment(**kwargs)


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
    """Raise UserError naming the first impossible setting. Device-count checks: `mesh_shape`."""
    m, t, o, d = exp.model, exp.train, exp.optim, exp.data
    require(m.flavour in ("gpt2", "llama"), f"model.flavour={m.flavour!r}: use gpt2 or llama")
    for key, value in ((k, _get(exp, k)) for k in _POSITIVE):
        require(value > 0, f"{key}={value} must be positive")
    for key, value in ((k, _get(exp, k)) for k in _NON_NEGATIVE):
        require(value >= 0, f"{key}={value} must be >= 0")
    require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1}, optim.b2={o.b2} must be in [0, 1)")
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
    require(m.dtype in _DTYPES, f"model.dtype={m.dtype!r}: use one of {sorted(_DTYPES)}")
    require(
        m.param_dtype in _DTYPES,
        f"model.param_dtype={m.param_dtype!r}: use one of {sorted(_DTYPES)}",
    )
    require(
        m.remat in ("none", "full", "dots", "named"), f"model.remat={m.remat!r}: use none|full|dots|named"
    )
    unknown_names = sorted(set(m.remat_names) - set(REMAT_NAMES))
    require(not unknown_names, f"model.remat_names has {unknown_names}; choose from {list(REMAT_NAMES)}")
    require(
        m.loss_chunk == 0 or m.seq_len % m.loss_chunk == 0,
        f"model.loss_chunk={m.loss_chunk} does not divide model.seq_len={m.seq_len}; pick a divisor or 0",
    )
    require(
        m.attention in ATTENTION,
        f"model.attention={m.attention!r}: use {'|'.join(ATTENTION)}",
    )
    require(
        t.batch_size % t.microbatches == 0,
        f"train.microbatches={t.microbatches} does not divide train.batch_size={t.batch_size}",
    )
    require(o.name in ("adamw", "muon"), f"optim.name={o.name!r}: use adamw|muon")
    require(o.schedule in ("cosine", "wsd"), f"optim.schedule={o.schedule!r}: use cosine|wsd")
    require(0 <= o.decay_fraction <= 1, f"optim.decay_fraction={o.decay_fraction} must be in [0, 1]")
    require(0 <= o.muon_momentum < 1, f"optim.muon_momentum={o.muon_momentum} must be in [0, 1)")
    require(m.mlp in ("auto", "gelu", "relu2", "swiglu"), f"model.mlp={m.mlp!r}: use auto|gelu|relu2|swiglu")
    require(
        t.profile_steps == ()
        or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1] <= t.steps),
        f"train.profile_steps={list(t.profile_steps)}: give [first, last] steps within 1..train.steps, or []",
    )
    require(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _validate_sources(d)
    require(d.tokenizer in ("bpe", "unigram"), f"data.tokenizer={d.tokenizer!r}: use bpe|unigram")
    require(
        0 < d.validation_percent < 50,
        f"data.validation_percent={d.validation_percent} must be in (0, 50)",
    )
    rules = dict(exp.mesh.rules)
    missing = [name for name in LOGICAL_AXES if name not in rules]
    require(not missing, f"mesh.rules has no rule for {missing}; map each to a mesh axis or null")
    for name, target in exp.mesh.rules:
        targets = target if isinstance(target, tuple) else (target,)
        require(
            all(t in (None, "data", "fsdp", "tensor") for t in targets),
            f"mesh.rules maps {name!r} to {target!r}; use data, fsdp, tensor, a list of them or null",
        )
    ck = exp.checkpoint
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
        d.source in (*SOURCES, "mixture"),
        f"data.source={d.source!r}: use one of {', '.join(SOURCES)} or mixture",
    )
    require(
        d.source != "mixture" or d.mixture,
        'data.source=mixture needs data.mixture=[{"source": ..., "weight": ...}, ...]',
    )
    for i, c in enumerate(d.components()):
        where = f"data.mixture[{i}]." if d.source == "mixture" else "data."
        require(c.source in SOURCES, f"{where}source={c.source!r}: use one of {', '.join(SOURCES)}")
        require(
            c.source not in ("files", "jsonl", "parquet") or c.path,
            f"{where}source={c.source} needs {where}path=FILE_FOLDER_OR_GLOB",
        )
        require(
            c.source != "tfds" or c.name or c.path,
            f"{where}source=tfds needs {where}name=DATASET (or {where}path=a prepared dataset folder)",
        )
        require(c.source not in ("jsonl", "parquet", "tfds") or c.field, f"{where}field must name the text")
        require(c.weight > 0 and math.isfinite(c.weight), f"{where}weight={c.weight} must be positive")


_DTYPES = {"float32", "bfloat16", "float16"}
# Kept here, not imported, so the config is checked before jax is: attention.py and model.py
# test that they agree.
ATTENTION = ("auto", "xla", "cudnn", "cudnn_packed", "pallas", "splash", "reference")
# Activations remat=named can keep (model.py tags them): the q/k/v projections, the attention
# kernel's output, and the MLP's input projections before the activation (gate and up for llama).
REMAT_NAMES = ("qkv", "attn_out", "mlp_in")
_POSITIVE = (
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.seq_len",
    "model.init_std",
    "model.norm_eps",
    "model.rope_theta",
    "optim.lr",
    "optim.eps",
    "optim.muon_lr",
    "train.steps",
    "train.batch_size",
    "train.microbatches",
    "train.log_every",
    "train.heartbeat_timeout_s",
    "data.vocab_size",
    "checkpoint.keep",
)
_NON_NEGATIVE = (
    "train.eval_batches",
    "model.n_kv_heads",
    "model.d_ff",
    "model.loss_chunk",
    "model.max_segments",
    "model.logit_softcap",
    "model.z_loss",
    "optim.warmup_steps",
    "optim.weight_decay",
    "optim.clip_norm",
    "train.eval_every",
    "train.peak_tflops",
    "checkpoint.every",
    "checkpoint.keep_every",
    "train.nan_at_step",
)
# Every logical axis name the model and the batch use; mesh.rules must map each one.
LOGICAL_AXES = (
    "batch",
    "act_batch",
    "act_seq",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
    "layers",
    "embed",
    "heads",
    "kv_heads",
    "head_dim",
    "mlp",
    "vocab",
    "positions",
)


def _get(exp: Experiment, dotted: str) -> Any:
    section, field = dotted.split(".")
    return getattr(getattr(exp, section), field)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)
