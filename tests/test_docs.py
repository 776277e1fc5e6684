"""README.md and docs/*.md quote only config keys, commands and flags that exist, link only to
files of the repository that exist, and the README stays a five-minute read."""

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import io
import re
import sys
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path

import pytest

from lmjax import config

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 12 * 1024

# What a fresh machine runs (CI too): these two lines stay in the README exactly as written.
FRESH_MACHINE_COMMANDS = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m lmjax.train "
    "--experiment stdlib_tiny --workdir runs/stdlib_tiny",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest",
)

PLACEHOLDER_KEYS = {"key", "KEY", "section.field"}  # `--set key=value` in a synopsis

FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE_CODE = re.compile(r"`((?:[^`\n]|\n(?!\n))+)`")  # may run over a line break, not a paragraph
LINK = re.compile(r"\]\(([^)\s]+)\)")
SET_ITEM = re.compile(r"--set\s+['\"]?([\w.]+)=")
# A CLI quoted in the docs: `python -m lmjax.X`, a console script `lmjax-X`, a benchmark script.
COMMAND = re.compile(
    r"python3?\s+-m\s+(?P<module>lmjax\.[\w.]+)"
    r"|(?<![\w/.-])(?P<script>lmjax-[a-z][\w-]*)"
    r"|python3?\s+(?P<benchmark>benchmarks/\w+\.py)"
    r"|bash\s+(?P<shell>benchmarks/\w+\.sh)"
)
FLAG = re.compile(r"--?[A-Za-z][\w-]*")


def config_keys(cls: type = config.Experiment, prefix: str = "") -> set[str]:
    """Every `--set` key: the fields of the experiment's sections, e.g. `train.steps`."""
    hints = typing.get_type_hints(cls)
    keys = set()
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            keys |= config_keys(hints[field.name], f"{prefix}{field.name}.")
        else:
            keys.add(prefix + field.name)
    return keys


KEYS = config_keys()
SECTIONS = sorted({key.partition(".")[0] for key in KEYS if "." in key})
# A setting written out anywhere (`train.eval_batches=0`, "model.n_layers=2" in a --set list).
SETTING = re.compile(rf"(?<![\w.-])((?:{'|'.join(SECTIONS)})\.[\w.]+)=")
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@dataclasses.dataclass(frozen=True)
class Cli:
    flags: frozenset[str]
    subcommands: dict[str, "Cli"]


def _help_text(main: Callable[[list[str]], int | None], argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main([*argv, "--help"])
        except SystemExit:
            pass
    return out.getvalue()


def _cli(main: Callable[[list[str]], int | None], argv: tuple[str, ...] = ()) -> Cli:
    """A CLI's option strings and subcommands, read off its argparse help."""
    flags, subcommands = set(), {}
    for line in _help_text(main, list(argv)).splitlines():
        item = line.strip()
        if line.startswith("  ") and item.startswith("-"):  # "  -o OUT, --out OUT    help text"
            flags |= set(FLAG.findall(re.split(r"\s{2,}", item)[0]))
        if listed := re.fullmatch(r"\{([\w,-]+)\}", item):  # subcommands, under positional arguments
            for name in listed.group(1).split(","):
                subcommands[name] = _cli(main, (*argv, name))
    return Cli(frozenset(flags), subcommands)


@functools.cache
def script_cli(script: str) -> Cli | None:
    """`lmjax-plan` (or `python -m lmjax.plan`): the entry point pyproject.toml names for it."""
    if script not in SCRIPTS:
        return None
    module, _, function = SCRIPTS[script].partition(":")
    return _cli(getattr(importlib.import_module(module), function))


@functools.cache
def benchmark_cli(path: str) -> Cli | None:
    file = REPO / path
    if not file.is_file():
        return None
    if file.suffix == ".sh":  # its options are the literal words it tests for
        return Cli(frozenset(FLAG.findall(file.read_text())), {})
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))  # benchmarks import their neighbours (measure, throughput)
    spec = importlib.util.spec_from_file_location(f"docs_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return _cli(module.main)


def _commands(text: str) -> list[str]:
    """Code to read for commands: each line of a fenced block (continuations joined) and each
    inline code span of the prose."""
    pieces = []
    for block in FENCED.findall(text):
        pieces += block.replace("\\\n", " ").splitlines()
    pieces += [span.replace("\n", " ") for span in INLINE_CODE.findall(FENCED.sub("", text))]
    out = []
    for piece in pieces:
        piece = re.split(r"\s#\s", piece)[0]  # a shell comment
        out += re.split(r"&&|;|\s\|\s", piece)
    return out


def _check_command(name: str, cli: Cli | None, args: str) -> list[str]:
    if cli is None:
        return [f"{name}: no such command"]
    words = [w.strip("[]()\"'") for w in args.split()]
    problems = []
    if cli.subcommands and words and not words[0].startswith("-"):
        if words[0] not in cli.subcommands:
            return [f"{name} {words[0]}: no such subcommand"]
        name, cli = f"{name} {words[0]}", cli.subcommands[words[0]]
    for i, word in enumerate(words):
        flag = word.split("=")[0]
        if FLAG.fullmatch(flag) and flag not in cli.flags:
            problems.append(f"{name} {flag}: no such flag")
        if flag == "--experiment" and i + 1 < len(words) and re.fullmatch(r"[a-z][a-z0-9_]*", words[i + 1]):
            if words[i + 1] not in config.list_experiments():
                problems.append(f"{name} --experiment {words[i + 1]}: no such experiment")
    return problems


def quoted_problems(text: str) -> list[str]:
    """Config keys, commands and flags quoted in a markdown text that do not exist."""
    problems = [
        f"--set {key}: no such config key"
        for key in SET_ITEM.findall(text) + SETTING.findall(text)
        if key not in KEYS | PLACEHOLDER_KEYS
    ]
    for piece in _commands(text):
        found = list(COMMAND.finditer(piece))
        ends = [m.start() for m in found[1:]] + [len(piece)] * bool(found)
        for match, end in zip(found, ends, strict=True):
            name, args = " ".join(match[0].split()), piece[match.end() : end]
            if module := match["module"]:
                cli = script_cli("lmjax-" + module.removeprefix("lmjax.").replace("_", "-"))
            elif script := match["script"]:
                cli = script_cli(script)
            else:
                cli = benchmark_cli(match["benchmark"] or match["shell"])
            problems += _check_command(name, cli, args)
    return sorted(set(problems))


def _slug(heading: str) -> str:
    """The anchor a markdown heading gets: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCED.sub("", page.read_text())
    return {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}


def link_problems(page: Path, root: Path = REPO) -> list[str]:
    """Links that leave the repository or point at a file (or heading) that does not exist."""
    problems = []
    for target in LINK.findall(FENCED.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            problems.append(f"{target}: links outside the repository")
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(root) or not file.exists():
            problems.append(f"{target}: no such file in the repository")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            problems.append(f"{target}: no such heading")
    return problems


def test_readme_is_short_and_keeps_the_fresh_machine_commands():
    assert README.stat().st_size <= README_MAX_BYTES, f"README.md is {README.stat().st_size} bytes"
    text = README.read_text()
    for command in FRESH_MACHINE_COMMANDS:
        assert command in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_quoted_keys_commands_and_flags_exist(page):
    assert quoted_problems(page.read_text()) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_at_files_of_the_repository(page):
    assert link_problems(page) == []


def test_docs_pages_exist_and_the_readme_links_each():
    pages = {p.name for p in PAGES[1:]}
    assert len(pages) >= 5
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(README.read_text())}
    assert pages <= linked, f"README.md does not link {sorted(pages - linked)}"


def test_a_renamed_key_flag_or_command_is_reported():
    text = (
        "Train with `--set train.stepz=1` and `--set 'model.d_modell=64'`:\n\n"
        "```bash\n"
        "python -m lmjax.train --experiment stdlib_tiny --workdirr D \\\n"
        "  --set train.steps=2 --set data.sourcee=files\n"
        'EXTRA_SETS = ["model.n_layerz=2"]\n'
        "python -m lmjax.data prepar --experiment stdlib_tiny && lmjax-plan --devicez cpu\n"
        "python -m lmjax.trian --experiment stdlib_tiny\n"
        "python -m lmjax.plan --experiment gpt2_125m --devices cpu\n"
        "python benchmarks/throughput.py --experiment gpt2_124m --packd\n"
        "```\n"
    )
    assert quoted_problems(text) == [
        "--set data.sourcee: no such config key",
        "--set model.d_modell: no such config key",
        "--set model.n_layerz: no such config key",
        "--set train.stepz: no such config key",
        "lmjax-plan --devicez: no such flag",
        "python -m lmjax.data prepar: no such subcommand",
        "python -m lmjax.plan --experiment gpt2_125m: no such experiment",
        "python -m lmjax.train --workdirr: no such flag",
        "python -m lmjax.trian: no such command",
        "python benchmarks/throughput.py --packd: no such flag",
    ]
    good = "`python -m lmjax.data prepare --experiment stdlib_tiny --set train.steps=2` and `lmjax-plot -o x`"
    assert quoted_problems(good) == []


def test_a_broken_link_is_reported(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading) [gone](missing.md) [no](there.md#nope) [out](https://x.org)\n"
    )
    assert link_problems(page, root=tmp_path) == [
        "missing.md: no such file in the repository",
        "there.md#nope: no such heading",
        "https://x.org: links outside the repository",
    ]
