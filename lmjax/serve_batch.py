"""The server's decoding queue: requests wait as `Job`s, and one worker thread, which alone uses
the Generator, decodes up to `max_batch` of them at a time as one static batch.

Rows of a batch share the sampling settings (`Sampling.batch_key`) and one token limit: the
longest prompt must leave room for every row's `max_tokens`. Each row then ends on its own
(its stop ids, stop texts, token limit, or its client leaving) through the Generator's
`cancelled` hook, and its text goes back to the event loop as it is decoded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from lmjax.generate import Generator, TextStream

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    seed: int | None  # None: a fresh seed per batch

    @property
    def batch_key(self) -> tuple[float, float] | int:
        """Jobs with equal keys may share a batch. Greedy ignores top_p and the seed; a seeded
        draw runs alone, so the same seed gives the same text whatever else is waiting."""
        if self.temperature == 0:
            return (0.0, 1.0)
        if self.seed is not None:
            return id(self)
        return (self.temperature, self.top_p)


class JobFailed(Exception):
    """The batch a job was in could not be decoded."""


class Job:
    """One request's row: its prompt, how it may end, and a queue that hands its text to the
    event loop. `add` and `end` run on the worker thread, `leave` and `texts` on the loop."""

    def __init__(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: Sampling,
        stop_ids: Sequence[int],
        stop_texts: Sequence[str],
        decode: Callable[[list[int]], str],
    ):
        self.prompt_ids, self.max_tokens, self.sampling = prompt_ids, max_tokens, sampling
        self.stop_ids, self.stop_texts = frozenset(stop_ids), tuple(s for s in stop_texts if s)
        self.tokens = 0  # produced, a stop id left out
        self.finish_reason: str | None = None  # "stop" or "length" once the row has ended
        self.gone = False  # the client left before the row ended
        self.error: str | None = None
        self._stream = TextStream(decode)
        self._text, self._sent, self._stopped_by_text = "", 0, False
        self._loop = asyncio.get_running_loop()
        self._pieces: asyncio.Queue[str | None] = asyncio.Queue()  # None: no more text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.gone or self.error is not None

    def add(self, ids: list[int]) -> None:
        for token in ids:
            if self.done:
                return
            if token in self.stop_ids:
                self.end("stop")
                return
            self.tokens += 1
            if self._show(self._stream.add([token]), final=False):
                self.end("stop")
            elif self.tokens >= self.max_tokens:
                self.end("length")

    def end(self, reason: str) -> None:
        """The row is over: what the text stream held back goes out, then the end."""
        if self.done:
            return
        if self._show(self._stream.finish(), final=True):
            reason = "stop"
        self.finish_reason = reason
        self._put(None)

    def fail(self, message: str) -> None:
        if not self.done:
            self.error = message
            self._put(None)

    def leave(self) -> None:
        """The client went away: the worker drops the row at its next token."""
        if self.finish_reason is None:
            self.gone = True

    async def texts(self) -> AsyncIterator[str]:
        """The reply's text as it is decoded; JobFailed if its batch failed."""
        while (piece := await self._pieces.get()) is not None:
            yield piece
        if self.error is not None:
            raise JobFailed(self.error)

    def _show(self, new: str, final: bool) -> bool:
        """Hand out `new`, cut at the first stop text; text that may be the start of a stop
        text is held back until it is clear. True once a stop text was met."""
        if self._stopped_by_text:
            return True
        self._text += new
        cut = min((i for s in self.stop_texts if (i := self._text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._text, self._stopped_by_text, final = self._text[:cut], True, True
        held = 0 if final else max((_overlap(self._text, s) for s in self.stop_texts), default=0)
        end = len(self._text) - held
        if end > self._sent:
            self._put(self._text[self._sent : end])
            self._sent = end
        return self._stopped_by_text

    def _put(self, piece: str | None) -> None:
        self._loop.call_soon_threadsafe(self._pieces.put_nowait, piece)


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


class Stats:
    """Counters of what was decoded, and the rows of the last batches (`GET /stats`)."""

    def __init__(self, keep: int = 50):
        self._lock = threading.Lock()
        self._totals = {"batches": 0, "rows": 0, "tokens": 0, "rows_left": 0}
        self._recent: collections.deque[dict] = collections.deque(maxlen=keep)

    def record(self, batch: Sequence[Job], seconds: float) -> dict:
        rows = [
            {"tokens": j.tokens, "max_tokens": j.max_tokens, "finish_reason": j.finish_reason or "left"}
            for j in batch
        ]
        entry = {"rows": rows, "tokens": sum(j.tokens for j in batch), "seconds": round(seconds, 4)}
        with self._lock:
            self._totals["batches"] += 1
            self._totals["rows"] += len(batch)
            self._totals["tokens"] += entry["tokens"]
            self._totals["rows_left"] += sum(j.gone for j in batch)
            self._recent.append(entry)
        return entry

    def snapshot(self) -> dict:
        with self._lock:
            return {**self._totals, "recent_batches": list(self._recent)}


class Batcher:
    """Waiting jobs and the one thread that decodes them; `run` is the event loop's side."""

    def __init__(self, generator: Generator, max_batch: int, log: Log):
        self.generator, self.max_batch, self.log = generator, max_batch, log
        self.stats = Stats()
        self._waiting: list[Job] = []
        self._arrived = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmjax-decode")

    def submit(self, job: Job) -> None:
        self._waiting.append(job)
        self._arrived.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while batch := self._take():
                await loop.run_in_executor(self._worker, self._decode, batch)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _take(self) -> list[Job]:
        """The oldest waiting job and, in order, those that may share its batch."""
        self._waiting = [j for j in self._waiting if not j.gone]
        if not self._waiting:
            return []
        first = self._waiting[0]
        batch, longest, most = [first], len(first.prompt_ids), first.max_tokens
        for job in self._waiting[1:]:
            if len(batch) == self.max_batch:
                break
            with_job = max(longest, len(job.prompt_ids)), max(most, job.max_tokens)
            # Positions end at the context's last: the longest prompt sets how far all rows go.
            if (
                job.sampling.batch_key == first.sampling.batch_key
                and self.generator.room(with_job[0]) >= with_job[1]
            ):
                batch.append(job)
                longest, most = with_job
        self._waiting = [j for j in self._waiting if all(j is not b for b in batch)]
        return batch

    def _decode(self, batch: list[Job]) -> None:
        started = time.monotonic()
        sampling = batch[0].sampling
        seed = random.getrandbits(31) if sampling.seed is None else sampling.seed % 2**31
        try:
            self.generator.generate_ids(
                [j.prompt_ids for j in batch],
                max(j.max_tokens for j in batch),
                sampling.temperature,
                top_p=sampling.top_p,
                seed=seed,
                on_tokens=lambda row, ids: batch[row].add(ids),
                stop_ids=(),  # each row stops on its own ids (Job.add)
                cancelled=lambda row: batch[row].done,
            )
        except Exception as e:  # noqa: BLE001 - the server outlives a batch it could not decode
            self.log(traceback.format_exc())
            for job in batch:
                job.fail(f"decoding failed: {e}")
            return
        for job in batch:
            job.end("length")
        entry = self.stats.record(batch, time.monotonic() - started)
        self.log(f"batch: {len(batch)} rows, {entry['tokens']} tokens, {entry['seconds']:.2f} s")
