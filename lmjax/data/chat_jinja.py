"""An imported Hugging Face model's `chat_template` (Jinja), rendered as transformers renders it,
and which template a run uses: its folder's chat_template.jinja, else lmjax's (`for_run`).

transformers compiles the template in jinja2's `ImmutableSandboxedEnvironment` with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, its own `tojson` filter (no
ASCII escaping) and the globals `raise_exception` and `strftime_now`, and renders it with
`messages`, `add_generation_prompt`, `bos_token` and `eos_token`; so does `JinjaTemplate`.

Ids: the rendered text is encoded with the model's sentencepiece tokenizer, where text that
spells one of its control pieces (`<s>`, `</s>`, ...) is that piece, as transformers reads
special tokens in a template's output; a message whose content spells one is refused. lmjax
starts every sequence with one `<s>`: a template that prints `{{ bos_token }}` first has that
`<s>` taken as the sequence's own (so `render` leaves it out and `prompt` puts it back), and one
that does not gets it in front; a `<s>` the template prints further on stays where it is.

Trained tokens: for each assistant turn, the ids of the conversation before it with the
generation prompt, and of the conversation up to and including it, must both be a prefix of the
whole conversation's ids (a TemplateError names the turn where not); the ids between the two
are trained: the reply and whatever the template closes the turn with (ChatML's
"<|im_end|>\\n", LLaMA-2's " </s>").

Stop ids: `</s>`, and the piece a turn ends with where the template closes an assistant turn
with text that is a single control or user-defined piece of the tokenizer (ChatML's
`<|im_end|>` when the tokenizer has it as a piece). Otherwise replies end at `</s>` or the
token limit.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lmjax import storage
from lmjax.config import UserError
from lmjax.data.chat_template import ChatTemplate, LmjaxTemplate, Message, Rendered, TemplateError, check
from lmjax.data.tokenizer import CONTROL, USER_DEFINED, Tokenizer

if TYPE_CHECKING:  # jinja2 is optional (lmjax[hf]): imported where a template is compiled
    import jinja2

JINJA_FILE = "chat_template.jinja"  # an imported model's template, in its run folder
# A reply that no template changes (strip, capitalise) and no tokenizer merges with its
# neighbours: found in a rendering, it shows the text a template closes a turn with.
_PROBE = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "7"}]


class JinjaTemplate:
    """A `ChatTemplate` (chat_template.py) from the Jinja source of a Hugging Face chat_template."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        self.tokenizer = tokenizer
        self._template = _compile(source)
        pieces = tokenizer.pieces()
        self._spelling = [spelling for spelling, _ in pieces]
        self._control = {spelling: i for i, (spelling, kind) in enumerate(pieces) if kind == CONTROL}
        self._whole = {i for i, (_, kind) in enumerate(pieces) if kind in (CONTROL, USER_DEFINED)}
        # Longest first, so that a piece holding another is matched whole.
        spelled = sorted(self._control, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, spelled))) if spelled else None
        self.stop_ids = (tokenizer.eos_id, *self._end_of_turn())

    def render(self, messages: Sequence[Message]) -> Rendered:
        messages = self._checked(messages)
        ids = self._ids(messages, add_generation_prompt=False)
        trained = np.zeros(len(ids), bool)
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                start = self._prefix_length(messages[:k], True, ids, k)
                end = self._prefix_length(messages[: k + 1], False, ids, k)
                trained[start:end] = True
        return Rendered(ids, trained)

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        return [self.tokenizer.bos_id, *self._ids(self._checked(messages), add_generation_prompt=True)]

    def _checked(self, messages: Sequence[Message]) -> list[Message]:
        messages = check(list(messages))
        for i, m in enumerate(messages):
            found = self._control_re.search(m["content"]) if self._control_re else None
            if found:
                raise TemplateError(
                    f"message {i} holds the tokenizer's special piece {found[0]} as text; remove it"
                )
        return messages

    def _prefix_length(self, messages: list[Message], generation_prompt: bool, ids: list[int], k: int) -> int:
        """How many of `ids` the rendering of `messages` is; TemplateError when not their start."""
        prefix = self._ids(messages, generation_prompt) if messages else []
        if ids[: len(prefix)] != prefix:
            which = "before" if generation_prompt else "up to"
            raise TemplateError(
                f"the chat template renders the conversation {which} message {k} (an assistant turn) "
                "as other tokens than the start of the whole conversation, so what to train on is "
                "unknown; use a template that renders earlier turns the same whatever follows"
            )
        return len(prefix)

    def _ids(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        """The template's text for `messages` as ids, without the sequence's leading <s>."""
        ids = self._encode(self._text(messages, add_generation_prompt))
        return ids[1:] if ids[:1] == [self.tokenizer.bos_id] else ids

    def _text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._spelling[self.tokenizer.bos_id],
                eos_token=self._spelling[self.tokenizer.eos_id],
            )
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template refuses the conversation: {e}") from None

    def _encode(self, text: str) -> list[int]:
        """sentencepiece's ids for `text`, where the spelling of a control piece is that piece."""
        if self._control_re is None:
            return self.tokenizer.encode(text)
        ids, at = [], 0
        for found in self._control_re.finditer(text):
            ids += [*self.tokenizer.encode(text[at : found.start()]), self._control[found[0]]]
            at = found.end()
        return ids + self.tokenizer.encode(text[at:])

    def _end_of_turn(self) -> tuple[int, ...]:
        """The piece the template closes an assistant turn with, when that text (spaces aside)
        is one control or user-defined piece other than </s>; else none."""
        try:
            text = self._text(_PROBE, add_generation_prompt=False)
        except TemplateError:  # a template for other roles or orders: </s> alone
            return ()
        closing = text[text.rfind(_PROBE[1]["content"]) + 1 :].strip()
        ids = self._encode(closing) if closing else []
        return (ids[0],) if len(ids) == 1 and ids[0] in self._whole - {self.tokenizer.eos_id} else ()


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    """The template as transformers compiles it (chat_template_utils.py)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("an imported chat template needs jinja2: pip install 'lmjax[hf]'") from None

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        x: object,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def for_run(folder: storage.PathLike, tokenizer: Tokenizer) -> ChatTemplate:
    """The template of the run or import in `folder`: the imported chat_template where there
    is one, else lmjax's (UserError when the tokenizer lacks its pieces)."""
    jinja = storage.path(folder) / JINJA_FILE
    return for_source(tokenizer, jinja.read_text() if jinja.exists() else "")


def for_source(tokenizer: Tokenizer, jinja_source: str) -> ChatTemplate:
    """The template a Jinja source gives (an imported model's), or lmjax's where it is ""."""
    if not jinja_source:
        return LmjaxTemplate(tokenizer)
    return JinjaTemplate(tokenizer, jinja_source)


def read_source(path: str) -> str:
    """The Jinja source of the template file `path` (data.chat_template); "" for none."""
    if not path:
        return ""
    file = storage.path(path)
    if not file.is_file():
        raise UserError(f"data.chat_template={path} does not exist; give a chat_template.jinja file")
    return file.read_text()
