"""One trainer per run: `WORKDIR/.lmjax-lock`, held while `lmjax.train` runs there.

A second trainer on the same workdir exits 2 at once, naming the one that holds it (host, pid,
start time). A lock left by a killed trainer is taken over without a word from anyone:

- a local folder: `flock` on the lock file, which the kernel releases when its holder dies
  (however it dies). The file also records who holds it, for the message.
- a bucket: an object created with a generation-match precondition (`ifGenerationMatch=0`),
  whose holder rewrites it every HEARTBEAT_S (again conditional on the generation it wrote).
  One not rewritten for STALE_S, or written from this host by a process that no longer exists
  (a preempted VM that came back), belongs to a trainer that is gone: it is deleted conditional
  on the generation read, so of two trainers taking it over only one succeeds.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
from typing import IO, TYPE_CHECKING

from lmjax import storage
from lmjax.config import UserError

if TYPE_CHECKING:  # google-cloud-storage: imported where a bucket is used
    from google.cloud.storage import Blob

NAME = ".lmjax-lock"
HEARTBEAT_S = 60.0
STALE_S = 300.0


def acquire(workdir: storage.PathLike) -> RunLock:
    """The workdir's lock, held by this process until `release`; UserError (exit 2) naming the
    holder when another trainer has it."""
    workdir = storage.path(workdir)
    lock = BucketLock(workdir / NAME) if storage.is_bucket(workdir) else FileLock(workdir / NAME)
    lock.acquire()
    return lock


def _holder() -> dict[str, str | int | float]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "heartbeat": time.time(),
    }


def _busy(where: storage.Path, holder: dict) -> UserError:
    return UserError(
        f"another lmjax.train is running in {where.parent}: pid {holder.get('pid')} on "
        f"{holder.get('host')}, started {holder.get('started')}; wait for it to end, or stop it, "
        "or use another --workdir"
    )


class FileLock:
    def __init__(self, path: storage.Path):
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open while the run lasts
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read()
            f.close()
            raise _busy(self.path, _parse(text)) from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_holder()) + "\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # the kernel drops the lock; the file stays, telling who last ran
            self._file = None


class BucketLock:
    def __init__(self, path: storage.Path):
        self.path = path
        self._generation: int | None = None
        self._holder = _holder()  # who this process is, from when it took the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        from google.api_core import exceptions

        blob = self._blob()
        for _ in range(3):  # a stale lock is deleted, then created anew: at most a couple of rounds
            try:
                blob.upload_from_string(json.dumps(self._holder), if_generation_match=0)
                self._generation = blob.generation
                break
            except exceptions.PreconditionFailed:
                pass
            try:
                blob.reload()
                holder = _parse(blob.download_as_text(if_generation_match=blob.generation))
            except exceptions.NotFound:
                continue  # released meanwhile: try again
            except exceptions.PreconditionFailed:
                continue  # rewritten meanwhile: look again
            if not _gone(holder):
                raise _busy(self.path, holder)
            try:  # a trainer that is gone: only one of those taking over deletes it
                blob.delete(if_generation_match=blob.generation)
            except (exceptions.NotFound, exceptions.PreconditionFailed):
                pass
        else:
            raise UserError(f"could not take the lock {self.path}: it kept changing; try again")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="lmjax-lock-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        from google.api_core import exceptions

        blob = self._blob()
        while not self._stop.wait(HEARTBEAT_S):
            self._holder["heartbeat"] = time.time()  # its start time stays what the message names
            try:
                blob.upload_from_string(json.dumps(self._holder), if_generation_match=self._generation)
                self._generation = blob.generation
            except exceptions.PreconditionFailed:
                return  # taken over (this process looked gone for STALE_S): nothing of ours to keep
            except Exception:  # noqa: BLE001 - a network error: the next beat tries again
                continue

    def release(self) -> None:
        from google.api_core import exceptions

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._generation is not None:
            try:
                self._blob().delete(if_generation_match=self._generation)
            except (exceptions.NotFound, exceptions.PreconditionFailed):
                pass
            self._generation = None

    def _blob(self) -> Blob:
        return storage.gcs_blob(self.path)


RunLock = FileLock | BucketLock


def _gone(holder: dict) -> bool:
    """Whether the trainer that wrote `holder` has stopped refreshing it, or was on this host
    and has exited."""
    if time.time() - float(holder.get("heartbeat", 0)) >= STALE_S:
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", 0)), 0)  # signal 0: only asks whether it exists
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _parse(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
