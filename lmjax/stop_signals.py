"""SIGTERM (preemption) and SIGINT (Ctrl-C) ask the training loop to stop after its step."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """While active, the first SIGTERM or SIGINT sets `requested` to its name, for the loop to
    finish its step, save and exit 0. A second one ends the process at once (status 128+N),
    for a user who will not wait for the save. Outside the main thread signals cannot be
    caught, and this does nothing."""

    def __init__(self) -> None:
        self.requested = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            print(f"lmjax: second signal ({name}): exiting now, without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = name
        print(
            f"lmjax: {name}: stopping after this step and saving (send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )
