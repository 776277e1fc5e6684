"""XLA flags lmjax sets for a backend, only when the user set none and only ones this jaxlib has.

An unknown flag in `XLA_FLAGS` aborts the process when the backend starts, and flags come and
go between jaxlib releases, so the flags are first tried in a short-lived process that starts
jax's CPU backend with them (it parses every XLA flag, GPU ones included). XLA reads `XLA_FLAGS`
once, when the backend initialises (not when jax is imported), so `apply` runs before anything
touches a device.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

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
    flags = accepted(CANDIDATES.get(expected_backend(), ()))
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
    if any(n.startswith("libtpu") for n in names):
        return "tpu"
    return "cpu"


def accepted(flags: Sequence[str]) -> list[str]:
    """The flags a fresh process with the installed jaxlib accepts in XLA_FLAGS."""
    if not flags or _starts_with(flags):
        return list(flags)
    return [flag for flag in flags if len(flags) > 1 and _starts_with([flag])]


def _starts_with(flags: Sequence[str]) -> bool:
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    probe = "import jax; jax.devices('cpu')"
    try:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0
