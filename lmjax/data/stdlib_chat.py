"""Question-and-answer conversations about the standard library, made from its own docstrings.

For each `.py` file of the running Python's standard library (files.stdlib_files), every public
top-level function and class, and every public method of a public class, whose docstring says
something becomes a conversation: the user asks what `module.name` does (one of a few
phrasings, picked by a hash of the name) and the assistant answers with the docstring's first
sentence. About a third go on to a second turn: for a function or method "Which arguments does it
take?" (its parameters, from the signature; up to six), else "Which module is it in?". The source is
read with `ast`, never imported, so the set is the same wherever the same Python runs, and a
file that does not parse gives none.

A conversation's key is the qualified name (`textwrap.dedent`, `textwrap.TextWrapper.wrap`):
the split by key hash (files.split_of) keeps held-out names out of training.
"""

from __future__ import annotations

import ast
import hashlib
import pathlib
import re
import threading
from collections.abc import Iterator

from lmjax.data import files

MAX_ANSWER_CHARS = 200  # the whole conversation stays within a 128-token context
MIN_ANSWER_WORDS = 3
FUNCTION_QUESTIONS = (
    "What does `{}` do?",
    "Explain `{}` in one sentence.",
    "What is `{}` for?",
    "In one sentence, what does `{}` do?",
)
CLASS_QUESTIONS = (
    "What is `{}`?",
    "Explain the class `{}` in one sentence.",
    "What is `{}` for?",
    "In one sentence, what is `{}`?",
)
ARGUMENTS_QUESTION = "Which arguments does it take?"
MODULE_QUESTION = "Which module is it in?"
TWO_TURN_EVERY = 3  # one conversation in this many has a second turn
MAX_LISTED_ARGUMENTS = 6  # a longer signature gets the module question instead

# A signature line as C-style docstrings start: "dedent(text) -> str", "D.get(k[,d]) -> D[k]".
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")
# Where a sentence ends: ". " before an upper-case letter, a digit, a quote or a bracket, unless
# the period closes a common abbreviation.
_SENTENCE_END = re.compile(
    r"(?<=[.!?])(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)(?<!\bvs\.)\s+(?=[A-Z0-9`'\"(\[])"
)
_PLACEHOLDER = re.compile(r"^(docstring|xxx|to[d]o|fixme|undocumented|not implemented|see\b)", re.IGNORECASE)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
# CPython 3.11's parser keeps its recursion depth per interpreter, not per thread: two threads
# parsing at once (the token cache encodes files in a thread pool) fail with "AST constructor
# recursion depth mismatch". Parsing holds the GIL anyway, so one at a time costs nothing.
_PARSING = threading.Lock()


def module_name(relative_path: str | pathlib.PurePath) -> str:
    """The dotted module of a file below the library's root: "email/utils.py" -> "email.utils",
    "json/__init__.py" -> "json"."""
    parts = pathlib.PurePosixPath(relative_path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def conversations(source_text: str, module: str) -> list[tuple[str, list[dict[str, str]]]]:
    """(qualified name, messages) for each documented public function, class and method of one
    module's source; [] when it does not parse, or for a private module (`_pyio`, `json.__main__`):
    an implementation detail, not the library's interface."""
    if any(not _is_public(part) for part in module.split(".")):
        return []
    try:
        with _PARSING:
            tree = ast.parse(source_text)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return []
    out: list[tuple[str, list[dict[str, str]]]] = []
    for node in tree.body:
        if not isinstance(node, (*_FUNCTIONS, ast.ClassDef)) or not _is_public(node.name):
            continue
        out += _conversation(node, f"{module}.{node.name}", module, takes_self=False)
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, _FUNCTIONS) and _is_public(method.name):
                    key = f"{module}.{node.name}.{method.name}"
                    out += _conversation(method, key, module, takes_self=not _is_static(method))
    first: dict[str, list[dict[str, str]]] = {}  # a property's setter repeats its name: the first kept
    for key, messages in out:
        first.setdefault(key, messages)
    return list(first.items())


def stdlib_conversations() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Every conversation of the running Python's standard library, file by file in path order."""
    root, paths = files.stdlib_files()
    for path in paths:
        yield from conversations(path.read_text(errors="replace"), module_name(path.relative_to(root)))


def first_sentence(docstring: str) -> str | None:
    """The docstring's first sentence, whitespace collapsed, or None when it says nothing
    usable (empty, a placeholder, a bare signature, too short or too long)."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", docstring.strip())]
    paragraphs = [p for p in paragraphs if p]
    if paragraphs and _SIGNATURE.match(paragraphs[0]):
        paragraphs = paragraphs[1:]  # the description follows the signature
    if not paragraphs:
        return None
    sentence = _SENTENCE_END.split(paragraphs[0], maxsplit=1)[0]
    if sentence[-1] not in ".!?":
        sentence += "."
    usable = (
        len(sentence.split()) >= MIN_ANSWER_WORDS
        and len(sentence) <= MAX_ANSWER_CHARS
        and not _PLACEHOLDER.match(sentence)
        and not _SIGNATURE.match(sentence.rstrip("."))
        and ">>>" not in sentence  # a doctest, not a description
        and "<|" not in sentence  # the chat template's pieces are "<|user|>" and the like
    )
    return sentence if usable else None


def _conversation(
    node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, key: str, module: str, takes_self: bool
) -> list[tuple[str, list[dict[str, str]]]]:
    docstring = ast.get_docstring(node)
    answer = first_sentence(docstring) if docstring else None
    if answer is None:
        return []
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    is_class = isinstance(node, ast.ClassDef)
    questions = CLASS_QUESTIONS if is_class else FUNCTION_QUESTIONS
    messages = [
        {"role": "user", "content": questions[digest % len(questions)].format(key)},
        {"role": "assistant", "content": answer},
    ]
    if (digest >> 32) % TWO_TURN_EVERY == 0:
        names = None if is_class else _argument_names(node.args, takes_self)
        if names is None or len(names) > MAX_LISTED_ARGUMENTS:
            messages += [
                {"role": "user", "content": MODULE_QUESTION},
                {"role": "assistant", "content": f"`{module}`."},
            ]
        else:
            messages += [
                {"role": "user", "content": ARGUMENTS_QUESTION},
                {"role": "assistant", "content": _listed(names)},
            ]
    return [(key, messages)]


def _argument_names(args: ast.arguments, takes_self: bool) -> list[str]:
    """The parameters' names, "*args" and "**kwargs" marked; the first (self, cls) left out
    when `takes_self`."""
    positional = [a.arg for a in (*args.posonlyargs, *args.args)]
    if takes_self and positional:
        positional = positional[1:]
    names = positional + ([f"*{args.vararg.arg}"] if args.vararg else [])
    names += [a.arg for a in args.kwonlyargs]
    names += [f"**{args.kwarg.arg}"] if args.kwarg else []
    return names


def _listed(names: list[str]) -> str:
    """Parameter names as an answer: "`text` and `width`.", "It takes no arguments."."""
    if not names:
        return "It takes no arguments."
    quoted = [f"`{n}`" for n in names]
    return (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]) + "."


def _is_static(method: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in method.decorator_list)


def _is_public(name: str) -> bool:
    return not name.startswith("_")
