"""How well a chat fine-tune answers held-out questions: a base run and its fine-tune, side by side.

    python benchmarks/chat_tiny.py --base runs/stdlib_tiny --tuned runs/chat_tiny [--limit N]
        [--batch 32] [--max-tokens 96] [--out DIR]

The questions are the stdlib conversations (lmjax/data/stdlib_chat.py) the tuned run held out:
its validation split, by the same key hash and data.validation_percent, so no question's
function was trained on. Each assistant turn is asked for with the true history before it and
answered greedily by both runs through the same chat template (lmjax's tokenizers hold its
pieces from the start, so the base run can be prompted too). Per run and turn:

- well_formed: the share of replies that ended at a stop piece (<|end|>) and hold no template
  piece as text;
- exact_match: the share equal to the answer once both are lowercased, whitespace collapsed
  and a trailing period dropped;
- token_f1: the mean SQuAD F1 of the reply's words against the answer's (lowercased,
  punctuation and articles dropped).

Writes OUT/chat_tiny_replies-<platform><devices>.json with the machine, versions, the tuned run's
config, both runs' numbers, a few example replies and the wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import string
import sys
import time
from pathlib import Path
from typing import NamedTuple

from measure import record_header

from lmjax import config
from lmjax.data import chat_template, files, stdlib_chat
from lmjax.data.chat_template import PIECES
from lmjax.generate import Generator

RESULTS = Path(__file__).parent / "results"
EXAMPLES = 8
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class Case(NamedTuple):
    """One assistant turn to answer: the conversation's key, the messages before it, and the
    answer the set gives."""

    key: str
    history: list[dict[str, str]]
    answer: str

    @property
    def turn(self) -> int:
        return sum(m["role"] == "user" for m in self.history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the run before fine-tuning")
    parser.add_argument("--tuned", required=True, help="the fine-tuned run")
    parser.add_argument("--limit", type=int, default=0, help="at most this many conversations (0: all)")
    parser.add_argument("--batch", type=int, default=32, help="conversations decoded together")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    started = time.time()
    try:
        tuned = Generator.from_workdir(args.tuned, log=_note)
        base = Generator.from_workdir(args.base, log=_note)
        percent = tuned.exp.data.validation_percent
        held_out = held_out_cases(percent, args.limit)
        cases = [c for c in held_out if fits(base, c) and fits(tuned, c)]
        if not cases:
            raise config.UserError(
                f"none of the {len(held_out)} held-out turns fits the models' context; use runs with a "
                "longer model.seq_len"
            )
        replies, generate_s = {}, {}
        for name, gen in (("base", base), ("tuned", tuned)):
            start = time.time()
            replies[name] = replies_of(gen, cases, args.batch, args.max_tokens)
            generate_s[name] = time.time() - start  # compiling included
    except config.UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    record = {
        **record_header(
            "chat_tiny", tuned.exp, tuned.mesh, ("jax", "jaxlib", "flax", "numpy", "sentencepiece")
        ),
        "runs": {"base": args.base, "tuned": args.tuned},
        "validation_percent": percent,
        "conversations": len({c.key for c in cases}),
        "too_long": len(held_out) - len(cases),  # turns whose prompt leaves the context no room
        "max_tokens": args.max_tokens,
        "results": {name: scores(cases, r) for name, r in replies.items()},
        "examples": [
            {"key": c.key, "question": c.history[-1]["content"], "answer": c.answer}
            | {name: r[i][0] for name, r in replies.items()}
            for i, c in enumerate(cases[:EXAMPLES])
        ],
        "generate_s": generate_s,
        "wall_s": time.time() - started,
    }
    out = Path(args.out) / f"chat_tiny_replies-{record['platform']}{record['devices']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"]))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def held_out_cases(percent: float, limit: int = 0) -> list[Case]:
    """Every assistant turn of the held-out conversations (the first `limit`, when given)."""
    conversations = [(k, m) for k, m in stdlib_chat.stdlib_conversations() if files.is_validation(k, percent)]
    if limit:
        conversations = conversations[:limit]
    return [
        Case(key, messages[:i], m["content"])
        for key, messages in conversations
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]


def fits(gen: Generator, case: Case) -> bool:
    """Whether the case's prompt leaves room in the model's context for a reply."""
    return len(gen.template.prompt(case.history)) < gen.exp.model.seq_len


def replies_of(gen: Generator, cases: list[Case], batch: int, max_tokens: int) -> list[tuple[str, bool]]:
    """(reply, ended at <|end|>) for each case, greedy, `batch` at a time. Cases of similar
    prompt length go together (less padding, fewer compiled shapes); a short last batch is
    filled with copies of its first case so it compiles to the same shape."""
    lengths = [len(gen.template.prompt(c.history)) for c in cases]
    end_id = gen.tokenizer.piece_id(chat_template.END_PIECE)
    order = sorted(range(len(cases)), key=lengths.__getitem__)
    out: list[tuple[str, bool]] = [("", False)] * len(cases)
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        filled = rows + rows[:1] * (batch - len(rows))
        # What the context leaves after the longest prompt, so no row is cut short unannounced.
        room = min(max_tokens, gen.room(max(lengths[i] for i in rows)))
        texts = gen.chat([cases[i].history for i in filled], max_tokens=room, temperature=0.0)
        for row, i in enumerate(rows):
            out[i] = (texts[row], gen.last_stops[row] == end_id)
    return out


def scores(cases: list[Case], replies: list[tuple[str, bool]]) -> dict[str, dict[str, float | int]]:
    """well_formed, exact_match and token_f1 over all cases ("all") and per turn ("turn_1", ...)."""
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, c in enumerate(cases):
        groups["all"].append(i)
        groups[f"turn_{c.turn}"].append(i)
    return {
        name: {
            "cases": len(rows),
            "well_formed": sum(well_formed(*replies[i]) for i in rows) / len(rows),
            "exact_match": sum(exact_match(replies[i][0], cases[i].answer) for i in rows) / len(rows),
            "token_f1": sum(token_f1(replies[i][0], cases[i].answer) for i in rows) / len(rows),
        }
        for name, rows in sorted(groups.items())
    }


def well_formed(reply: str, stopped: bool) -> bool:
    return stopped and not any(piece in reply for piece in PIECES)


def normalised(text: str) -> str:
    """Lowercased, whitespace collapsed, a trailing period dropped."""
    return " ".join(text.lower().split()).removesuffix(".").rstrip()


def exact_match(reply: str, answer: str) -> bool:
    return normalised(reply) == normalised(answer)


def token_f1(reply: str, answer: str) -> float:
    """SQuAD's F1 over words (lowercased, punctuation and articles dropped): the harmonic mean
    of the shares of the reply's words in the answer and of the answer's in the reply."""
    got, want = _words(reply), _words(answer)
    if not got or not want:
        return float(got == want)
    common = sum((collections.Counter(got) & collections.Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def _words(text: str) -> list[str]:
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def _note(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
