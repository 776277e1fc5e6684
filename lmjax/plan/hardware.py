"""The accelerators `python -m lmjax.plan --devices` knows: memory per device, the name JAX
reports for it (`device_kind`, which `lmjax.flops.PEAK_TFLOPS` maps to a bf16 peak), and what
the attention kernel choice depends on (backend, CUDA capability).

Spellings: `8xH100` (count x card; `H100` alone means one), and TPU slices as Cloud TPU names
them. TPU v4 and v5p slice names count TensorCores, two per chip, and JAX sees one device per
chip (megacore): `v5p-64` is 32 devices, `v4-8` is 4. v5e and v6e names count chips: `v5e-8`
(or Cloud's `v5litepod-8`) is 8 devices. `cpu` is this host's memory as one device; `Nxcpu`
splits it into N. JAX names v5p "TPU v5" and v5e "TPU v5 lite" (`canonical_kind`). Memory is
what the card exposes to JAX (an H200's 141 GB is 140 GiB, an L4's 24 GB about 22.5 GiB).
"""

from __future__ import annotations

import dataclasses
import os
import re

from lmjax import flops
from lmjax.config import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Card:
    kind: str  # as jax.devices()[0].device_kind reports it
    memory_bytes: int  # per device
    backend: str  # gpu | tpu | cpu
    capability: tuple[int, int] | None = None  # CUDA compute capability
    cores_per_device: int = 1  # TPU names count TensorCores: v4/v5p have two per device


CARDS = {
    "H100": Card("NVIDIA H100 80GB HBM3", 80 * GiB, "gpu", (9, 0)),
    "H200": Card("NVIDIA H200", 140 * GiB, "gpu", (9, 0)),  # what the card exposes
    "B200": Card("NVIDIA B200", 179 * GiB, "gpu", (10, 0)),  # of its 180 GB (nvidia-smi: 183359 MiB)
    "A100-80GB": Card("NVIDIA A100-SXM4-80GB", 80 * GiB, "gpu", (8, 0)),
    "A100-40GB": Card("NVIDIA A100-SXM4-40GB", 40 * GiB, "gpu", (8, 0)),
    "L4": Card("NVIDIA L4", int(22.5 * GiB), "gpu", (8, 9)),  # of its 24 GB
    "A10G": Card("NVIDIA A10G", int(22.5 * GiB), "gpu", (8, 6)),  # of its 24 GB (AWS G5)
    "T4": Card("Tesla T4", 15 * GiB, "gpu", (7, 5)),  # of its 16 GB (Colab's free GPU)
    "v4": Card("TPU v4", 32 * GiB, "tpu", cores_per_device=2),
    "v5p": Card("TPU v5", 95 * GiB, "tpu", cores_per_device=2),  # JAX calls v5p "TPU v5"
    "v5e": Card("TPU v5 lite", 16 * GiB, "tpu"),
    "v6e": Card("TPU v6 lite", 32 * GiB, "tpu"),  # Trillium
}


@dataclasses.dataclass(frozen=True)
class Devices:
    spec: str  # what the user wrote
    card: str  # a CARDS key, or "cpu"
    kind: str
    count: int
    memory_bytes: int  # per device
    backend: str
    capability: tuple[int, int] | None
    peak_tflops: float | None  # bf16 datasheet peak per device; None on CPU


def parse(spec: str) -> Devices:
    """`8xH100`, `H200`, `1xA100-80GB`, `v5p-64`, `v5e-8`, `cpu`, `4xcpu` -> Devices."""
    text = spec.strip()
    tpu = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text, re.IGNORECASE)
    if tpu:
        name, cores = tpu.group(1).lower().replace("v5litepod", "v5e"), int(tpu.group(2))
        card = CARDS[name]
        if cores % card.cores_per_device or cores == 0:
            raise UserError(
                f"--devices {spec}: {name} slices count TensorCores, {card.cores_per_device} per "
                f"chip; give a multiple of {card.cores_per_device}, e.g. {name}-8"
            )
        return _devices(spec, name, card, cores // card.cores_per_device)
    counted = re.fullmatch(r"(?:(\d+)\s*x\s*)?([A-Za-z0-9-]+)", text)
    if counted:
        count, name = int(counted.group(1) or 1), counted.group(2)
        if name.lower() == "cpu" and count > 0:
            return _cpu(spec, count)
        known = {k.lower(): k for k in CARDS if CARDS[k].backend == "gpu"}
        if name.lower() in known and count > 0:
            return _devices(spec, known[name.lower()], CARDS[known[name.lower()]], count)
    raise UserError(
        f"--devices {spec!r} is not a device spec; write e.g. 8xH100, H200, 1xA100-80GB, v5p-64, "
        f"v5e-8, v6e-8, v4-8 or cpu (cards: {', '.join(CARDS)})"
    )


def canonical_kind(kind: str) -> str:
    """A device kind as JAX reports it: other spellings of the TPUs mapped to JAX's (v5p is
    "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite"), anything else unchanged."""
    aliases = {"tpu v5p": "TPU v5", "tpu v5e": "TPU v5 lite", "tpu v6e": "TPU v6 lite"}
    return aliases.get(kind.strip().lower(), kind)


def _devices(spec: str, name: str, card: Card, count: int) -> Devices:
    peak = flops.peak_tflops(card.kind)
    return Devices(spec, name, card.kind, count, card.memory_bytes, card.backend, card.capability, peak)


def _cpu(spec: str, count: int) -> Devices:
    """This host's memory, shared by `count` emulated devices."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Devices(spec, "cpu", "cpu", count, host // count, "cpu", None, None)
