"""The GPT-2 recipe at GPT-2 small's size: the baseline of the GPU recipe pair.

What for: `benchmarks/recipe.py --pair gpu` trains this and `recipe_improved_gpu` (same model,
data and token budget) on one GPU. Model: gpt2_124m (12 x 768, seq 1024, bf16).
Data: stdlib with an 8192-piece BPE (~4M training tokens), so the 400 steps of 16 x 1024 tokens
(6.6M tokens) are ~1.6 epochs: short enough that neither run is mostly memorising. For a
comparison that carries over to real pretraining, point `data.*` at a real corpus.
How long: ~20 s of training per run on an H100 at gpt2_124m's step speed there (docs/speed.md),
plus compile and the whole validation split scored every 25 steps; not for CPUs.
Expect: `recipe_improved_gpu` to reach this run's final held-out loss with fewer tokens, as
on the CPU pair (39% fewer on a 2-core x86_64 CPU, 2026-11-26: benchmarks/results/recipe-cpu-cpu1.json).
"""

import dataclasses

from lmjax.experiments import gpt2_124m

from lmjax.config import Experiment


def config() -> Experiment:
    base = gpt2_124m.config()
    return dataclasses.replace(
        base,
        name="recipe_gpt2_gpu",
        data=dataclasses.replace(base.data, vocab_size=8192),
        optim=dataclasses.replace(base.optim, warmup_steps=40),
        train=dataclasses.replace(base.train, steps=400, eval_every=25, eval_batches=0, log_every=25),
    )
