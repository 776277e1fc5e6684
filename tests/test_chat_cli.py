"""`python -m lmjax.chat`: a scripted conversation through a real subprocess, with a model trained to
answer from the conversation, and its argument errors."""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_train_argv

from lmjax import chat, train

GREEDY = ("--temperature", "0", "--max-tokens", "8")
WORDS = "apple river stone cloud tiger maple ocean violet copper garden falcon lemon".split()


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """A run trained on conversations in lmjax's template where each reply is the previous user
    word (or the system message's, or "hello" first) and then this turn's: greedy replies depend
    on the earlier turns. The stdlib runs (short_run) answer every prompt with newlines, which
    would hide a history that is never sent."""
    corpus = tmp_path_factory.mktemp("chat_corpus")
    rng = random.Random(0)
    for f in range(20):
        docs = []
        for _ in range(200):
            system = rng.choice([None, rng.choice(WORDS)])
            previous, text = system or "hello", f"<|system|>{system}<|end|>" if system else ""
            for _ in range(3):
                word = rng.choice(WORDS)
                text += f"<|user|>{word}<|end|><|assistant|>{previous} {word}<|end|>"
                previous = word
            docs.append(text)
        (corpus / f"{f}.txt").write_text("\n".join(docs) + "\n")
    workdir = tmp_path_factory.mktemp("chat_run")
    sets = [
        "data.source=files",
        f"data.path={corpus}",
        "data.vocab_size=300",
        "data.tokenizer_sample_bytes=200000",
    ]
    sets += [
        "train.steps=300",
        "train.eval_batches=0",
        "model.seq_len=64",
        "model.n_layers=2",
        "optim.lr=1e-2",
    ]
    assert train.main(tiny_train_argv(workdir, *sets)) == 0
    return workdir


def run_chat(workdir: Path, lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lmjax.chat",
            "--workdir",
            str(workdir),
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def replies(stdout: str) -> list[str]:
    return [
        line.removeprefix("assistant> ") for line in stdout.splitlines() if line.startswith("assistant> ")
    ]


def test_a_scripted_conversation(chat_run):
    """Each reply is sent the whole conversation: the same question gets another answer after
    another first turn, /reset and /system change what is sent, a message too long for the
    context is refused without ending the conversation, old turns are dropped with a note, and
    nothing after /quit is read."""
    script = [
        "apple",
        "tiger",  # 1: after apple
        "/reset",
        "",
        "tiger",  # 2: a first turn
        "/reset",
        "/system ocean",
        "tiger",  # 3: a first turn after a system message
        "/system",
        "/reset",
        "tiger",  # 4: a first turn again
        "/frobnicate",
        " ".join(["apple"] * 80),  # more than the context: refused
        "river",
        "stone",
        "cloud",
        "maple",
        "lemon",
        "/quit",
        "garden",
    ]
    done = run_chat(chat_run, script)
    assert done.returncode == 0, done.stderr
    got = replies(done.stdout)
    assert len(got) == 10, done.stdout  # every message but the refused one and the one after /quit
    assert got[0].startswith("hello"), got  # the model answers the first turn as trained
    assert got[1] != got[2], got  # the reply to "tiger" depends on the turn before it
    assert got[3] != got[2] and got[4] == got[2], got  # the system message is sent, and cleared
    errors = [line for line in done.stderr.splitlines() if line.startswith("lmjax: error: ")]
    assert len(errors) == 1 and "shorten it" in errors[0], done.stderr
    assert re.search(r"^/frobnicate: not a command; the commands are /reset .* /quit$", done.stderr, re.M)
    dropped = [int(n) for n in re.findall(r"^dropped the (\d+) oldest turn\(s\)", done.stderr, re.M)]
    assert dropped and all(n >= 1 for n in dropped), done.stderr
    assert "Traceback" not in done.stderr


def test_end_of_input_ends_the_conversation(chat_run):
    done = run_chat(chat_run, ["apple"])
    assert done.returncode == 0, done.stderr
    assert len(replies(done.stdout)) == 1


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--max-tokens", "0"], "--max-tokens 0: give at least 1"),
        (["--temperature", "-1"], "--temperature -1.0"),
        (["--top-p", "0"], "--top-p 0.0"),
    ],
)
def test_bad_settings_exit_2_with_one_line(tmp_path, capsys, args, problem):
    assert chat.main(["--workdir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmjax: error: {problem}") and err.count("\n") == 1, err


def test_a_workdir_without_a_checkpoint_exits_2(tmp_path, capsys):
    assert chat.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmjax: error: ") and "checkpoint" in err[-1], err
