"""lmjax: train language models with JAX, from a laptop CPU to a TPU pod.

`python -m lmjax.train --experiment stdlib_tiny --workdir runs/tiny` is the place to start.
This package imports nothing heavy: jax loads when a run starts, after its config is checked.

Array names end in their shape, one letter per axis (`x_BTD`, `logits_BTV`, `k_LBSKE`):
    B batch rows            T sequence positions      t positions of one loss chunk
    S key positions (KV-cache slots when decoding)    C loss chunks
    D d_model               H query heads             K key/value heads
    E head dim              F MLP hidden (d_ff)       V padded vocabulary
    L layers                G query heads per key/value head (H / K)
    M documents per row (cuDNN's packed attention)
Digits are sizes: 1 an axis of size one (to broadcast), E2 E / 2 (RoPE's pairs), M1 M + 1.
"""

__version__ = "0.1.0"
