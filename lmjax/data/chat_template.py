"""Conversations as token ids and a per-token loss mask.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`
(the layout OpenAI and Hugging Face datasets use); a system message may only come first.
lmjax's own tokenizers reserve one piece per role and one that ends a turn (tokenizer.py), and
a conversation renders as

    <|system|>You answer briefly.<|end|><|user|>What does len do?<|end|><|assistant|>Returns...<|end|>

with no other text between turns. Rendering encodes each content alone and puts the pieces'
ids around it, so the ids are exactly what the tokenizer gives for that text (`text`), and
`parse` gives the messages back. The loss is taken on each assistant turn's content and its
<|end|> (so the model learns to stop), never on the system's or user's tokens. A reply is
prompted by ending the ids with <|assistant|>, and stops at <|end|> (or </s>, or a role piece:
another turn beginning).

An imported model with a `chat_template` (its tokenizer_config.json) uses that instead
(chat_jinja.py, where `for_run` picks the template of a run's folder).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from lmjax.config import UserError
from lmjax.data.messages import ROLES, Message, TemplateError, check
from lmjax.data.tokenizer import CHAT_PIECES, Tokenizer

__all__ = [
    "ROLES",
    "ChatTemplate",
    "LmjaxTemplate",
    "Message",
    "Rendered",
    "TemplateError",
    "check",
    "fit",
    "text",
]

ROLE_PIECES = dict(zip(ROLES, CHAT_PIECES[:3], strict=True))
END_PIECE = CHAT_PIECES[3]
PIECES = CHAT_PIECES  # reserved in every tokenizer lmjax trains


@dataclasses.dataclass
class Rendered:
    """A conversation's ids and which of them the loss is taken on (`trained`, bool)."""

    ids: list[int]
    trained: np.ndarray


class ChatTemplate(Protocol):
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]  # ids that end a reply

    def render(self, messages: Sequence[Message]) -> Rendered:
        """The conversation's ids (no <s>) and its trained tokens."""
        ...

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids that ask for the next assistant turn after `messages`, <s> first."""
        ...


class LmjaxTemplate:
    """lmjax's template over a tokenizer that has the reserved pieces."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = {piece: tokenizer.piece_id(piece) for piece in PIECES}
        if None in ids.values():
            raise UserError(
                f"the tokenizer has no chat pieces {' '.join(PIECES)}; fine-tune a model whose tokenizer "
                "lmjax trained, or an imported one with a chat_template"
            )
        self.role_ids = {role: ids[piece] for role, piece in ROLE_PIECES.items()}
        self.end_id = ids[END_PIECE]
        # A reply ends at <|end|>; </s> or a role piece would also end it (another turn begins).
        self.stop_ids = (self.end_id, tokenizer.eos_id, *self.role_ids.values())
        self._special = {*self.role_ids.values(), self.end_id, tokenizer.bos_id, tokenizer.eos_id}

    def render(self, messages: Sequence[Message]) -> Rendered:
        ids: list[int] = []
        trained: list[bool] = []
        for i, m in enumerate(check(list(messages))):
            content = self.tokenizer.encode(m["content"])
            if self._special.intersection(content):
                raise TemplateError(
                    f"message {i} holds a template piece ({' '.join(PIECES)}, <s> or </s>) as text; remove it"
                )
            turn = [self.role_ids[m["role"]], *content, self.end_id]
            ids += turn
            trained += [False] + [m["role"] == "assistant"] * (len(turn) - 1)
        return Rendered(ids, np.array(trained, bool))

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        return [self.tokenizer.bos_id, *self.render(messages).ids, self.role_ids["assistant"]]

    def parse(self, ids: Sequence[int]) -> list[Message]:
        """The messages of rendered ids (a leading <s> and a trailing </s> are skipped)."""
        roles = {i: role for role, i in self.role_ids.items()}
        messages: list[Message] = []
        content: list[int] = []
        for i in ids:
            if i in roles:
                messages.append({"role": roles[i], "content": ""})
                content = []
            elif i == self.end_id:
                messages[-1]["content"] = self.tokenizer.decode(content)
            elif i not in (self.tokenizer.bos_id, self.tokenizer.eos_id):
                content.append(i)
        return messages


def text(messages: Sequence[Message]) -> str:
    """The rendered conversation as text: what the tokenizer encodes to `render`'s ids."""
    return "".join(f"{ROLE_PIECES[m['role']]}{m['content']}{END_PIECE}" for m in messages)


def fit(template: ChatTemplate, messages: Sequence[Message], budget: int) -> tuple[list[Message], int]:
    """The newest turns of `messages` whose prompt fits in `budget` tokens: the oldest turns
    after a system message are dropped first. Returns (messages kept, how many dropped);
    TemplateError when even the last message alone does not fit."""
    kept = list(messages)
    system = kept[:1] if kept and kept[0]["role"] == "system" else []
    dropped = 0
    while len(template.prompt(kept)) > budget:
        if len(kept) - len(system) <= 1:
            raise TemplateError(
                f"the message is {len(template.prompt(kept))} tokens with the template, more than the "
                f"{budget} the model's context leaves; shorten it"
            )
        kept = system + kept[len(system) + 1 :]
        dropped += 1
        while len(kept) > len(system) + 1 and kept[len(system)]["role"] == "assistant":
            kept = system + kept[len(system) + 1 :]  # a conversation starts with the user
            dropped += 1
    return kept, dropped
