"""A lossless sentencepiece tokenizer, trained on a bounded sample of the training split.

Lossless: identity normalisation, whitespace kept (runs of spaces become pieces, so
indentation is cheap), no dummy prefix, byte fallback for anything outside the vocabulary,
and "\n" as a piece of its own. So `decode(encode(text)) == text` for every valid string but
one that holds U+2581 ("▁", sentencepiece's own mark for a space: it decodes as a space), and
the UTF-8 bytes behind each id are known exactly (`token_bytes`), which is what bits per byte
needs. Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 "\\n", then the chat template's pieces (`CHAT_PIECES`,
see chat_template.py), reserved from the start so a base model can be fine-tuned to chat
without resizing its embedding. A model loaded from `data.tokenizer_path`
keeps its own settings and ids, but must have BOS and EOS; it may be on a bucket (`gs://...`),
and `save` writes one there whole.
"""

from __future__ import annotations

import heapq
import io
import random
import re
import threading

import numpy as np
import sentencepiece as spm

from lmjax import config, storage
from lmjax.config import UserError
from lmjax.data import segments, sources

BOS_ID, EOS_ID = 1, 2
CHAT_PIECES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Part of the token cache's key (cache.py): changing any of these retokenizes.
TRAINER_SETTINGS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,
    split_digits=True,
    character_coverage=0.9995,
    user_defined_symbols=["\n", *CHAT_PIECES],
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
        self._lines_are_independent = _lines_are_independent(model_proto, self._sp)
        self._words_are_independent = self._lines_are_independent and _words_are_independent(self._sp)
        self._known_segments: segments.EncodedSegments | None = None  # made on first use
        self._known_segments_lock = threading.Lock()

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

        Gives the ids of whole texts, the fastest way the model allows: segment by segment with
        each distinct segment encoded once (`_words_are_independent`), else line by line
        (`_lines_are_independent`: sentencepiece's BPE runs faster on shorter inputs)."""
        if self._words_are_independent:
            return self._encode_segments(texts, threads)
        if not self._lines_are_independent:
            return segments.flat(self._sp.encode(texts, num_threads=threads or -1))
        lines: list[str] = []
        lines_per_text = np.empty(len(texts), np.int64)
        for i, text in enumerate(texts):
            parts = text.split("\n")
            lines += [p + "\n" for p in parts[:-1]]
            lines += [parts[-1]] if parts[-1] else []
            lines_per_text[i] = len(parts) - (not parts[-1])
        flat, ids_per_line = segments.flat(self._sp.encode(lines, num_threads=threads or -1))
        return flat, segments.sums(ids_per_line, lines_per_text)

    def _encode_segments(self, texts: list[str], threads: int) -> tuple[np.ndarray, np.ndarray]:
        """`encode_batch` by segments, each distinct one encoded once and kept for later calls.
        Long texts are cut in parts: a part's new segments are encoded on a thread of their own
        (sentencepiece releases the GIL) while the next is cut; the last part's here."""
        known = self._encoded_segments()
        which, segments_per_text = [], []
        parts = list(segments.parts(texts, segments.PART_CHARS))
        for k, part in enumerate(parts):
            found, counts = segments.segments_of(part)
            which.append(known.numbers(found, threads, here=k == len(parts) - 1))
            segments_per_text.append(counts)
        return known.ids_of(np.concatenate(which), np.concatenate(segments_per_text))

    def _encoded_segments(self) -> segments.EncodedSegments:
        """The segments encoded so far, started afresh when there are too many (or an
        encoding failed, leaving numbered segments without ids)."""
        with self._known_segments_lock:
            known = self._known_segments
            if known is None or known.failed or len(known.index) > segments.CACHE_SIZE:
                known = self._known_segments = segments.EncodedSegments(self._sp)
            return known

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def pieces(self) -> list[tuple[str, int]]:
        """Each id's piece as the model spells it, and its type (NORMAL, CONTROL, USER_DEFINED,
        ...: sentencepiece's processor does not tell user-defined pieces apart)."""
        fields = [_proto_fields(piece) for piece in _proto_fields(self.model_proto)[1]]
        return [(f[1][-1].decode(), f.get(3, [NORMAL])[-1]) for f in fields]

    def piece_id(self, piece: str) -> int | None:
        """The id of the piece spelled `piece`, None when the model has no such piece."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

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


def _lines_are_independent(model_proto: bytes, sp: spm.SentencePieceProcessor) -> bool:
    """True when no piece can depend on text across a "\n": BPE (unigram breaks ties by the
    whole input), "\n" a piece of its own, and no dummy prefix or whitespace folding (which
    would add or drop a space at each line start). lmjax's own models all qualify.

    Reads the few fields it needs from the model's protobuf wire format itself: sentencepiece's
    generated protobuf module fails to import beside many protobuf runtimes."""
    model = _proto_fields(model_proto)
    trainer = _proto_fields(model.get(2, [b""])[-1])
    normalizer = _proto_fields(model.get(3, [b""])[-1])
    newline_id = sp.piece_to_id("\n")  # <unk>'s id when there is no such piece
    return (
        trainer.get(3, [_UNIGRAM])[-1] == _BPE
        and sp.id_to_piece(newline_id) == "\n"
        and _proto_fields(model[1][newline_id]).get(3, [NORMAL])[-1] == USER_DEFINED
        and not normalizer.get(3, [True])[-1]  # add_dummy_prefix, true unless set
        and not normalizer.get(4, [True])[-1]  # remove_extra_whitespaces, true unless set
        and normalizer.get(1, [b""])[-1] == b"identity"
    )


def _words_are_independent(sp: spm.SentencePieceProcessor) -> bool:
    """True when no piece holds a space (U+2581 in pieces) right after another character, so
    no piece spans the start of a run of spaces: lmjax's models split words at spaces, and
    their pieces are space runs, or one space or none before other text."""
    return not any(map(_SPACE_AFTER_TEXT.search, sp.id_to_piece(list(range(sp.get_piece_size())))))


_SPACE_AFTER_TEXT = re.compile("[^\u2581]\u2581")


# sentencepiece_model.proto: TrainerSpec.ModelType and ModelProto.SentencePiece.Type values
_UNIGRAM, _BPE = 1, 2
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


def _proto_fields(message: bytes) -> dict[int, list[int | bytes]]:
    """A protobuf message's fields by number, each a list of its values in order: varints as
    ints, length-delimited fields as bytes (fixed-width ones are skipped)."""
    fields: dict[int, list[int | bytes]] = {}
    at = 0
    while at < len(message):
        key, at = _varint(message, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = _varint(message, at)
            fields.setdefault(number, []).append(value)
        elif wire_type == 2:
            size, at = _varint(message, at)
            fields.setdefault(number, []).append(message[at : at + size])
            at += size
        elif wire_type in (1, 5):
            at += 8 if wire_type == 1 else 4
        else:
            raise UserError("the tokenizer model is not a sentencepiece model proto; give a .model file")
    return fields


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


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
        for index, (split, content) in enumerate(sources.documents(c, cfg.validation_percent)):
            if split != "train":
                continue
            text = sources.text_of(content)
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
