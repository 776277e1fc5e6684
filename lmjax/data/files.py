"""Which files a corpus is, and which split a document falls in: the helpers every source shares.

A document goes to validation when the hash of its key (a file's relative path, or
"path:line" / "path:row") falls below `validation_percent`, so the split is the same on every
machine with the same files.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import sysconfig
from pathlib import Path

_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _STDLIB_SKIP]  # prune: test/ is 60%
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return root, sorted(files)


def user_files(pattern: str, suffixes: tuple[str, ...] = ()) -> tuple[Path, list[Path]]:
    """(root, files) for a file, a folder or a glob. In a folder, names starting with "." or
    "_" (.git, _SUCCESS) are skipped, and only `suffixes` are taken when given. The root is the
    folder or the glob's fixed prefix: document keys are relative to it."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file()
            and not any(part[0] in "._" for part in p.relative_to(path).parts)
            and (not suffixes or p.name.endswith(suffixes))
        ]
        return path, sorted(files)
    files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    fixed = [part for part in itertools.takewhile(lambda part: not glob.has_magic(part), path.parts)]
    return Path(*fixed) if fixed else Path("."), files


def is_validation(key: str, percent: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 10_000
    return bucket < percent * 100


def split_of(key: str, percent: float) -> str:
    return "validation" if is_validation(key, percent) else "train"
