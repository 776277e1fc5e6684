"""GPT-2 large (774M) on one GPU: the second throughput yardstick.

What for: nanoGPT's and nanodo's second measured size (batch 8, seq 1024, bf16).
Data: as gpt2_124m (stdlib, 32768-piece BPE), so ~752M parameters here.
How long: ~10 minutes on one H100 (49M tokens at the 79k tokens/s measured there on
2026-11-26; docs/speed.md), plus ~35 s of compile; not for CPUs.
Expect: memorises stdlib; useful for speed and memory, and as the base of real-data runs.
"""

import dataclasses

from lmjax.experiments import gpt2_124m

from lmjax.config import Experiment


def config() -> Experiment:
    base = gpt2_124m.config()
    return dataclasses.replace(
        base,
        name="gpt2_774m",
        model=dataclasses.replace(base.model, d_model=1280, n_layers=36, n_heads=20),
        optim=dataclasses.replace(base.optim, lr=2.5e-4),
        train=dataclasses.replace(base.train, batch_size=8, steps=6000),
    )
