"""Where a compiled step's device time goes: a `jax.profiler` trace of a few steps, summed per
kernel and per kind of kernel (matmul, attention, fusions, reductions, copies).

    record["profile"] = capture(run_steps, steps, log_dir, step_ms)

The trace is the Perfetto JSON that `jax.profiler.trace(create_perfetto_trace=True)` writes (no
TensorBoard plugin is needed to read it). On a GPU the kernels are the events on the device's
stream lines ("Stream #N..."); on a CPU, XLA's own thunks on its client threads (a rehearsal of
the code path: CPU numbers say little). Time is summed per kernel name; kernels that overlap on
several streams are counted once each, so `busy_ms_per_step` can exceed the step.
"""

from __future__ import annotations

import collections
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

# The first pattern a lower-cased kernel name contains decides its kind. cuBLAS on Hopper names
# its kernels nvjet_*/sm90_xmma_*; XLA's Triton matmuls are *gemm*; cuDNN's flash attention
# kernels carry sdpa or fmha.
KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "cudnn", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "matmul", "dot")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
    ("scatter/gather", ("scatter", "gather", "dynamic")),
    ("reduction", ("reduce", "reduction")),
    ("elementwise fusion", ("fusion", "loop", "elementwise")),
)
TOP = 25  # kernels listed by name


def capture(run_steps: Callable[[], None], steps: int, log_dir: str | Path, step_ms: float) -> dict[str, Any]:
    """Trace `run_steps()` (which runs `steps` steps and waits for them) into `log_dir`, then
    summarise the trace; `step_ms` is the step time measured without the profiler."""
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        run_steps()
    traces = sorted(Path(log_dir).rglob("perfetto_trace.json.gz"))
    if not traces:
        return {"error": f"no perfetto_trace.json.gz under {log_dir}"}
    return summarize(traces[-1], steps, step_ms)


def summarize(trace: Path, steps: int, step_ms: float) -> dict[str, Any]:
    """Per step: device busy time, time per kind of kernel and the `TOP` kernels by time."""
    with gzip.open(trace, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    kernels, lines = _kernel_events(events)
    total_us: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for e in kernels:
        total_us[e["name"]] += float(e.get("dur", 0.0))
        calls[e["name"]] += 1
    per_step_ms = {name: us / 1000 / steps for name, us in total_us.items()}
    busy_ms = sum(per_step_ms.values())
    by_kind: collections.Counter[str] = collections.Counter()
    for name, ms in per_step_ms.items():
        by_kind[kind_of(name)] += ms
    return {
        "trace": str(trace),
        "lines": lines,
        "steps": steps,
        "step_ms": step_ms,
        "busy_ms_per_step": busy_ms,
        "kernels_per_step": len(kernels) / steps,
        "idle_fraction": max(0.0, 1 - busy_ms / step_ms) if step_ms else None,
        "by_kind_ms": {k: round(v, 4) for k, v in by_kind.most_common()},
        "by_kind_share": {k: round(v / busy_ms, 4) for k, v in by_kind.most_common()} if busy_ms else {},
        "top_kernels": [
            {
                "name": name[:200],
                "kind": kind_of(name),
                "ms_per_step": round(per_step_ms[name], 4),
                "calls_per_step": calls[name] / steps,
            }
            for name, _ in total_us.most_common(TOP)
        ],
    }


def kind_of(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next((kind for kind, marks in KINDS if any(m in name for m in marks)), "other")


def _kernel_events(events: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Complete events on the GPU's stream lines; without a GPU, XLA's thunks on its CPU client
    threads (runtime bookkeeping, named with '::', left out). With the names of the lines used."""
    process = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    thread = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    complete = [e for e in events if e.get("ph") == "X"]
    gpus = {pid for pid, name in process.items() if "GPU" in name}
    if gpus:
        on_gpu = [e for e in complete if e["pid"] in gpus]
        line = {id(e): thread.get((e["pid"], e["tid"]), "") for e in on_gpu}
        streams = [e for e in on_gpu if line[id(e)].startswith("Stream")]
        # Without stream lines, XLA's per-op line (the others nest modules and steps over it).
        chosen = streams or [e for e in on_gpu if line[id(e)] == "XLA Ops"] or on_gpu
    else:
        chosen = [
            e
            for e in complete
            if thread.get((e["pid"], e["tid"]), "").startswith("tf_XLA")
            and "::" not in e["name"]
            and " " not in e["name"]
        ]
    return chosen, sorted({thread.get((e["pid"], e["tid"]), "") for e in chosen})
