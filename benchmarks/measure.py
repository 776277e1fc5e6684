"""What a benchmark record says about the machine and the compiled step: package, cuDNN and
backend versions, the persistent compilation cache and its hits, a measured matmul ceiling, the
devices' peak memory, and XLA's memory and cost analyses."""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from versions import package_versions

from lmjax import config

VERSIONED = (
    *("jax", "jaxlib", "flax", "optax", "numpy"),
    *("jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin", "jax-cuda12-pjrt", "libtpu"),
)
ENV_VARS = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def matmul_ceiling(size: int, dtype: str, windows: int = 5, window_s: float = 0.1) -> float:
    """Best TFLOP/s of a `size`³ matmul on the first device over a few timed windows (each at
    most 50 matmuls in flight, so outputs waiting to be freed stay bounded)."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), jnp.dtype(dtype))
    b = jax.random.normal(key_b, (size, size), jnp.dtype(dtype))
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    reps = max(1, min(50, int(window_s / (time.perf_counter() - start))))
    best = float("inf")
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(reps):
            out = matmul(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * size**3 / best / 1e12


def peak_memory_bytes() -> int | None:
    """The largest `peak_bytes_in_use` over this process's devices; None where not reported."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) if peaks else None


def memory_analysis(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """Every integer field of XLA's per-device memory analysis (argument, output, alias, temp,
    generated code, ...; the fields differ between jaxlib versions and backends)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not implemented on some backends
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if analysis is None:
        return None
    names = [n for n in dir(analysis) if not n.startswith("_")]
    values = {n: getattr(analysis, n, None) for n in names}
    return {n: v for n, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}


def xla_flops(compiled: jax.stages.Compiled) -> float | None:
    """XLA's own count of the step's FLOPs (per device), for comparison with the model count."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if isinstance(cost, dict) and "flops" in cost else None


def record_header(
    benchmark: str, exp: config.Experiment, mesh: jax.sharding.Mesh, packages: Iterable[str]
) -> dict[str, Any]:
    """What every benchmark record starts with: when, which experiment, on what devices and
    mesh, with which package versions, and the whole config."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "experiment": exp.name,
        "platform": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "mesh": dict(zip(mesh.axis_names, mesh.devices.shape, strict=True)),
        "versions": package_versions(packages),
        "config": config.to_dict(exp),
    }


def versions() -> dict[str, str | int | None]:
    """Package versions (jax, jaxlib, flax, optax, numpy always; plugins where installed), the
    cuDNN version where a CUDA plugin reports one, and Python's."""
    found = package_versions(VERSIONED)
    kept: dict[str, str | int | None] = {p: v for p, v in found.items() if v or p in VERSIONED[:5]}
    cudnn = _cudnn_version()
    return kept | ({"cudnn": cudnn} if cudnn else {}) | {"python": platform.python_version()}


def _cudnn_version() -> int | None:
    """cuDNN's runtime version as an int (e.g. 91000 for 9.10.0), None off CUDA. Read through
    `jax._src.lib.cuda_versions`, the module JAX's own cuDNN attention checks the version with
    (private, hence guarded)."""
    try:  # a private module that may move: imported here, where a failure is caught
        from jax._src.lib import cuda_versions

        return int(cuda_versions.cudnn_get_version()) if cuda_versions is not None else None
    except Exception:
        return None


def platform_version() -> str | None:
    """The backend's own description, e.g. the CUDA and driver versions on a GPU."""
    try:
        return str(jax.devices()[0].client.platform_version)
    except Exception:
        return None


def cache_dir() -> str | None:
    """The persistent compilation cache's folder, None when there is none."""
    try:
        return jax.config.jax_compilation_cache_dir or None
    except AttributeError:
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None


class cache_hits:
    """Counts persistent-cache hits (jax.monitoring events) while entered: `as` gives a list
    that gains an entry per hit, or None where jax.monitoring cannot be listened to."""

    def __enter__(self) -> list[str] | None:
        self.hits: list[str] = []
        try:
            jax.monitoring.register_event_listener(self._listen)
        except AttributeError:
            self.hits = None
        return self.hits

    def __exit__(self, *exc: object) -> None:
        if self.hits is not None:
            jax.monitoring.unregister_event_listener(self._listen)

    def _listen(self, event: str, **_: object) -> None:
        if event == CACHE_HIT_EVENT:
            self.hits.append(event)
