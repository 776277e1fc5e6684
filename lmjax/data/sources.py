"""Corpora as lists of documents, split into train and validation by a hash of each path.

`stdlib`: the running Python's standard library `.py` files (tests and idlelib left out), the
embedded default corpus every machine has. `files`: a text file, a folder (every file under
it) or a glob. A file goes to validation when the hash of its relative path falls below
`data.validation_percent`, so the split is the same on every machine with the same files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from lmjax import config
from lmjax.config import UserError

_STDLIB_SKIP = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _STDLIB_SKIP & set(p.relative_to(root).parts)]
    return root, sorted(files)


def user_files(pattern: str) -> tuple[Path, list[Path]]:
    path = Path(pattern).expanduser()
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        return path, sorted(files)
    files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    root = Path(os.path.commonpath([p.parent for p in files])) if files else Path(".")
    return root, files


def corpus_files(cfg: config.Data) -> tuple[Path, list[Path]]:
    root, files = stdlib_files() if cfg.source == "stdlib" else user_files(cfg.path)
    if not files:
        where = "the standard library" if cfg.source == "stdlib" else f"data.path={cfg.path!r}"
        raise UserError(f"{where} matches no files; point data.path at text files")
    return root, files


def is_validation(relative_path: str, percent: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:4], "big") % 10_000
    return bucket < percent * 100


def documents(cfg: config.Data) -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...]} document texts, in a stable order.

    Bytes that are not UTF-8 become U+FFFD. A corpus whose files all hash to one split (a single
    file, say) gives each file's last `validation_percent` of lines to validation instead.
    """
    root, files = corpus_files(cfg)
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for path in files:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text:
            splits["validation" if is_validation(rel, cfg.validation_percent) else "train"].append(text)
    if not splits["train"] or not splits["validation"]:
        splits = _split_by_lines(splits["train"] + splits["validation"], cfg.validation_percent)
    if sum(map(len, splits["train"])) == 0:
        raise UserError(f"the corpus ({cfg.source} {cfg.path}) is empty; give files with text")
    return splits


def _split_by_lines(texts: list[str], percent: float) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for text in texts:
        lines = text.splitlines(keepends=True)
        cut = len(lines) - max(1, round(len(lines) * percent / 100)) if len(lines) > 1 else len(lines)
        for split, part in (("train", lines[:cut]), ("validation", lines[cut:])):
            if part:
                splits[split].append("".join(part))
    return splits


def fingerprint(cfg: config.Data) -> str:
    """Identifies the corpus content cheaply: file names, sizes and mtimes, and the split."""
    root, files = corpus_files(cfg)
    h = hashlib.sha256(f"{cfg.source}|{cfg.validation_percent}|{sys.version_info[:2]}".encode())
    for p in files:
        st = p.stat()
        h.update(
            f"{p.relative_to(root) if p.is_relative_to(root) else p}|{st.st_size}|{st.st_mtime_ns}".encode()
        )
    return h.hexdigest()[:16]
