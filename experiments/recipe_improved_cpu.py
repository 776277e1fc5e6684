"""The improved recipe at the quickstart's size: the candidate of the CPU recipe pair.

What for: the same model size, data, batch and token budget as `recipe_gpt2_cpu`, trained with
what public speedruns (modded-nanogpt) found learns more per token: Muon for the hidden
matrices (AdamW for embeddings, norms and biases), QK-norm, zero-initialised output
projections, a logit soft-cap, a small z-loss and a warmup-stable-decay schedule. ReLU² is left
out: at this size it cost 0.04 nats of held-out loss against GELU (`--set model.mlp=relu2`;
benchmarks/results/recipe-custom-cpu1-relu2.json).
How long: as the baseline, with Muon's Newton-Schulz steps on top: 2.7k tokens/s against the
baseline's 4.0k, measured side by side on a 2-core x86_64 CPU, 2026-11-26.
Expect: held-out 2.74 nats/token, 1.39 bits/byte at the end, against the GPT-2 recipe's 3.15
and 1.60; it reaches the baseline's final loss with 39% fewer tokens (2-core x86_64 CPU,
2026-11-26: benchmarks/results/recipe-cpu-cpu1.json, docs/recipes.md).
"""

import dataclasses

from lmjax.experiments import recipe_gpt2_cpu

from lmjax.config import Experiment


def config() -> Experiment:
    base = recipe_gpt2_cpu.config()
    return dataclasses.replace(
        base,
        name="recipe_improved_cpu",
        model=dataclasses.replace(base.model, qk_norm=True, zero_init=True, logit_softcap=30.0, z_loss=1e-4),
        optim=dataclasses.replace(
            base.optim, name="muon", muon_lr=0.02, schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.0
        ),
    )
