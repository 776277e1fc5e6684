"""Causal self-attention: `dispatch` picks a kernel (`resolve`) and runs it, `kernels` holds the
fused GPU/TPU kernels, `check` tests every kernel a machine can run against the fp32 reference."""

from lmjax.attention.dispatch import IMPLEMENTATIONS, attention, cached, cuda_capability, reference, resolve

__all__ = ["IMPLEMENTATIONS", "attention", "cached", "cuda_capability", "reference", "resolve"]
