"""The quickstart: a tiny GPT-2 on the Python standard library's own source.

What for: see the whole path (tokenizer, sharded step, held-out loss) on any machine in minutes.
Data: the running Python's stdlib .py files (~11 MB, no download); BPE tokenizer, 2048 pieces.
How long: about 5 minutes on a 2-core CPU (fp32: the CPU computes bf16 no faster); seconds on a GPU.
Expect: held-out loss falling from ~7.6 (ln 2048) to 3.12, i.e. 1.59 bits per byte after 600
steps (measured on a 2-core x86_64 CPU, 2026-12-03, in 5.4 minutes:
benchmarks/results/stdlib_tiny-cpu1.json); gzip -9 manages 1.94 bits/byte on this corpus and
xz -9e 1.66.
"""

from lmjax.config import Data, Experiment, Model, Optim, Train


def config() -> Experiment:
    return Experiment(
        name="stdlib_tiny",
        model=Model(
            flavour="gpt2",
            d_model=192,
            n_layers=4,
            n_heads=6,
            seq_len=128,
            dtype="float32",
            param_dtype="float32",
        ),
        data=Data(source="stdlib", vocab_size=2048),
        optim=Optim(lr=3e-3, warmup_steps=40, weight_decay=0.1),
        train=Train(steps=600, batch_size=32, eval_every=150, eval_batches=8, log_every=20),
    )
