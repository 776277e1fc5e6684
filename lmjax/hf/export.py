"""Hugging Face interop: a run's model out in the transformers layout, public weights in.

  python -m lmjax.export --workdir DIR --to hf OUT [--dtype bf16|fp32] [--shard-size 5GB]
  python -m lmjax.export --from-hf PATH --to lmjax DIR [--dtype fp32|bf16]

Export writes OUT/config.json (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM for a
llama-flavour run with model.qkv_bias, MistralForCausalLM for one with model.sliding_window),
model.safetensors (or shards and
model.safetensors.index.json above --shard-size) and the tokenizer (tokenizer.py) from DIR's
newest checkpoint. Import turns a local Hugging Face folder (safetensors and a
sentencepiece tokenizer.model; nothing is downloaded) into an lmjax run folder: config.json,
tokenizer.model and a step-0 checkpoint that `checkpoint.load_params` reads onto any mesh and
`--set checkpoint.init_from=DIR` starts training from, and the model's chat template, where it
has one, as chat_template.jinja (lmjax.chat and Generator.chat render conversations with it).
Its config computes in the checkpoint's precision (model.dtype float32, bfloat16 for all-BF16
tensors) and names its own tokenizer.model as data.tokenizer_path, so that lmjax.generate and
lmjax.evaluate read DIR as a run.

Memory: export restores one group of stacked lmjax parameters at a time (Orbax partial
restore: all layers of the weights one HF tensor is made of, e.g. GPT-2's q, k and v for
c_attn) and writes each layer's tensor straight into its place in the file. Import reads one
tensor at a time but holds the whole model in `--dtype` (in host memory, also on a GPU host)
before Orbax writes it, and Orbax copies it again to save it: a few copies of the model at
the peak (docs/hugging-face.md). Both build into a `.NAME.partial` folder beside the destination and rename
it when complete, so a failure leaves no half-written folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from lmjax import checkpoint, config, step, storage
from lmjax.config import UserError
from lmjax.data import chat_jinja
from lmjax.data.tokenizer import Tokenizer
from lmjax.hf import config as hf_config
from lmjax.hf import layout as hf_layout
from lmjax.hf import safetensors as hf_safetensors
from lmjax.hf import tokenizer as hf_tokenizer
from lmjax.storage import write_atomic

FLOAT_DTYPES = ("F32", "F16", "BF16")  # safetensors' names of the dtypes import reads
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
Log = Callable[[str], None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.export", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="an lmjax run folder to export (its newest checkpoint)")
    source.add_argument("--from-hf", help="a local Hugging Face checkpoint folder to import")
    parser.add_argument("--to", nargs=2, required=True, metavar=("FORMAT", "DIR"), help="hf OUT | lmjax DIR")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="export: stored dtype (default: the run's "
        "param_dtype); import: lmjax param_dtype (default fp32)",
    )
    parser.add_argument("--shard-size", default="5GB", help="export: largest safetensors file (5GB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        fmt, dest = args.to[0], Path(args.to[1])
        if args.workdir:
            _require(fmt == "hf", f"--workdir exports: write --to hf OUT, not --to {fmt}")
            _require(
                storage.path(args.workdir).is_dir(),
                f"--workdir {args.workdir} is not a folder; give a run's workdir",
            )
            export_hf(storage.path(args.workdir), dest, DTYPES.get(args.dtype or ""), _bytes(args.shard_size))
        else:
            _require(fmt == "lmjax", f"--from-hf imports: write --to lmjax DIR, not --to {fmt}")
            src = Path(args.from_hf)
            _require(
                (src / "config.json").is_file(),
                f"--from-hf {src} has no config.json; give a "
                "Hugging Face checkpoint folder (as save_pretrained writes it)",
            )
            import_hf(src, dest, DTYPES[args.dtype or "fp32"])
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    return 0


def export_hf(
    workdir: storage.PathLike, out: Path, dtype: str | None, shard_bytes: int, log: Log | None = None
) -> None:
    """Write the newest checkpoint of the run in `workdir` into `out` in the HF layout."""
    log = log or _print
    _require_empty(out)
    workdir = storage.path(workdir)
    saved = checkpoint.newest_saved(workdir, log)  # the run may be training now
    m = saved.exp.model
    hf_config.check_exportable(m)  # before the tokenizer or any weight is read, or anything written
    tokenizer = Tokenizer.load(workdir / "tokenizer.model")
    dtype = dtype or (m.param_dtype if m.param_dtype in hf_safetensors.DTYPES else "float32")
    hf_cfg = hf_config.hf_config(m, tokenizer.bos_id, tokenizer.eos_id, dtype)

    # Written beside OUT and renamed when complete: an interrupted export leaves no OUT to load.
    final, out = out, _partial(out)
    writer = hf_safetensors.Writer(out, hf_layout.hf_tensors(m), dtype, shard_bytes)
    params_dir = workdir / "checkpoints" / str(saved.step) / "params"
    groups: dict[tuple[str, ...], list[hf_layout.Link]] = {}
    for link in hf_layout.links(m):
        groups.setdefault(link.params, []).append(link)
    for names, group in groups.items():  # one group of stacked parameters in memory at a time
        try:
            arrays = _restore(params_dir, names)
        except Exception as e:  # noqa: BLE001 - damaged or unreadable arrays: the user's to fix
            first = (str(e).strip().splitlines() or [""])[0][:160]
            shutil.rmtree(out, ignore_errors=True)
            raise UserError(f"could not read {params_dir} ({type(e).__name__}: {first})") from e
        for link in group:
            for i, name in enumerate(link.names(m.n_layers)):
                parts = [arrays[p][i] if link.layered else arrays[p] for p in names]
                writer.write(name, link.to_hf(*parts))
        del arrays
    writer.close()
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    for note in hf_tokenizer.export(tokenizer.model_proto, out, m.seq_len, shown=final):
        log(note)
    _finish(out, final)
    log(
        f"exported step {saved.step} of {workdir} to {final} ({hf_cfg['architectures'][0]}, {dtype}, "
        f"{len(writer.files)} safetensors file(s))"
    )


def _restore(params_dir: storage.Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Only the parameters `names` ("layers.w_q") of a checkpoint, as host numpy arrays."""
    item: dict[str, Any] = {}  # nested by the names' parts, as the checkpoint's tree
    args: dict[str, Any] = {}
    for name in names:
        *parents, leaf = name.split(".")
        i, a = item, args
        for key in parents:
            i, a = i.setdefault(key, {}), a.setdefault(key, {})
        i[leaf] = {"value": np.zeros(())}  # a placeholder: numpy restores take the stored shape
        a[leaf] = {"value": ocp.RestoreArgs(restore_type=np.ndarray)}
    restored = ocp.PyTreeCheckpointer().restore(
        params_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
    )
    out = {}
    for name in names:
        node = restored
        for key in name.split("."):
            node = node[key]
        out[name] = node["value"]
    return out


def import_hf(src: Path, dest: Path, param_dtype: str, log: Log | None = None) -> config.Experiment:
    """Turn the HF checkpoint folder `src` into an lmjax run folder `dest` (step-0 checkpoint)."""
    log = log or _print
    _require_empty(dest)
    dest = dest.absolute()
    where = src / "config.json"
    try:
        hf_cfg = json.loads(where.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{where} is not readable JSON ({e}); give a Hugging Face config.json") from None
    m = hf_config.model_from_hf(hf_cfg, str(where), param_dtype)
    proto = hf_tokenizer.import_(src)
    template = hf_tokenizer.chat_template(src)
    n_pieces = Tokenizer(proto).vocab_size
    if n_pieces > m.vocab_size:
        raise UserError(
            f"{src}/tokenizer.model has {n_pieces} pieces but config.json vocab_size={m.vocab_size}"
        )
    reader = hf_safetensors.Reader(src)
    rename = _check_tensors(reader, m, src)
    stored = {reader.dtype(rename(name)) for name, _ in hf_layout.hf_tensors(m)}
    m = dataclasses.replace(m, dtype=compute_dtype(stored))

    by_param = {p: (link, k) for link in hf_layout.links(m) for k, p in enumerate(link.params)}
    device = jax.sharding.SingleDeviceSharding(host_device())  # not an accelerator's memory

    def load(path: tuple, abstract: jax.ShapeDtypeStruct) -> jax.Array:
        link, k = by_param[".".join(str(getattr(p, "key", "")) for p in path if hasattr(p, "key"))]
        parts = [link.from_hf(reader.get(rename(n)))[k] for n in link.names(m.n_layers)]
        x = np.stack(parts) if link.layered else parts[0]
        return jax.device_put(x.astype(abstract.dtype), device)  # one stacked parameter on the host

    _, abstract = step.abstract_model(m)
    params = jax.tree_util.tree_map_with_path(load, abstract)
    assert isinstance(params, nnx.State)
    # Evaluation tokenizes the corpus with data.tokenizer_path: the imported tokenizer, which
    # the model's ids mean (without it, a fresh tokenizer would be trained on the corpus).
    data = config.Data(vocab_size=n_pieces, tokenizer_path=str(dest / "tokenizer.model"))
    exp = config.Experiment(name=f"hf-{src.absolute().name}", model=m, data=data)
    # Built beside DIR and renamed when complete: a failed import leaves no DIR (and a rerun works).
    partial = _partial(dest)
    try:
        ckpts = checkpoint.Checkpoints(partial, log=log)
        # A warm start reads only the parameters; "identity" keeps this folder from being resumed as a run.
        items = {"loader": {}, "corpus": "", "identity": f"imported from {src.absolute()}"}
        try:
            ckpts.save({"params": params, "step": jax.numpy.zeros((), jax.numpy.int32)}, items, exp)
            ckpts.wait()
        finally:
            ckpts.close()
        del params
        write_atomic(partial / "config.json", (json.dumps(config.to_dict(exp), indent=2) + "\n").encode())
        write_atomic(partial / "tokenizer.model", proto)
        if template is not None:
            write_atomic(partial / chat_jinja.JINJA_FILE, template.encode())
        _finish(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(dtype_note(dest, m.dtype, stored))
    log(
        f"imported {src} ({hf_cfg['architectures'][0]}) into {dest}; train from it with "
        f"--set checkpoint.init_from={dest} {' '.join(model_sets(m, n_pieces))}"
    )
    return exp


def compute_dtype(stored: set[str]) -> str:
    """The model.dtype an imported checkpoint computes in, from its tensors' safetensors dtypes:
    bfloat16 where they are all BF16 (the precision it was saved for), else float32. F32 weights
    then give the logits of the model they were saved from (in bf16 they differ in the first
    decimal), and F16 ones keep the 3 mantissa bits that bf16 lacks."""
    return "bfloat16" if stored == {"BF16"} else "float32"


def dtype_note(dest: Path, dtype: str, stored: set[str]) -> str:
    """One line: the compute dtype an import chose, why, and how generation and evaluation change it."""
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    return (
        f"{dest} computes in {dtype} (model.dtype; its tensors are {', '.join(sorted(stored))}); "
        f"give lmjax.generate or lmjax.evaluate --set model.dtype={other} to compute in {other}"
    )


def model_sets(m: config.Model, n_pieces: int) -> list[str]:
    """The `--set model.*` flags a warm-started run needs to have this model's shapes."""
    keys = ["flavour", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "tie_embeddings", "norm_eps"]
    keys += ["seq_len"] if m.flavour == "gpt2" else ["rope_theta"]
    keys += ["qkv_bias"] if m.qkv_bias else []  # Qwen2: three more parameters per layer
    keys += ["sliding_window"] if m.sliding_window else []  # Mistral: no new shapes, other logits
    sets = [f"--set model.{k}={str(getattr(m, k)).lower()}" for k in keys]
    return sets + ([f"--set model.vocab_size={m.vocab_size}"] if m.vocab_size != n_pieces else [])


def _check_tensors(reader: hf_safetensors.Reader, m: config.Model, src: Path) -> Callable[[str], str]:
    """Refuse, naming the tensor and both shapes, a checkpoint whose tensors do not fit `m`.
    Returns the map from lmjax's HF names to the file's (GPT-2 files may lack `transformer.`)."""
    names = set(reader.file_of)
    prefix = m.flavour == "gpt2" and "transformer.wte.weight" not in names and "wte.weight" in names

    def rename(name: str) -> str:
        return name.removeprefix("transformer.") if prefix else name

    wanted = {rename(n): s for n, s in hf_layout.hf_tensors(m)}
    arch = f"{hf_config.architecture(m)} of {src}/config.json"
    for name, shape in wanted.items():
        if name not in names:
            raise UserError(f"{src}: tensor {name} is missing; {arch} needs it with shape {shape}")
        if reader.shape(name) != shape:
            raise UserError(f"{src}: tensor {name} has shape {reader.shape(name)} but {arch} needs {shape}")
        if reader.dtype(name) not in FLOAT_DTYPES:
            raise UserError(
                f"{src}: tensor {name} is {reader.dtype(name)}; lmjax imports floating-point weights "
                f"only ({', '.join(FLOAT_DTYPES)})"
            )
    extra = sorted(names - set(wanted) - ({"lm_head.weight"} if m.tied else set()))  # tied copies
    if extra:
        raise UserError(
            f"{src}: tensor {extra[0]} {reader.shape(extra[0])} has no place in lmjax's {m.flavour} model"
        )
    return rename


def _bytes(text: str) -> int:
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    _require(bool(found) and found[2] in UNITS, f"--shard-size {text!r}: give a size like 5GB or 500MB")
    return max(1, int(float(found[1]) * UNITS[found[2]]))


def host_device() -> jax.Device:
    """The host's CPU device, where import assembles the model (on a GPU or TPU host the default
    device is an accelerator, which the whole model would then have to fit in); the first local
    device where the CPU backend is not loaded (JAX_PLATFORMS naming accelerators only)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # "Unknown backend cpu" / "Backend 'cpu' failed to initialize"
        return jax.local_devices()[0]


def _require_empty(dest: Path) -> None:
    _require(not dest.exists() or dest.is_dir(), f"{dest} is a file; give a new folder")
    _require(not dest.exists() or not any(dest.iterdir()), f"{dest} is not empty; give a new folder")


def _partial(dest: Path) -> Path:
    """A fresh, empty `.NAME.partial` folder beside `dest`, to be renamed `dest` when complete."""
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"cannot create {partial} ({e.strerror}); give a new folder elsewhere") from None
    return partial


def _finish(partial: Path, dest: Path) -> None:
    if dest.exists():
        dest.rmdir()  # empty: checked first
    partial.rename(dest)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _print(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
