"""A lossless sentencepiece tokenizer, trained on a bounded sample of the training split.

Lossless: identity normalisation, whitespace kept (runs of spaces become pieces, so
indentation is cheap), no dummy prefix, byte fallback for anything outside the vocabulary,
and "\n" as a piece of its own. So `decode(encode(text)) == text` for every valid string but
one that holds U+2581 ("▁", sentencepiece's own mark for a space: it decodes as a space), and
the UTF-8 bytes behind each id are known exactly (`token_bytes`), which is what bits per byte
needs. Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS). A model loaded from `data.tokenizer_path`
keeps its own settings and ids, but must have BOS and EOS; it may be on a bucket (`gs://...`),
and `save` writes one there whole.
"""

from __future__ import annotations

import heapq
import io
import itertools
import random

import numpy as np
import sentencepiece as spm

from lmjax import config, storage
from lmjax.config import UserError
from lmjax.data import sources

BOS_ID, EOS_ID = 1, 2
# Part of the token cache's key (cache.py): changing any of these retokenizes.
TRAINER_SETTINGS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,
    split_digits=True,
    character_coverage=0.9995,
    user_defined_symbols=["\n"],
    unk_id=0,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=-1,
    max_sentence_length=1 << 16,
    num_threads=2,
    minloglevel=2,
)


class Tokenizer:
    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError("the tokenizer has no <s> or </s> piece; lmjax frames documents with both")
        self._lines_are_independent = _lines_are_independent(model_proto)

    @classmethod
    def load(cls, path: storage.PathLike) -> Tokenizer:
        """The model at `path`, a local file or an object on a bucket."""
        path = storage.path(path)
        if not path.is_file():
            raise UserError(f"tokenizer {path} does not exist; give an existing sentencepiece .model")
        try:
            return cls(path.read_bytes())
        except RuntimeError:
            raise UserError(f"{path} is not a sentencepiece model; give a .model file") from None

    def save(self, path: storage.PathLike) -> None:
        storage.write_atomic(path, self.model_proto)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], threads: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids of all texts back to back, number of ids of each text), on `threads` (0: all).

        Encodes line by line where that gives the same ids as whole texts (`_lines_are_independent`):
        sentencepiece's BPE runs faster on shorter inputs."""
        if not self._lines_are_independent:
            ids = self._sp.encode(texts, num_threads=threads or -1)
            lengths = np.fromiter(map(len, ids), np.int64, len(ids))
            return np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())), lengths
        lines: list[str] = []
        lines_per_text = np.empty(len(texts), np.int64)
        for i, text in enumerate(texts):
            parts = text.split("\n")
            lines += [p + "\n" for p in parts[:-1]]
            lines += [parts[-1]] if parts[-1] else []
            lines_per_text[i] = len(parts) - (not parts[-1])
        ids = self._sp.encode(lines, num_threads=threads or -1)
        ids_per_line = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(ids_per_line.sum()))
        line_ends = np.cumsum(lines_per_text)
        ids_before_line = np.concatenate([[0], np.cumsum(ids_per_line)])
        return flat, np.diff(ids_before_line[np.concatenate([[0], line_ends])])

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for in decoded text (0 for <unk>, <s>, </s>)."""
        sp = self._sp
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                out[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode())
        return out


def _lines_are_independent(model_proto: bytes) -> bool:
    """True when no piece can depend on text across a "\n": BPE (unigram breaks ties by the
    whole input), "\n" a piece of its own, and no dummy prefix or whitespace folding (which
    would add or drop a space at each line start). lmjax's own models all qualify."""
    try:  # needs protobuf, which sentencepiece leaves optional
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # whole texts are always right
        return False
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    newline = [p for p in proto.pieces if p.piece == "\n"]
    return (
        proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
        and bool(newline)
        and newline[0].type == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        and not proto.normalizer_spec.add_dummy_prefix
        and not proto.normalizer_spec.remove_extra_whitespaces
        and proto.normalizer_spec.name == "identity"
    )


def sample(cfg: config.Data, seed: int = 0) -> list[str]:
    """About `tokenizer_sample_bytes` (UTF-8) of training documents, each corpus by its weight.

    A seeded reservoir (keep the documents with the smallest random keys that fit the budget)
    over the first 20x the budget of each corpus: uniform over small corpora, bounded reading
    of large ones.
    """
    components = cfg.components()
    total_weight = sum(c.weight for c in components)
    out: list[str] = []
    for c in components:
        budget = cfg.tokenizer_sample_bytes * c.weight / total_weight
        rng, heap, kept, seen = random.Random(seed), [], 0, 0
        for index, (split, text) in enumerate(sources.documents(c, cfg.validation_percent)):
            if split != "train":
                continue
            size = len(text.encode())
            heapq.heappush(heap, (-rng.random(), index, size, text))
            kept += size
            seen += size
            while kept > budget and len(heap) > 1:
                kept -= heapq.heappop(heap)[2]
            if seen >= 20 * budget:
                break
        out += [text for _, _, _, text in sorted(heap, key=lambda item: item[1])]
    if not any(out):
        raise UserError(f"the corpus ({sources.describe(components[0])}) is empty; give files with text")
    return out


def train(texts: list[str], cfg: config.Data, seed: int = 0) -> Tokenizer:
    """Train on lines drawn from `texts` (shuffled, seeded) up to `tokenizer_sample_bytes`."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)

    def sample():
        budget = cfg.tokenizer_sample_bytes
        for i in order:
            for line in texts[i].split("\n"):
                if budget <= 0:
                    return
                budget -= len(line) + 1
                yield line

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sample(),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.tokenizer,
            **TRAINER_SETTINGS,
        )
    except RuntimeError as e:
        raise UserError(
            f"tokenizer training failed ({e}); change data.vocab_size as it says, or add text"
        ) from None
    return Tokenizer(model.getvalue())
