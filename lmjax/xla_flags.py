"""XLA flags lmjax sets for a backend, only when the user set none and only ones this jaxlib has.

An unknown flag in `XLA_FLAGS` aborts the process when the backend starts, and flags come and
go between jaxlib releases, so each flag is checked against the installed jaxlib's own binary
(flag names are strings in it) before it is set. Nothing here imports jax: XLA reads
`XLA_FLAGS` once, when the backend initialises, so this must run before that.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import mmap
import os
from collections.abc import Callable
from pathlib import Path

# Per backend: flags worth having for training. GPU: overlap collectives with compute (the
# latency-hiding scheduler), which multi-GPU data/fsdp parallelism needs to scale.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "gpu": (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_enable_highest_priority_async_stream=true",
    ),
}


def apply(log: Callable[[str], None] = print) -> list[str]:
    """Set the verified flags for the backend jax will start; returns them ([] when none)."""
    if "XLA_FLAGS" in os.environ:
        return []
    flags = [f for f in CANDIDATES.get(expected_backend(), ()) if jaxlib_knows(f)]
    if flags:
        os.environ["XLA_FLAGS"] = " ".join(flags)
        log(f"XLA_FLAGS={os.environ['XLA_FLAGS']} (set by lmjax; set XLA_FLAGS yourself to replace)")
    return flags


def expected_backend() -> str:
    """The backend jax will pick, judged without starting it: JAX_PLATFORMS, else the
    installed plugins (a CUDA plugin means gpu, libtpu means tpu)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if platforms:
        return {"cuda": "gpu", "rocm": "gpu"}.get(platforms, platforms)
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in importlib.metadata.distributions()}
    if any(n.startswith(("jax-cuda", "jax-rocm")) for n in names):
        return "gpu"
    if "libtpu" in names or any(n.startswith("libtpu") for n in names):
        return "tpu"
    return "cpu"


def jaxlib_knows(flag: str) -> bool:
    """True when jaxlib's binaries, and a GPU plugin's where one is installed, name the flag:
    both parse XLA_FLAGS (jax starts the CPU backend beside the GPU one)."""
    name = flag.lstrip("-").split("=")[0].encode()
    packages = ["jaxlib"] + [p for p in _GPU_PLUGINS if importlib.util.find_spec(p)]
    return all(_package_names(package, name) for package in packages)


_GPU_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin")


def _package_names(package: str, name: bytes) -> bool:
    spec = importlib.util.find_spec(package)
    folders = spec.submodule_search_locations if spec else None
    return any(_contains(lib, name) for folder in folders or () for lib in Path(folder).rglob("*.so*"))


def _contains(path: Path, needle: bytes) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(needle) != -1
