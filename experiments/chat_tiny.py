"""The quickstart's chat fine-tune: stdlib_tiny taught to answer questions about the standard library.

What for: see supervised fine-tuning end to end (chat template, loss on the replies only, a warm
start, held-out questions) on any machine in minutes, after `stdlib_tiny` has run into
runs/stdlib_tiny.
Data: questions about the running Python's documented public functions, classes and methods,
answered with their docstring's first sentence (lmjax/data/stdlib_chat.py: about 4,800
conversations, a third with a second turn); 10% of the names are held out. The base run's
tokenizer, which reserves the chat pieces, is reused.
How long: 2.7 minutes of fine-tuning on a 2-core CPU after the quickstart (seconds on a GPU),
and 40 s to score both runs with benchmarks/chat_tiny.py.
Expect: held-out loss on the replies 2.87 (1.29 bits/byte); 99.7% of held-out replies
well-formed (ended at <|end|>) against the base model's 0%, token F1 0.183 against 0.013
(measured on a 2-core x86_64 CPU, 2026-12-03: benchmarks/results/chat_tiny-cpu1.json,
chat_tiny_replies-cpu1.json).
"""

from lmjax.experiments import stdlib_tiny

from lmjax.config import Checkpoint, Data, Experiment, Optim, Train


def config() -> Experiment:
    return Experiment(
        name="chat_tiny",
        model=stdlib_tiny.config().model,
        data=Data(source="stdlib_chat", vocab_size=2048, validation_percent=10),
        # The base run's peak, with a short warmup: lower peaks held out less (docs/chat.md).
        optim=Optim(lr=3e-3, warmup_steps=20, weight_decay=0.1),
        train=Train(steps=300, batch_size=32, eval_every=50, eval_batches=0, log_every=10),
        checkpoint=Checkpoint(init_from="runs/stdlib_tiny"),
    )
