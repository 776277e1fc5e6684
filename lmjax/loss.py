"""The training objective and the evaluation loss: next-token cross-entropy over the model's
logits, with `model.z_loss`'s logsumexp(logits)^2 term (PaLM) beside it.

Sums rather than means, so micro-batches and eval batches add up exactly. With
`model.loss_chunk`, logits exist for that many positions at a time, forward and backward (each
chunk is rematerialised), never as fp32 `[B, T, V]` for the whole batch. Shape letters: the
package docstring (`lmjax`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lmjax import config
from lmjax.model import Transformer, logits


def loss_sums(model: Transformer, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy (fp32) over unmasked targets, and their count: the
    evaluation loss, which no `z_loss` setting changes."""
    ce_sum, _, count = loss_terms(model, batch)
    return ce_sum, count


def loss_terms(model: Transformer, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed cross-entropy, summed logsumexp(logits)^2, count) over unmasked targets, in fp32.
    The training objective is `ce + model.z_loss * z` (step.py); the z sum costs nothing when
    unused (XLA drops it)."""
    cfg = model.cfg
    # A batch without segment ids is plain causal (one document per row): the fast kernels differ.
    h_BTD = model.hidden(batch["inputs"], batch.get("segment_ids"), batch.get("positions"))
    # The head in its stored precision, cast per use: chunks then add their gradients in fp32.
    head_DV, targets_BT, mask_BT = model.head_DV(cfg.param_dtype), batch["targets"], batch["loss_mask"]
    if not cfg.loss_chunk:
        return (*_loss_sum(cfg, head_DV, h_BTD, targets_BT, mask_BT), mask_BT.sum())
    B, T, D = h_BTD.shape
    C = T // cfg.loss_chunk

    def chunks(x):  # [B, T, ...] -> [C, B, t, ...]: the batch axis keeps its sharding
        return jnp.moveaxis(x.reshape(B, C, cfg.loss_chunk, *x.shape[2:]), 1, 0)

    chunk_loss = jax.checkpoint(functools.partial(_loss_sum, cfg, head_DV))

    def add_chunk(totals: tuple[jax.Array, jax.Array], chunk: tuple[jax.Array, ...]):
        ce_sum, z_sum = chunk_loss(*chunk)
        return (totals[0] + ce_sum, totals[1] + z_sum), None

    zero = jnp.zeros((), jnp.float32)
    (ce_sum, z_sum), _ = jax.lax.scan(
        add_chunk, (zero, zero), (chunks(h_BTD), chunks(targets_BT), chunks(mask_BT))
    )
    return ce_sum, z_sum, mask_BT.sum()


def _loss_sum(
    cfg: config.Model, head_DV: jax.Array, h_BtD: jax.Array, targets_Bt: jax.Array, mask_Bt: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and summed logsumexp^2 of the positions given (all of them, or one
    chunk), from the one logsumexp."""
    return cross_entropy_sums(logits(cfg, h_BtD, head_DV.astype(h_BtD.dtype)), targets_Bt, mask_Bt)


@jax.custom_vjp
def cross_entropy_sums(
    logits_BtV: jax.Array, targets_Bt: jax.Array, mask_Bt: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of mask * (logsumexp - target logit), sum of mask * logsumexp^2), in fp32 from logits
    in any dtype. Its own gradient: one pass over the logits, `(softmax - onehot) * weight` in
    the logits' dtype, where autodiff of the same expression makes XLA pass over [B, t, V]
    several times in fp32. The mask and the targets get no gradient; reverse mode only (no
    `jax.jvp` through it)."""
    return _cross_entropy_fwd(logits_BtV, targets_Bt, mask_Bt)[0]


def _cross_entropy_fwd(logits_BtV, targets_Bt, mask_Bt):
    logits_f32 = logits_BtV.astype(jnp.float32)
    max_Bt = logits_f32.max(-1)  # never differentiated: the backward is written out below
    lse_Bt = max_Bt + jnp.log(jnp.exp(logits_f32 - max_Bt[..., None]).sum(-1))
    target_Bt = jnp.take_along_axis(logits_f32, targets_Bt[..., None], axis=-1)[..., 0]
    mask_Bt = mask_Bt.astype(jnp.float32)
    sums = ((lse_Bt - target_Bt) * mask_Bt).sum(), (jnp.square(lse_Bt) * mask_Bt).sum()
    return sums, (logits_BtV, lse_Bt, targets_Bt, mask_Bt)


def _cross_entropy_bwd(residuals, cotangents):
    logits_BtV, lse_Bt, targets_Bt, mask_Bt = residuals
    g_ce, g_z = cotangents
    # d/dlogits of ce: softmax - onehot; of lse^2: 2 * lse * softmax.
    softmax_weight_Bt1 = (mask_Bt * (g_ce + 2 * g_z * lse_Bt))[..., None]
    softmax_BtV = jnp.exp(logits_BtV.astype(jnp.float32) - lse_Bt[..., None])
    onehot_BtV = jnp.arange(logits_BtV.shape[-1]) == targets_Bt[..., None]
    d_BtV = softmax_weight_Bt1 * softmax_BtV - jnp.where(onehot_BtV, (mask_Bt * g_ce)[..., None], 0.0)
    return d_BtV.astype(logits_BtV.dtype), None, None


cross_entropy_sums.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
