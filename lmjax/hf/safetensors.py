"""safetensors files written one tensor at a time, and read one tensor at a time.

`safetensors.numpy.save_file` needs every tensor of a file in memory at once. The format is a
little-endian u64 header length, a JSON header (names, dtypes, shapes, byte offsets) padded with
spaces to 8 bytes, then the raw data: since every shape is known before any value is, `Writer`
writes the header first (laid out exactly as the safetensors library lays it out: by dtype
size, then name; the tests compare the bytes) and then each tensor into its place as it comes,
in any order. Reading uses the library itself (`safe_open`, numpy).

Above `shard_bytes` the tensors go into `model-0000k-of-0000n.safetensors` files with a
`model.safetensors.index.json`, filled in the order given, as `save_pretrained` shards them.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

from lmjax.config import UserError

DTYPES = {"float32": ("F32", np.dtype(np.float32)), "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16))}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Writer:
    """Writes the tensors `plan` lists (name, shape), all in `dtype`, into `folder`."""

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: str, shard_bytes: int):
        self.code, self.dtype = DTYPES[dtype]
        sizes = [int(np.prod(shape)) * self.dtype.itemsize for _, shape in plan]
        shards: list[list[int]] = [[]]
        for i, size in enumerate(sizes):
            if shards[-1] and sum(sizes[j] for j in shards[-1]) + size > shard_bytes:
                shards.append([])
            shards[-1].append(i)
        n = len(shards)
        names = [SINGLE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.where: dict[str, tuple[Path, int, tuple[int, ...]]] = {}  # name -> file, offset, shape
        self.files = [folder / name for name in names]
        for path, shard in zip(self.files, shards, strict=True):
            self._start_file(path, [(plan[i][0], plan[i][1], sizes[i]) for i in shard])
        if n > 1:
            index = {
                "metadata": {"total_size": sum(sizes)},
                "weight_map": {
                    plan[i][0]: path.name for path, s in zip(self.files, shards, strict=True) for i in s
                },
            }
            (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        self._open: dict[Path, io.BufferedRandom] = {path: path.open("r+b") for path in self.files}
        self.left = {name for name, _ in plan}

    def _start_file(self, path: Path, tensors: list[tuple[str, tuple[int, ...], int]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # transformers checks "format"
        offsets: dict[str, int] = {}  # where each tensor's data starts, after the header
        offset = 0
        for name, shape, size in sorted(tensors, key=lambda t: t[0]):  # one dtype: by name
            header[name] = {"dtype": self.code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offsets[name] = offset
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        start = 8 + len(text)
        with path.open("wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            f.truncate(start + offset)
        for name, shape, _ in tensors:
            self.where[name] = (path, start + offsets[name], shape)

    def write(self, name: str, x: np.ndarray) -> None:
        path, offset, shape = self.where[name]
        if x.shape != shape:
            raise ValueError(f"{name}: shape {x.shape}, planned {shape}")
        f = self._open[path]
        f.seek(offset)
        # One copy at most (none when x is already contiguous in the stored dtype), written
        # from its own memory: `.tobytes()` would make a second.
        data = np.ascontiguousarray(x, self.dtype.newbyteorder("<"))
        f.write(data.reshape(-1).view(np.uint8))
        self.left.discard(name)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        if self.left:
            raise ValueError(f"tensors never written: {sorted(self.left)[:3]}")


# Buffers some checkpoints carry that are not parameters (GPT-2's causal masks, old RoPE tables).
IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$")


class Reader:
    """The tensors of a Hugging Face checkpoint folder (one file, or shards with an index)."""

    def __init__(self, folder: Path):
        if (folder / INDEX).is_file():
            files = _shards(folder / INDEX)
        elif (folder / SINGLE).is_file():
            files = [SINGLE]
        else:
            found = "a .bin (pickle) checkpoint" if list(folder.glob("*.bin")) else "no weights"
            raise UserError(
                f"{folder} has no {SINGLE} or {INDEX} ({found}); lmjax reads safetensors only: "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )
        self._files = [_open(folder / name) for name in files]
        self.file_of: dict[str, safe_open] = {}
        for f in self._files:
            for key in f.keys():
                if not IGNORED.search(key):
                    self.file_of[key] = f

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.file_of[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it ("F32", "BF16", "I64", ...)."""
        return str(self.file_of[name].get_slice(name).get_dtype())

    def get(self, name: str) -> np.ndarray:
        return self.file_of[name].get_tensor(name)


def _shards(index: Path) -> list[str]:
    """The files a `model.safetensors.index.json` names, checked to be there."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        if not files or not all(isinstance(f, str) for f in files):
            raise ValueError("no files in weight_map")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise UserError(
            f"{index} is not a safetensors index ({type(e).__name__}: {e}); it should be JSON with a "
            '"weight_map" from tensor names to files: download it again, or remove it if '
            f"{SINGLE} holds every tensor"
        ) from None
    for name in files:
        if not (index.parent / name).is_file():
            raise UserError(f"{index} names {name}, which is not in {index.parent}; download that shard")
    return files


def _open(path: Path) -> safe_open:
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # noqa: BLE001 - SafetensorError (not exported as a class) or OSError
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {first}); "
            "it may be truncated or damaged: download it again"
        ) from None
