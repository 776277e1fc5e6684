"""TFDS datasets as documents, read through array_record data sources: TensorFlow not needed.

`path` is either a prepared dataset folder (the version folder holding `dataset_info.json`) or
the data dir in which `name` is looked up ("" for TFDS's default). `lmjax_stdlib` is prepared on
the spot (no download); any other dataset that is not prepared yet needs a download, so the
network and the libraries its builder needs are checked first and fail in seconds, not after
TFDS's minutes of retries.

Splits: the dataset's "train", and its "validation" (else "test"); a dataset with only "train"
sends the examples whose key `f"{builder name}:{index}"` hashes below `validation_percent` to
validation. tensorflow_datasets is imported only when these functions run.

A prepared dataset on a bucket (`gs://...`) is refused before any work: array_record's reader
opens local files only (given a bucket URL it hangs), so the folder must be copied to
local disk first.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import socket
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

from lmjax import storage
from lmjax.config import UserError
from lmjax.data.files import is_validation

if TYPE_CHECKING:  # annotations only: tensorflow_datasets is optional (lmjax[tfds])
    from tensorflow_datasets.core import DatasetBuilder

NETWORK_PROBE = ("storage.googleapis.com", 443)
NETWORK_TIMEOUT_S = 3.0
STDLIB_NAME = "lmjax_stdlib"
_FIX = "prepare it elsewhere with file_format='array_record' and point data.path at it"
_READ_CHUNK = 1024
# tfds imports these dataset packages in one loop that stops at the first failure (without
# TensorFlow or h5py, before `text`), so c4 and wikipedia would look unknown.
_TFDS_PACKAGES = (
    "audio graphs image image_classification object_detection nearest_neighbors question_answering d4rl "
    "ranking recommendation rl_unplugged rlds.datasets robotics robomimic structured summarization text "
    "text_simplification time_series translate video vision_language"
).split()


def documents(name: str, path: str, field: str, validation_percent: float) -> Iterator[tuple[str, str]]:
    """(split, text) pairs, split in {"train", "validation"}, in a stable, deterministic order."""
    builder = _prepared_builder(name, path)
    label = name or str(path)
    splits = builder.info.splits
    if "train" not in splits:
        raise UserError(
            f"tfds dataset {label!r} has no 'train' split (it has {sorted(splits)}); choose another"
        )
    if field not in builder.info.features:
        raise UserError(
            f"tfds dataset {label!r} has no feature {field!r}; set data.field to one of "
            f"{sorted(builder.info.features.keys())}"
        )
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    for split in ["train"] + ([held_out] if held_out else []):
        for index, value in enumerate(_read(builder, split, field)):
            text = _text(value, label, field)
            if not text:
                continue
            if held_out is None and is_validation(f"{builder.name}:{index}", validation_percent):
                yield "validation", text
            else:
                yield ("train" if split == "train" else "validation"), text


def fingerprint(name: str, path: str, field: str) -> str:
    """Short hex string that changes when the prepared dataset changes (name, version, data dir,
    file names and sizes). Prepares lmjax_stdlib if needed, like `documents`."""
    builder = _prepared_builder(name, path)
    h = hashlib.sha256(f"{builder.info.full_name}|{builder.data_dir}|{field}".encode())
    for p in sorted(builder.data_path.iterdir()):
        h.update(f"|{p.name}:{p.stat().length}".encode())
    return h.hexdigest()[:16]


def _import_tfds() -> ModuleType:
    try:  # optional: lmjax[tfds]
        # tfds 4.9.10 imports importlib_resources lazily (registry builders need it) without
        # declaring it; array_record is what as_data_source reads with. Fail here, not midway.
        import array_record.python.array_record_data_source  # noqa: F401
        import importlib_resources  # noqa: F401
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise UserError(
            f"the tfds source needs tensorflow_datasets, array_record and importlib_resources ({e}): "
            "pip install 'lmjax[tfds]'"
        ) from None
    return tfds


def _prepared_builder(name: str, path: str) -> DatasetBuilder:
    if storage.is_bucket(path):
        raise UserError(
            f"data.path={path}: the tfds source reads prepared datasets from local disk only "
            f"(array_record cannot read a bucket); copy the folder to local disk "
            f"(gcloud storage cp -r {path} DIR) and set data.path=DIR"
        )
    tfds = _import_tfds()
    from etils import epath  # a dependency of tensorflow_datasets

    if path and (epath.Path(path).expanduser() / "dataset_info.json").exists():
        return tfds.builder_from_directory(str(epath.Path(path).expanduser()))
    if not name:
        raise UserError(
            "the tfds source needs data.name (a TFDS dataset name) or data.path pointing at a prepared "
            "dataset folder (one holding dataset_info.json)"
        )
    if re.split(r"[/:]", name)[0] == STDLIB_NAME:
        import lmjax.data.stdlib_tfds  # noqa: F401 -- imports tfds and registers the builder with it

    data_dir = str(epath.Path(path).expanduser()) if path else None
    builder = _builder(tfds, name, data_dir)
    if not builder.is_prepared():
        _prepare(builder, name, data_dir)
    return builder


def _builder(tfds: ModuleType, name: str, data_dir: str | None) -> DatasetBuilder:
    from tensorflow_datasets.core.registered import DatasetNotFoundError  # optional, as tfds is

    for attempt in range(2):
        try:
            return tfds.builder(name, data_dir=data_dir)
        except DatasetNotFoundError:
            if attempt:
                where = f" and not prepared in {data_dir}" if data_dir else ""
                raise UserError(
                    f"unknown TFDS dataset {name!r}{where}; check the name in the TFDS catalog, or point "
                    "data.path at a prepared dataset folder (one holding dataset_info.json)"
                ) from None
            _import_all_tfds_packages()
        except (ValueError, AssertionError, TypeError) as e:
            # A bad config, version or builder argument in the name: tfds says which, at length.
            if not str(e).startswith("Failed to construct"):
                raise
            raise UserError(
                f"tfds dataset {name!r}: {_construct_error(tfds, name, e)}; fix data.name"
            ) from None


def _import_all_tfds_packages() -> None:
    for package in _TFDS_PACKAGES:
        try:
            importlib.import_module(f"tensorflow_datasets.{package}")
        except Exception:  # noqa: BLE001 -- a package whose own imports fail just stays unregistered
            pass


def _prepare(builder: DatasetBuilder, name: str, data_dir: str | None) -> None:
    if builder.name != STDLIB_NAME:
        where = data_dir or "the default TFDS data dir"
        needs = [] if _online() else [f"the network ({NETWORK_PROBE[0]}:{NETWORK_PROBE[1]} unreachable)"]
        needs += _missing_libraries(builder)
        if needs:
            raise UserError(
                f"tfds dataset {name!r} is not prepared in {where}, and downloading and preparing it needs "
                f"{' and '.join(needs)}; fix that, or {_FIX}"
            )
    try:
        builder.download_and_prepare(file_format="array_record")
    except ImportError as e:  # a library the source scan above did not see
        raise UserError(
            f"tfds dataset {name!r} needs {e.name or e} to download and prepare; {_FIX}"
        ) from None


def _online() -> bool:
    """A TCP connect with a hard deadline (a thread, so a slow DNS lookup cannot outlast it)."""
    proxy = urllib.request.getproxies().get("https")
    target = NETWORK_PROBE
    if proxy:
        parts = urllib.parse.urlsplit(proxy if "//" in proxy else f"//{proxy}")
        target = (parts.hostname or "", parts.port or 443)
    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(target, timeout=NETWORK_TIMEOUT_S).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(NETWORK_TIMEOUT_S)
    return bool(reached)


def _missing_libraries(builder: DatasetBuilder) -> list[str]:
    """Libraries the builder's module uses that are not installed (tiny_shakespeare and lm1b use
    tf.io.gfile, c4 and wikipedia Apache Beam): found by reading its source, before downloading."""
    try:
        source = inspect.getsource(sys.modules[type(builder).__module__])
    except (OSError, TypeError, KeyError):
        return []
    missing = []
    if re.search(r"\btf\.", source) and not _installed("tensorflow"):
        missing.append("TensorFlow (pip install tensorflow)")
    if "apache_beam" in source and not _installed("apache_beam"):
        missing.append("Apache Beam (pip install apache-beam)")
    return missing


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _read(builder: DatasetBuilder, split: str, field: str) -> Iterator[object]:
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:
        raise UserError(
            f"tfds dataset {builder.name!r} in {builder.data_dir} is prepared as {builder.info.file_format}, "
            "which has no random access; prepare it with file_format='array_record'"
        ) from None
    # Batched reads: one array_record lookup per chunk instead of per example.
    for start in range(0, len(source), _READ_CHUNK):
        for example in source.__getitems__(list(range(start, min(start + _READ_CHUNK, len(source))))):
            yield example[field]


def _text(value: object, label: str, field: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise UserError(
        f"feature {field!r} of tfds dataset {label!r} is not text (got {type(value).__name__}); "
        "set data.field to a text feature"
    )


def _construct_error(tfds: ModuleType, name: str, e: BaseException) -> str:
    """tfds's first line without its builder_kwargs prefix or a dangling "closely match:", plus the
    builder's configs when there are few enough to list."""
    line = str(e).strip().splitlines()[0]
    line = re.sub(r'^Failed to construct dataset "[^"]*", builder_kwargs "[^"]*": ', "", line)
    line = re.sub(r"\s*Here are .*:\s*$", "", line).rstrip(". ")
    configs = list(getattr(tfds.builder_cls(re.split(r"[/:]", name)[0]), "builder_configs", {}))
    if configs:
        line += f"; configs: {configs[:10]}" + (f" and {len(configs) - 10} more" if len(configs) > 10 else "")
    return line if len(line) <= 400 else line[:397] + "..."
