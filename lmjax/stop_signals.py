"""SIGTERM (preemption), SIGINT (Ctrl-C) and SIGHUP (the terminal or SSH session closed) ask the
training loop to stop after its step."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long a second signal waits for the main thread to act on it before the process ends
# anyway: Python runs signal handlers only between bytecodes, not inside a blocking call
# (a step waiting on the device, a compile, a hung collective).
BLOCKED_GRACE_S = 2.0
# A signal's handler as `signal.signal` hands it back: a function, SIG_DFL or SIG_IGN (ints), or
# None (one not set from Python).
Handler = Callable[[int, FrameType | None], object] | int | None


class StopRequests:
    """While active, the first SIGTERM, SIGINT or SIGHUP sets `requested` to its name, for the loop to
    finish its step, save and exit 0. A second one is for a user who will not wait for the
    save: a second SIGINT raises KeyboardInterrupt (so a notebook's kernel survives it), a
    second SIGTERM ends the process (status 128+15), as does any second signal the main thread
    is too blocked to handle within BLOCKED_GRACE_S. Outside the main thread signals cannot be
    caught, and this does nothing."""

    def __init__(self) -> None:
        self.requested = ""
        self.interrupted = False  # a second SIGINT was raised as KeyboardInterrupt
        self._handled = 0  # signals the main thread's handler has run for
        self._previous: dict[int, Handler] = {}
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd = -1

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        # Every signal also writes its number to this socket, where a thread counts it even
        # while the main thread is blocked.
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        # The watcher blocks the signals (a thread inherits the mask it is started with): the
        # kernel gives a signal to a thread that does not block it, and only the main thread's
        # handler acts at once, interrupting a sleep or a wait.
        unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        threading.Thread(target=self._watch, args=(reader,), name="lmjax-stop-signals", daemon=True).start()
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._wakeup is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        reader, writer = self._wakeup
        self._wakeup = None
        writer.close()
        reader.shutdown(socket.SHUT_RDWR)  # ends the watcher's recv

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._handled += 1
        name = signal.Signals(signum).name
        if self.requested:
            _say(f"lmjax: second signal ({name}): stopping now, without saving")
            if signum == signal.SIGINT:
                self.interrupted = True
                raise KeyboardInterrupt
            os._exit(128 + signum)
        self.requested = name
        _say(f"lmjax: {name}: stopping after this step and saving (send it again to exit at once)")

    def _watch(self, reader: socket.socket) -> None:
        received = 0
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in _SIGNALS:
                    continue
                received += 1
                if received >= 2:
                    time.sleep(BLOCKED_GRACE_S)
                    if self._wakeup is not None and self._handled < 2:
                        _say(
                            f"lmjax: second signal ({signal.Signals(signum).name}) while blocked: exiting now"
                        )
                        os._exit(128 + signum)


def _say(message: str) -> None:
    """To stderr without Python's buffered writer, which a handler may have interrupted."""
    os.write(2, (message + "\n").encode())
