"""`python -m lmjax.chat --workdir DIR [--system TEXT --max-tokens N --temperature T ...]`

A conversation in the terminal with the newest checkpoint of a run: one message per line on
stdin (typed, or piped from a file), each reply streamed to stdout as it is decoded, up to the
chat template's end of turn. The whole conversation is sent each turn; when it no longer fits
the model's context with room left for the reply (min(--max-tokens, model.seq_len / 4) tokens),
the oldest turns after the system message are dropped, with a note on stderr. Commands: /reset
forgets the conversation (the system message stays), /system TEXT sets the system message
(/system alone clears it), /quit (or end of input) ends. Turn n samples with seed --seed + n,
so a conversation replayed from a file gets the same replies.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

from lmjax import generate
from lmjax.config import UserError
from lmjax.data import chat_template
from lmjax.data.chat_template import Message, TemplateError

COMMANDS = "/reset (forget the conversation), /system [TEXT] (set or clear the system message), /quit"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lmjax.chat", description=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", required=True, help="a run folder with a checkpoint")
    parser.add_argument("--system", default="", help="the system message (default: none)")
    generate.add_sampling_arguments(parser, temperature=0.7)  # turn n samples with seed + n
    args = parser.parse_args(argv)
    generate.check_settings(args.max_tokens, args.temperature, args.top_k, args.top_p, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        generator = generate.Generator.from_workdir(args.workdir, args.set, log=_note)
        Chat(generator, args).run(_lines())
    except UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
        return 130
    return 0


class Chat:
    """The conversation so far and what each line of input does to it."""

    def __init__(self, generator: generate.Generator, args: argparse.Namespace):
        self.generator, self.args = generator, args
        self.template = generator.template
        context = generator.exp.model.seq_len
        # Room for the reply: all of it where the context allows, else a quarter of the context.
        self.budget = context - min(args.max_tokens, context // 4)
        self.system = args.system
        self.turns: list[Message] = []  # user and assistant messages, oldest first
        self.turn_number = 0

    def run(self, lines: Iterator[str]) -> None:
        for line in lines:
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                if command == "/quit":
                    return
                if command == "/reset":
                    self.turns = []
                elif command == "/system":
                    self.system = rest.strip()
                else:
                    _note(f"{command}: not a command; the commands are {COMMANDS}")
                continue
            try:
                self.reply_to(line)
            except TemplateError as e:  # this message cannot be sent; the conversation goes on
                print(f"lmjax: error: {e}", file=sys.stderr)

    def reply_to(self, text: str) -> None:
        system = [{"role": "system", "content": self.system}] if self.system else []
        asked = [*system, *self.turns, {"role": "user", "content": text}]
        kept, dropped = chat_template.fit(self.template, asked, self.budget)
        if dropped:
            _note(
                f"dropped the {dropped} oldest turn(s): the conversation no longer fits the model's "
                f"context ({self.generator.exp.model.seq_len} tokens, with room for the reply)"
            )
        prompt = self.template.prompt(kept)
        room = min(self.args.max_tokens, self.generator.room(len(prompt)))
        print("assistant> ", end="", flush=True)
        reply = self.generator.text_of(
            [prompt],
            room,
            self.args.temperature,
            self.args.top_k,
            self.args.top_p,
            self.args.seed + self.turn_number,
            on_text=lambda _, new: print(new, end="", flush=True),
            stop_ids=self.template.stop_ids,
        )[0]
        print(flush=True)
        self.turn_number += 1
        answer = {"role": "assistant", "content": reply}
        turns = [*kept[len(system) :], answer]
        try:  # this exchange alone: a template may render earlier turns by what follows them
            self.template.render([{"role": "user", "content": text}, answer])
        except TemplateError:  # the reply spells a template piece: it cannot be sent back
            _note("the reply holds text of the chat template, so it is left out of the conversation")
            turns = turns[:-2]
        self.turns = turns


def _lines() -> Iterator[str]:
    """Lines of stdin, after a `you> ` prompt where stdin is a terminal (with line editing)."""
    if not sys.stdin.isatty():
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD
        yield from sys.stdin
        return
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401 - line editing and history for input()

    while True:
        try:
            yield input("you> ")
        except EOFError:
            print()
            return


def _note(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
