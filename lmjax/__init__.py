"""lmjax: train language models with JAX, from a laptop CPU to a TPU pod.

`python -m lmjax.train --experiment stdlib_tiny --workdir runs/tiny` is the place to start.
This package imports nothing heavy: jax loads when a run starts, after its config is checked.
"""

__version__ = "0.1.0"
