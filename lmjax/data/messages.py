"""Messages: what a conversation is made of, and the check every conversation passes before a
template renders it (the chat sources check each row with it as they read it)."""

from __future__ import annotations

from lmjax.config import UserError

ROLES = ("system", "user", "assistant")

Message = dict[str, str]  # {"role": one of ROLES, "content": text}


class TemplateError(UserError):
    """A conversation the template cannot render: a bad role or content, or a misplaced system
    message."""


def check(messages: object, where: str = "the conversation") -> list[Message]:
    """`messages` as a list of messages, or a TemplateError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TemplateError(
                f"{where}: message {i} must be {{'role': one of {list(ROLES)}, 'content': text}}, "
                f"got {m!r:.80}"
            )
        if m["role"] == "system" and i > 0:
            raise TemplateError(f"{where}: message {i} is a system message; only the first may be")
        out.append({"role": m["role"], "content": m["content"]})
    return out
