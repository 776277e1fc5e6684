"""A LLaMA-style 1.1B model on one GPU: RMSNorm, RoPE, SwiGLU, 4:1 grouped-query attention.

What for: the LLaMA flavour at a size where one H100/H200 is well used (the third throughput
yardstick beside gpt2_124m and gpt2_774m), and the base for fine-tuning-sized runs.
Shape: d_model 2048, 16 layers, 32 query heads and 8 kv heads of 64, d_ff 8192, seq 2048,
untied head; with the 32768-piece stdlib tokenizer that is ~1.1B parameters.
Data: the stdlib corpus (32768-piece BPE); use `data.source=parquet` (or jsonl, files, tfds)
for a real corpus.
How long: 1000 steps of 8 x 2048 tokens (16M tokens, 1.2e17 FLOPs): about 5 minutes on one
H100 at 40% MFU, plus ~15 s of compile. Its H100 step-speed record is not quoted as a
measurement: that record's loss on random tokens fell far below ln V (docs/speed.md). Weights
and Adam state take ~18 GB in fp32, so not for CPUs.
Expect: memorises stdlib quickly; use it for speed, memory and as a base.
"""

from lmjax.config import Data, Experiment, Model, Optim, Train


def config() -> Experiment:
    return Experiment(
        name="llama_1b",
        model=Model(
            flavour="llama",
            d_model=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            d_ff=8192,
            seq_len=2048,
            rope_theta=500000.0,
        ),
        data=Data(source="stdlib", vocab_size=32768, tokenizer_sample_bytes=20_000_000),
        optim=Optim(lr=3e-4, warmup_steps=100, weight_decay=0.1),
        train=Train(steps=1000, batch_size=8, eval_every=250, eval_batches=8, log_every=25),
    )
