"""GPT-2 small (124M with a 50257 vocabulary) on one GPU: the throughput yardstick.

What for: the size nanoGPT and nanodo are measured at (batch 16, seq 1024, bf16); the base
that bigger GPT-2 experiments and real-data runs change a few fields of.
Data: the stdlib corpus with a 32768-piece BPE tokenizer (~3.1M training tokens), so the
model has 111M parameters here, and the whole 2000 steps (33M tokens) see ~10 epochs of
stdlib; point `data.source=parquet data.path=...` (or jsonl) at a real corpus for a real run.
How long: ~75 s of training on one H100 at the step speed measured there on 2026-11-26
(450k tokens/s at the GPT-2 vocabulary; docs/speed.md), plus ~20 s of compile; not for CPUs.
Expect: on stdlib it memorises (~10 epochs): the training loss falls far below the held-out
loss, which bottoms out and then rises as it overfits.
"""

from lmjax.config import Data, Experiment, Model, Optim, Train


def config() -> Experiment:
    return Experiment(
        name="gpt2_124m",
        model=Model(flavour="gpt2", d_model=768, n_layers=12, n_heads=12, seq_len=1024),
        data=Data(source="stdlib", vocab_size=32768, tokenizer_sample_bytes=20_000_000),
        optim=Optim(lr=6e-4, warmup_steps=200, weight_decay=0.1, min_lr_ratio=0.1),
        train=Train(steps=2000, batch_size=16, eval_every=250, eval_batches=16, log_every=50),
    )
