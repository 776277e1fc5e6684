"""`python -m lmjax.attention_check [--out FILE.json]`: every attention kernel this machine can
run, against the fp32 reference, forward and gradient, on packed and plain rows.

Needs nothing but jax (no pytest), so it runs on bare accelerator images: on a GPU it checks
cudnn, cudnn_packed (Hopper and newer) and pallas in bf16; on a TPU splash; on CPU xla, pallas
and splash (Pallas interpret mode) in fp32. Also what `auto` picks, which must not be xla on an
accelerator that has a fused kernel, and on an accelerator `auto` at llama_1b's attention shape
(grouped kv heads, 2048 positions). Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.attention import dispatch as attention

# Packed rows of T=256: a 1-token tail, a 3-token document (the packer's shortest), long ones.
ROWS = np.array([[1] * 1 + [2] * 100 + [3] * 3 + [4] * 152, [4] * 200 + [5] * 56], np.int32)
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}  # max error relative to the largest reference value
SHAPE = (2, 256, 4, 2, 64)  # B, T, H, K (kv heads: grouped), E
# llama_1b's own attention, plain causal at full length: grouped k/v heads at 2048 positions, a
# shape the small one does not reach. A kernel there that let a position see later tokens would
# let training fit even random tokens.
LONG_GROUPED = (1, 2048, 32, 8, 64)


def kernels_here() -> list[tuple[str, bool]]:
    """(implementation, packed rows?) pairs this backend runs natively (or, on CPU, interpreted)."""
    backend = jax.default_backend()
    if backend == "gpu":
        pairs = [("cudnn", False), ("pallas", False), ("pallas", True), ("auto", True), ("auto", False)]
        capability = attention.cuda_capability()
        return pairs + ([("cudnn_packed", True)] if capability and capability >= (9, 0) else [])
    if backend == "tpu":
        return [("splash", True), ("splash", False), ("auto", True)]
    return [("xla", True), ("pallas", True), ("splash", True), ("xla", False)]


def check(implementation: str, packed: bool, dtype: str, shape: tuple[int, ...] = SHAPE) -> dict:
    """Max error of the kernel's output and d/dq, d/dk, d/dv, relative to the reference's largest."""
    B, T, H, K, E = shape
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, H, E), dtype)
    k = jax.random.normal(kk, (B, T, K, E), dtype)
    v = jax.random.normal(kv, (B, T, K, E), dtype)
    segments = jnp.asarray(ROWS) if packed else None
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

    def fwd_and_grad(impl: str, *qkv: jax.Array):
        def loss(q, k, v):
            o = attention.attention(q, k, v, segments, implementation=impl)
            return (o.astype(jnp.float32) * weights).sum(), o

        (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv)
        return [o, *grads]

    got = fwd_and_grad(implementation, q, k, v)
    want = fwd_and_grad("reference", *(x.astype(jnp.float32) for x in (q, k, v)))  # same rounded inputs
    errors = {}
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        errors[name] = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-6))
    chosen = attention.resolve(implementation, q.shape, q.dtype, packed, kv_heads=K)
    return {
        "implementation": implementation,
        "ran": chosen,
        "packed": packed,
        "shape": list(shape),
        "dtype": dtype,
        "errors": errors,
        "ok": max(errors.values()) < TOLERANCE[dtype] and (jax.default_backend() == "cpu" or chosen != "xla"),
    }


def run_all() -> dict:
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    results = []
    runs = [(impl, packed, SHAPE) for impl, packed in kernels_here()]
    if jax.default_backend() != "cpu":  # on CPU auto is xla, the reference's own arithmetic
        runs.append(("auto", False, LONG_GROUPED))
    for impl, packed, shape in runs:
        try:
            results.append(check(impl, packed, dtype, shape))
        except Exception as e:  # a kernel that fails to compile or run here is a result, not a crash
            results.append(
                {
                    "implementation": impl,
                    "packed": packed,
                    "shape": list(shape),
                    "ok": False,
                    "error": repr(e)[:500],
                }
            )
    device = jax.devices()[0]
    return {
        "device": {"kind": device.device_kind, "platform": device.platform},
        "jax": jax.__version__,
        "results": results,
        "ok": all(r["ok"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmjax.attention_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", default="", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    report = run_all()
    for r in report["results"]:
        detail = r.get("error") or " ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        what = f"{r['implementation']:<13} packed={r['packed']!s:<5} {'x'.join(map(str, r['shape'])):<16}"
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {what} {detail}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
