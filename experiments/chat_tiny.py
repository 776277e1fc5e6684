"""The quickstart's chat fine-tune: stdlib_tiny taught to answer questions about the standard library.

What for: see supervised fine-tuning end to end (chat template, loss on the replies only, a warm
start, held-out questions) on any machine in minutes, after `stdlib_tiny` has run into
runs/stdlib_tiny.
Data: questions about the running Python's documented public functions, classes and methods,
answered with their docstring's first sentence (lmjax/data/stdlib_chat.py: about 4,800
conversations, a third with a second turn); 10% of the names are held out. The base run's
tokenizer, which reserves the chat pieces, is reused.
How long: a few minutes on a 2-core CPU; seconds on a GPU.
Expect: held-out loss on the replies falling below the base model's; compare both runs' replies
to the held-out questions with benchmarks/chat_tiny.py.
"""

from lmjax.experiments import stdlib_tiny

from lmjax.config import Checkpoint, Data, Experiment, Optim, Train


def config() -> Experiment:
    return Experiment(
        name="chat_tiny",
        model=stdlib_tiny.config().model,
        data=Data(source="stdlib_chat", vocab_size=2048, validation_percent=10),
        # A tenth of the base run's peak: adapt to the replies without forgetting the library.
        optim=Optim(lr=3e-4, warmup_steps=20, weight_decay=0.1),
        train=Train(steps=300, batch_size=32, eval_every=50, eval_batches=0, log_every=10),
        checkpoint=Checkpoint(init_from="runs/stdlib_tiny"),
    )
