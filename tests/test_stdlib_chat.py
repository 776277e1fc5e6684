"""The stdlib conversation set (lmjax/data/stdlib_chat.py) and benchmarks/chat_tiny.py's scores."""

import collections
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_train_argv

from lmjax import train
from lmjax.data import chat_template, files, stdlib_chat

REPO = Path(__file__).resolve().parent.parent

SOURCE = '''
"""A module of the library."""

def dedent(text):
    """Remove any common leading whitespace from every line in `text`.

    This can be used to make triple-quoted strings line up.
    """

def _private(x):
    """A private function nobody should be asked about."""

def undocumented(x):
    return x

def placeholder():
    """XXX"""

def signature_first(a, b=1):
    """signature_first(a, b=1) -> int

    Add the two   numbers
    together. Returns the sum.
    """

class TextWrapper:
    """Object for wrapping text, e.g. for a terminal. More follows."""

    def wrap(self, text, *, width=70):
        """Wrap the single paragraph in text."""

    def _split(self, text):
        """Split the text into chunks."""

    def __len__(self):
        """Return the number of lines."""

    @property
    def size(self):
        """The size of the wrapped text."""

    @size.setter
    def size(self, value):
        """Set the size of the text."""

class _Hidden:
    """A private class with a public method."""

    def shown(self):
        """Never asked about, being on a private class."""
'''


def _conversations() -> dict[str, list[dict[str, str]]]:
    return dict(stdlib_chat.conversations(SOURCE, "textwrap"))


def test_public_documented_names_are_found_and_private_ones_skipped():
    assert list(_conversations()) == [
        "textwrap.dedent",
        "textwrap.signature_first",
        "textwrap.TextWrapper",
        "textwrap.TextWrapper.wrap",
        "textwrap.TextWrapper.size",
    ]


def test_answers_are_the_docstrings_first_sentence():
    answers = {key: messages[1]["content"] for key, messages in _conversations().items()}
    assert answers == {
        "textwrap.dedent": "Remove any common leading whitespace from every line in `text`.",
        "textwrap.signature_first": "Add the two numbers together.",  # the signature line skipped
        "textwrap.TextWrapper": "Object for wrapping text, e.g. for a terminal.",
        "textwrap.TextWrapper.wrap": "Wrap the single paragraph in text.",
        "textwrap.TextWrapper.size": "The size of the wrapped text.",  # the getter's, not the setter's
    }


def test_questions_name_the_qualified_name_in_a_phrasing_fixed_by_it():
    for key, messages in _conversations().items():
        questions = (
            stdlib_chat.CLASS_QUESTIONS if key == "textwrap.TextWrapper" else stdlib_chat.FUNCTION_QUESTIONS
        )
        assert messages[0]["role"] == "user" and messages[0]["content"] in {q.format(key) for q in questions}
    assert stdlib_chat.conversations(SOURCE, "textwrap") == stdlib_chat.conversations(SOURCE, "textwrap")


@pytest.mark.parametrize(
    "docstring, sentence",
    [
        ("Return the sum.  Then more.", "Return the sum."),
        ("Return the sum\n    of both", "Return the sum of both."),
        ("Split i.e. cut the path. More.", "Split i.e. cut the path."),
        ("f(x) -> int", None),
        ("Docstring", None),
        ("XXX to be written", None),
        ("See above.", None),
        ("Too short.", None),
        (">>> f(1) returns two", None),
        ("Mention <|user|> as text.", None),
        ("word " * 60, None),
        ("", None),
    ],
)
def test_first_sentence(docstring, sentence):
    assert stdlib_chat.first_sentence(docstring) == sentence


def test_second_turns_give_the_arguments_or_the_module():
    """Forty documented functions and methods of one signature: a third or so go on to a second
    turn, answered from the signature (self left out, a static method's first kept)."""
    functions = "".join(
        f'def f{i}(a, b, *rest, key=None, **options):\n    """Do thing {i} well."""\n' for i in range(40)
    )
    methods = "".join(
        f'    def m{i}(self, a):\n        """Do thing {i} well."""\n'
        f'    @staticmethod\n    def s{i}(a):\n        """Do thing {i} well."""\n'
        for i in range(20)
    )
    classes = "".join(f'class C{i}:\n    """Hold thing {i} well."""\n' for i in range(20))
    found = dict(stdlib_chat.conversations(f"{functions}class K:\n{methods}{classes}", "pkg.mod"))
    seconds = {key: m[2:] for key, m in found.items() if len(m) > 2}
    assert 0.2 < len(seconds) / len(found) < 0.5
    expected = {"f": "`a`, `b`, `*rest`, `key` and `**options`.", "m": "`a`.", "s": "`a`.", "C": "`pkg.mod`."}
    for key, (question, reply) in seconds.items():
        kind = key.split(".")[-1][0]
        assert question == {
            "role": "user",
            "content": stdlib_chat.MODULE_QUESTION if kind == "C" else stdlib_chat.ARGUMENTS_QUESTION,
        }
        assert reply == {"role": "assistant", "content": expected[kind]}
    assert {key.split(".")[-1][0] for key in seconds} == set(expected)


def test_sources_that_do_not_parse_or_private_modules_give_none():
    assert stdlib_chat.conversations("def broken(:\n    '''Never parsed here.'''\n", "m") == []
    assert stdlib_chat.conversations("x = 1\0\n", "m") == []
    assert stdlib_chat.conversations(SOURCE, "_pyio") == []
    assert stdlib_chat.conversations(SOURCE, "json.__main__") == []


@pytest.mark.parametrize(
    "path, module",
    [("textwrap.py", "textwrap"), ("email/utils.py", "email.utils"), ("json/__init__.py", "json")],
)
def test_module_name(path, module):
    assert stdlib_chat.module_name(path) == module
    assert stdlib_chat.module_name(Path(path)) == module


@pytest.fixture(scope="module")
def stdlib_set() -> tuple[list[tuple[str, list[dict[str, str]]]], float]:
    start = time.perf_counter()
    found = list(stdlib_chat.stdlib_conversations())
    return found, time.perf_counter() - start


def test_the_stdlib_gives_thousands_of_valid_conversations_in_seconds(stdlib_set):
    found, seconds = stdlib_set
    assert len(found) > 3000 and seconds < 10
    keys = [key for key, _ in found]
    assert len(set(keys)) == len(keys)
    for key, messages in found:
        assert chat_template.check(messages, key) == messages
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert not any(piece in m["content"] for m in messages for piece in chat_template.PIECES)
    assert dict(found)["textwrap.dedent"][1]["content"].startswith("Remove any common leading whitespace")
    phrasings = collections.Counter(m[0]["content"].replace(key, "X") for key, m in found)
    assert all(phrasings[q.format("X")] > 100 for q in stdlib_chat.FUNCTION_QUESTIONS)
    assert 0.25 < sum(len(m) == 4 for _, m in found) / len(found) < 0.45


def test_the_split_by_name_holds_out_about_the_percent_asked(stdlib_set):
    found, _ = stdlib_set
    held_out = sum(files.is_validation(key, 10) for key, _ in found)
    assert 0.08 < held_out / len(found) < 0.12


def test_the_same_python_gives_the_same_set(stdlib_set):
    """Another process, with another string hash seed, makes exactly the same conversations."""
    code = (
        "import json; from lmjax.data import stdlib_chat\n"
        "print(json.dumps(list(stdlib_chat.stdlib_conversations())))"
    )
    env = os.environ | {"PYTHONHASHSEED": "123"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == json.loads(json.dumps(stdlib_set[0]))


# --- benchmarks/chat_tiny.py --------------------------------------------------------------------


def _benchmark(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))  # it imports its neighbour measure.py
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chat_bench = _benchmark("chat_tiny")


@pytest.mark.parametrize(
    "reply, answer, same",
    [
        ("Return the sum.", "return  the SUM", True),
        ("Return the sum", "Return the sum.", True),
        ("Return the sum of a.", "Return the sum.", False),
        ("Return the sum!", "Return the sum.", False),
    ],
)
def test_exact_match(reply, answer, same):
    assert chat_bench.exact_match(reply, answer) is same


@pytest.mark.parametrize(
    "reply, answer, f1",
    [
        ("Return the sum.", "return sum", 1.0),
        ("`textwrap`.", "textwrap", 1.0),
        ("The cat sat", "a cat sat on mats", 2 * 1.0 * 0.5 / 1.5),  # precision 2/2, recall 2/4
        ("sat sat sat", "cat sat", 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5)),  # a repeated word counts once
        ("nothing alike", "cat sat", 0.0),
        ("", "cat sat", 0.0),
        ("the", "a", 1.0),  # both empty once articles go
    ],
)
def test_token_f1(reply, answer, f1):
    assert chat_bench.token_f1(reply, answer) == pytest.approx(f1)


def test_well_formed():
    assert chat_bench.well_formed("Return the sum.", stopped=True)
    assert not chat_bench.well_formed("Return the sum.", stopped=False)  # ran into the token limit
    assert not chat_bench.well_formed("Return the sum.<|user|>And", stopped=True)


@pytest.fixture(scope="module")
def context_run(tmp_path_factory) -> Path:
    """A two-step stdlib run whose context (128, as stdlib_tiny's) holds the questions."""
    workdir = tmp_path_factory.mktemp("chat-bench-run")
    assert train.main(tiny_train_argv(workdir, "model.seq_len=128", "train.steps=2")) == 0
    return workdir


def test_the_benchmark_records_both_runs(context_run, tmp_path):
    """The same run as base and tuned: greedy replies, so the two score alike."""
    argv = ["--base", str(context_run), "--tuned", str(context_run), "--limit", "5", "--batch", "4"]
    assert chat_bench.main([*argv, "--max-tokens", "6", "--out", str(tmp_path)]) == 0
    [out] = tmp_path.glob("chat_tiny_replies-cpu*.json")
    record = json.loads(out.read_text())
    assert record["results"]["base"] == record["results"]["tuned"]
    scores = record["results"]["tuned"]
    assert scores["all"]["cases"] == sum(s["cases"] for name, s in scores.items() if name.startswith("turn_"))
    assert scores["all"]["cases"] + record["too_long"] >= 5 and record["conversations"] <= 5
    assert all(0 <= s[m] <= 1 for s in scores.values() for m in ("well_formed", "exact_match", "token_f1"))
    assert {"jax", "sentencepiece"} <= set(record["versions"]) and record["config"]["model"]["seq_len"] == 128
    example = record["examples"][0]
    assert example["base"] == example["tuned"] and example["question"].endswith(("?", "."))
    assert record["validation_percent"] == 2.0 and record["wall_s"] > 0


def test_the_benchmark_names_a_missing_run(tmp_path, capsys):
    assert chat_bench.main(["--base", str(tmp_path / "none"), "--tuned", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("lmjax: error:")
