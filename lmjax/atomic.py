"""Files replaced whole: a reader (or a run resumed after a kill) never sees one half-written."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique across hosts too: processes on several hosts may write the same file (the same
    # bytes) on a shared file system, and containers often share process ids.
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
