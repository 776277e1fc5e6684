"""The GPT-2 recipe at the quickstart's size: the baseline of the CPU recipe pair.

What for: `benchmarks/recipe.py --pair cpu` trains this and `recipe_improved_cpu` (the same
model size, data and token budget) and reports what the improved recipe buys per token.
Data: the stdlib corpus, 2048-piece BPE (as stdlib_tiny).
Recipe: AdamW (lr 3e-3, wd 0.1), warmup + cosine, GELU MLP, learned positions, tied head.
How long: 600 steps of 32 x 128 tokens (2.5M tokens), as stdlib_tiny (about 4 minutes of
training on an idle 2-core CPU), plus the whole validation split scored every 25 steps.
Expect: held-out 3.15 nats/token, 1.60 bits/byte at the end (measured on a 2-core x86_64 CPU,
2026-11-26: benchmarks/results/recipe-cpu-cpu1.json).
"""

import dataclasses

from lmjax.experiments import stdlib_tiny

from lmjax.config import Experiment


def config() -> Experiment:
    exp = stdlib_tiny.config()
    return dataclasses.replace(
        exp,
        name="recipe_gpt2_cpu",
        train=dataclasses.replace(exp.train, eval_every=25, eval_batches=0, log_every=25),
    )
