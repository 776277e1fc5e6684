"""OpenAI's wire format for the server: the request bodies it reads (pydantic models that check
every field), the error body, and the completion objects and stream chunks it writes."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from lmjax.data.chat_template import Message


class ApiError(Exception):
    """A request the server turns down: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return error_body(str(self), kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Settings(BaseModel):
    """What both endpoints take besides the prompt; other fields are ignored."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError(f"only n=1 is supported (one choice per request), got {n}")
        return n

    @property
    def stop_texts(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> Message:
        """The message as the chat template takes it: a developer message is a system one."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(Settings):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(Settings):
    prompt: str


@dataclasses.dataclass
class Reply:
    """The objects one reply is written as: a whole completion, or its stream chunks."""

    chat: bool
    model: str
    id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        choice = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return self._object(False, self._choice(choice, finish_reason), usage)

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        """A stream event with `text` added (None: nothing, as in the last chunk)."""
        if self.chat:
            delta = {"role": "assistant"} if role else {}
            choice = {"delta": delta if text is None else {**delta, "content": text}}
        else:
            choice = {"text": text or ""}
        return event(self._object(True, self._choice(choice, finish_reason)))

    def usage_chunk(self, usage: dict) -> str:
        return event(self._object(True, [], usage))

    @staticmethod
    def _choice(content: dict, finish_reason: str | None) -> list[dict]:
        return [{"index": 0, **content, "logprobs": None, "finish_reason": finish_reason}]

    def _object(self, streamed: bool, choices: list[dict], usage: dict | None = None) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if streamed else "chat.completion"
        else:
            kind = "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return {**out, "choices": choices, "usage": usage} if usage else {**out, "choices": choices}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def event(data: dict | str) -> str:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
