"""Experiments: one file each, `def config() -> lmjax.config.Experiment`.

Installed as `lmjax.experiments`, so `--experiment stdlib_tiny` works anywhere; experiments
compose by importing each other (`from lmjax.experiments import gpt2_124m`).
"""
