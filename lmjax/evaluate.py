"""Held-out loss and bits per byte on a fixed set of validation batches."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from lmjax import step


class HeldOut:
    """The validation batches, placed on the devices once, and the bytes behind their targets.

    Bits per byte = summed loss in nats / ln 2 / UTF-8 bytes of the predicted tokens, which
    compares across tokenizers.
    """

    def __init__(
        self,
        batches: list[dict[str, np.ndarray]],
        token_bytes: np.ndarray,
        eval_step: Callable[[nnx.State, step.Batch], tuple[jax.Array, jax.Array]],
        batch_sharding: jax.sharding.NamedSharding,
    ):
        self.bytes = sum(float((token_bytes[b["targets"]] * b["loss_mask"]).sum()) for b in batches)
        self._batches = [step.put_batch(b, batch_sharding) for b in batches]
        self._eval_step = eval_step

    def __call__(self, params: nnx.State) -> dict[str, float]:
        sums = jax.device_get([self._eval_step(params, b) for b in self._batches])
        loss_sum = sum(float(s) for s, _ in sums)
        count = sum(float(c) for _, c in sums)
        return {"eval_loss": loss_sum / count, "eval_bpb": loss_sum / math.log(2) / self.bytes}
