"""Encoding by segments: where no piece of a model runs from other text into a space, a text is
cut into segments (a run of spaces and the text up to the next space) whose ids do not depend on
what stands around them, and each distinct segment is encoded once (`EncodedSegments`, kept by
a Tokenizer across its calls). Also the helpers that turn sentencepiece's lists into arrays."""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import sentencepiece as spm

# A segment: a run of spaces (" " or U+2581, which sentencepiece reads as one) and the text up to
# the next space, or spaces alone; its ids are the same wherever it stands.
SEGMENT = re.compile("[ \u2581]*[^ \u2581]+|[ \u2581]+")
CACHE_SIZE = 1 << 19  # distinct segments kept encoded before starting afresh
PART_CHARS = 1 << 18  # texts cut into parts this long: a part's new segments encode while the next is cut


class _Numbering(dict):
    """Segment -> number; an unknown segment gets the next number and joins `new`."""

    def __init__(self):
        super().__init__()
        self.new: list[str] = []

    def __missing__(self, segment: str) -> int:
        number = self[segment] = len(self)
        self.new.append(segment)
        return number


class EncodedSegments:
    """Distinct segments and their ids, shared by the calls of one Tokenizer (on any thread).
    Segments are numbered in the order first seen, under `lock`; each batch of new ones is
    encoded by the thread that numbered it or by `encoder`, a thread of its own (sentencepiece
    releases the GIL, so other work runs meanwhile), and its ids kept in numbering order:
    segment i's are `ids[starts[i] : starts[i] + lengths[i]]`, in buffers that double as they
    fill. `failed`: a batch could not be encoded, so those after it never get their ids."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        self._sp = sp
        self.lock = threading.Condition()
        self.index = _Numbering()
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="lmjax-segments")
        self.failed = False
        self.ids = np.zeros(1 << 16, np.int32)
        self.starts = np.zeros(1 << 12, np.int64)
        self.lengths = np.zeros(1 << 12, np.int64)
        self.n_ids = self.n_segments = 0

    def numbers(self, segments: list[str], threads: int, here: bool) -> np.ndarray:
        """Each segment's number; the new ones are encoded `here` (before returning) or on the
        encoder thread. Batches go to the encoder in numbering order, so none waits on a later one."""
        with self.lock:
            try:
                which = np.fromiter(map(self.index.__getitem__, segments), np.int64, len(segments))
                new, self.index.new = self.index.new, []
                first = len(self.index) - len(new)
                if new and not here:
                    self.encoder.submit(self._encode, new, first, threads)
            except BaseException:  # numbered segments that nobody will encode
                self._fail()
                raise
        if new and here:
            self._encode(new, first, threads)
        return which

    def ids_of(self, which: np.ndarray, segments_per_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids of the segments `which` back to back, how many ids each group of
        `segments_per_text` segments has), once all of them are encoded."""
        needed = int(which.max()) + 1 if len(which) else 0
        with self.lock:
            self.lock.wait_for(lambda: self.n_segments >= needed or self.failed)
            if self.n_segments < needed:
                raise RuntimeError("sentencepiece failed to encode an earlier batch of segments")
            lengths, starts, ids = self.lengths[which], self.starts[which], self.ids
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        return ids[np.repeat(starts - (ends - lengths), lengths) + np.arange(total)], sums(
            lengths, segments_per_text
        )

    def _encode(self, segments: list[str], first: int, threads: int) -> None:
        """Encode `segments`, numbered from `first`, each alone; keep their ids after those of
        the segments numbered before them."""
        try:
            ids, lengths = flat(self._sp.encode(segments, num_threads=threads or -1))
            with self.lock:
                self.lock.wait_for(lambda: self.n_segments == first or self.failed)
                if self.failed:
                    return
                n = len(lengths)
                self.ids = _with_room(self.ids, self.n_ids + len(ids))
                self.starts = _with_room(self.starts, first + n)
                self.lengths = _with_room(self.lengths, first + n)
                self.ids[self.n_ids : self.n_ids + len(ids)] = ids
                self.starts[first : first + n] = self.n_ids + np.cumsum(lengths) - lengths
                self.lengths[first : first + n] = lengths
                self.n_ids += len(ids)
                self.n_segments += n
                self.lock.notify_all()
        except BaseException:  # even an interrupt: the segments after these must not wait forever
            self._fail()
            raise

    def _fail(self) -> None:
        with self.lock:
            self.failed = True
            self.lock.notify_all()


def parts(texts: list[str], chars: int) -> Iterator[list[str]]:
    """`texts` in consecutive parts of about `chars` characters."""
    part, size = [], 0
    for text in texts:
        part.append(text)
        size += len(text)
        if size >= chars:
            yield part
            part, size = [], 0
    if part or not texts:
        yield part


def segments_of(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """(all segments of `texts`, in order; how many each text has)."""
    segments: list[str] = []
    counts = np.empty(len(texts), np.int64)
    for i, text in enumerate(texts):
        found = SEGMENT.findall(text)
        segments += found
        counts[i] = len(found)
    return segments, counts


def _with_room(buffer: np.ndarray, size: int) -> np.ndarray:
    if size <= len(buffer):
        return buffer
    grown = np.zeros(max(size, 2 * len(buffer)), buffer.dtype)
    grown[: len(buffer)] = buffer
    return grown


def flat(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """sentencepiece's ids of several inputs as (all back to back, how many each)."""
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())), lengths


def sums(counts: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """Sums of `counts` over consecutive groups of `group_sizes` items (some may be empty)."""
    before = np.concatenate([[0], np.cumsum(counts)])
    return np.diff(before[np.concatenate([[0], np.cumsum(group_sizes)])])
