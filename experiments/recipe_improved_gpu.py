"""The improved recipe at GPT-2 small's size: the candidate of the GPU recipe pair.

What for: the same model, data, batch and token budget as `recipe_gpt2_gpu`, with the options
of `recipe_improved_cpu` (Muon for the hidden matrices, QK-norm, zero-init projections,
logit soft-cap, z-loss, warmup-stable-decay).
How long: as the baseline, plus Muon's Newton-Schulz iterations (5 per matrix per step).
Expect: to reach the GPT-2 recipe's final held-out loss with fewer tokens, as the same options
do on the CPU pair (39% fewer on a 2-core x86_64 CPU, 2026-11-26:
benchmarks/results/recipe-cpu-cpu1.json).
"""

import dataclasses

from lmjax.experiments import recipe_gpt2_gpu, recipe_improved_cpu

from lmjax.config import Experiment


def config() -> Experiment:
    base, recipe = recipe_gpt2_gpu.config(), recipe_improved_cpu.config()
    options = ("mlp", "qk_norm", "zero_init", "logit_softcap", "z_loss")
    return dataclasses.replace(
        base,
        name="recipe_improved_gpu",
        model=dataclasses.replace(base.model, **{k: getattr(recipe.model, k) for k in options}),
        optim=dataclasses.replace(recipe.optim, lr=base.optim.lr, warmup_steps=base.optim.warmup_steps),
    )
