"""The run's sentencepiece tokenizer in a Hugging Face folder, and back.

Export writes `tokenizer.model` (the sentencepiece model itself), `special_tokens_map.json`,
`tokenizer_config.json` and, for lmjax's own lossless BPE models (identity normalisation, no
dummy prefix, whitespace kept) when the `tokenizers` package is installed, a `tokenizer.json`
built with it that encodes exactly as sentencepiece does (the tests compare them on held-out
text), with `<s>` put in front as lmjax frames documents. `AutoTokenizer` then loads a
`PreTrainedTokenizerFast` from it, without sentencepiece; `split_special_tokens` keeps it
from reading the literal text "<s>" as BOS, as sentencepiece does. Unigram models get no
tokenizer.json: one built by `tokenizers.models.Unigram` can split a text differently from
sentencepiece where two segmentations score the same.

Without tokenizer.json, `tokenizer_config.json` names `LlamaTokenizer`, and `AutoTokenizer`
(use_fast=True) converts tokenizer.model with transformers' LlamaConverter (legacy): BPE,
spaces replaced by "▁", one "▁" prepended when `add_prefix_space` (set from the model's own
add_dummy_prefix, as LLaMA-2's), and sentencepiece's normalisation rules and whitespace
removal ignored. Where that differs from sentencepiece (a normalisation other than identity,
removed spaces, a unigram model) the export says so, and `use_fast=False` loads the
sentencepiece tokenizer itself.

Import reads a sentencepiece `tokenizer.model` only: lmjax's data pipeline, bits-per-byte and
generation tokenize with sentencepiece, and a `tokenizer.json`-only folder (GPT-2's byte-level
BPE, LLaMA 3's tiktoken BPE) has no sentencepiece equivalent. A chat template comes along
(`chat_template`): a `chat_template.jinja` file (as newer transformers saves it), else
tokenizer_config.json's `chat_template` (a string, or named templates of which "default").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lmjax.config import UserError
from lmjax.data.tokenizer import Tokenizer

if TYPE_CHECKING:  # annotations only: both need packages that are optional when running
    import tokenizers
    from sentencepiece.sentencepiece_model_pb2 import ModelProto

SPACE = "\u2581"  # sentencepiece's mark for a space


def export(model_proto: bytes, out: Path, seq_len: int, shown: Path | None = None) -> list[str]:
    """Write the tokenizer files into `out` (to be shown as `shown`); returns notes on what
    could not be written and how to load what was."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf, optional for sentencepiece

    tok = Tokenizer(model_proto)
    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    (out / "tokenizer.model").write_bytes(model_proto)
    pieces = [p.piece for p in proto.pieces]
    unk = proto.trainer_spec.unk_id
    special = {"bos_token": pieces[tok.bos_id], "eos_token": pieces[tok.eos_id], "unk_token": pieces[unk]}
    _write_json(out / "special_tokens_map.json", special)
    notes, fast = [], False
    why_not = _why_no_tokenizer_json(proto)
    if not why_not:
        try:
            _tokenizer_json(proto, tok.bos_id).save(str(out / "tokenizer.json"))
            fast = True
        except ImportError:
            why_not = "pip install tokenizers (lmjax[hf]) to write one"
    if why_not:
        unfaithful = _why_fast_conversion_differs(proto)
        if unfaithful:
            how = (
                f"transformers' default fast conversion of tokenizer.model would encode differently "
                f"({unfaithful}): load it with AutoTokenizer.from_pretrained({shown or out}, "
                "use_fast=False) (sentencepiece)"
            )
        else:
            how = "AutoTokenizer converts tokenizer.model to LlamaTokenizerFast, which encodes the same"
        notes.append(f"no tokenizer.json ({why_not}); {how}")
    _write_json(
        out / "tokenizer_config.json",
        {
            # Fast: exactly tokenizer.json. Otherwise LlamaTokenizer: legacy=True runs sentencepiece
            # on tokenizer.model as is (use_fast=False); AutoTokenizer's default converts it with
            # LlamaConverter, which drops sentencepiece's normalizer and prepends "▁" only when
            # add_prefix_space says so: the model's own dummy prefix.
            "tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,  # the text "<s>" is three pieces, as in sentencepiece
            "model_max_length": seq_len,
        },
    )
    return notes


def _why_no_tokenizer_json(proto: ModelProto) -> str:
    n = proto.normalizer_spec
    if n.name != "identity" or n.precompiled_charsmap or n.add_dummy_prefix or n.remove_extra_whitespaces:
        return "its normalisation is not lmjax's lossless one (identity, no dummy prefix, spaces kept)"
    if proto.trainer_spec.model_type != 2:  # BPE
        return "only BPE models convert exactly"
    return ""


def _why_fast_conversion_differs(proto: ModelProto) -> str:
    """Why transformers' LlamaConverter (a BPE model, spaces as "▁", "▁" prepended when
    add_prefix_space) would not encode as sentencepiece does with `proto`; "" when it would."""
    n = proto.normalizer_spec
    if n.precompiled_charsmap or n.name not in ("", "identity"):
        return f"it drops sentencepiece's {n.name or 'custom'} normalisation"
    if n.remove_extra_whitespaces:
        return "it keeps the runs of spaces that sentencepiece removes"
    if proto.trainer_spec.model_type != 2:  # BPE
        kind = proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type).lower()
        return f"a {kind} model, which the converted one can split differently"
    return ""


def _tokenizer_json(proto: ModelProto, bos_id: int) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` computing what sentencepiece computes with `proto`."""
    # Optional (lmjax[hf]): without it, `export` writes no tokenizer.json and says so.
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kinds = proto.SentencePiece.Type
    pieces = list(proto.pieces)
    # sentencepiece BPE merges the adjacent pair whose concatenation is the best-scored piece:
    # as HF merges, every split of each piece into two pieces, by the whole piece's score.
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == kinds.NORMAL}
    merges = []
    for p in sorted((p for p in pieces if p.type == kinds.NORMAL), key=lambda p: -p.score):
        splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
        splits = [s for s in splits if s[0] in normal and s[1] in normal]
        merges += sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))
    unk = pieces[proto.trainer_spec.unk_id].piece
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # sentencepiece matches user-defined pieces ("\n") before the model; control pieces never.
    tok.add_special_tokens(
        [AddedToken(p.piece, normalized=False) for p in pieces if p.type in (kinds.CONTROL, kinds.UNKNOWN)]
    )
    tok.add_tokens(
        [AddedToken(p.piece, normalized=False, special=False) for p in pieces if p.type == kinds.USER_DEFINED]
    )
    bos = pieces[bos_id].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return tok


def import_(folder: Path) -> bytes:
    """The sentencepiece model of a Hugging Face folder, checked (lmjax needs `<s>`, `</s>`)."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        has = "a tokenizer.json" if (folder / "tokenizer.json").is_file() else "no tokenizer"
        raise UserError(
            f"{folder} has {has} but no sentencepiece tokenizer.model; lmjax tokenizes with "
            "sentencepiece only (a byte-level BPE tokenizer.json, as GPT-2's or LLaMA 3's, has no "
            "sentencepiece equivalent): import a checkpoint that ships a tokenizer.model"
        )
    return Tokenizer.load(path).model_proto


def chat_template(folder: Path) -> str | None:
    """The Jinja source of a Hugging Face folder's chat template; None when it has none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (ValueError, AttributeError):
        raise UserError(
            f"{path} is not a JSON object; give the tokenizer_config.json transformers writes"
        ) from None
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the one named "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise UserError(
                f'{path}: chat_template names {", ".join(map(str, named))} but none "default"; '
                "write the one to use to chat_template.jinja beside it"
            )
    if template is not None and not isinstance(template, str):
        raise UserError(f"{path}: chat_template must be Jinja text or a list of named templates")
    return template


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
