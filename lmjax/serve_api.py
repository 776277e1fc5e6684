"""The server's HTTP side (FastAPI): OpenAI's `/v1/models`, `/v1/chat/completions` and
`/v1/completions`, plus `/stats`. Requests are checked here, turned into `Job`s for the
batcher, and answered whole or as a stream of Server-Sent Events. Anything wrong with a request
gets a 4xx and OpenAI's error body, never a 500."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from lmjax.config import UserError
from lmjax.generate import Generator
from lmjax.serve_batch import Batcher, Job, JobFailed, Log, Sampling
from lmjax.serve_wire import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Reply,
    Settings,
    error_body,
    event,
    usage,
)


def build_app(generator: Generator, model_id: str, max_batch: int, log: Log) -> FastAPI:
    """The app serving `generator` as the model `model_id`."""
    batcher: Batcher | None = None  # made on the server's event loop

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        nonlocal batcher
        batcher = Batcher(generator, max_batch, log)
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.close()

    app = FastAPI(title="lmjax", lifespan=lifespan)
    _add_error_handlers(app, log)
    model = {"id": model_id, "object": "model", "created": 0, "owned_by": "lmjax"}
    context = generator.exp.model.seq_len

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{**model, "context_length": context}]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str) -> dict:
        _check_model(name, model_id)
        return {**model, "context_length": context}

    @app.get("/stats")
    async def stats() -> dict:
        return batcher.stats.snapshot()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        _check_model(body.model, model_id)
        template = generator.template  # UserError for a tokenizer without chat pieces: a 400
        prompt_ids = template.prompt([m.plain() for m in body.messages])
        limit = body.max_completion_tokens or body.max_tokens
        job = _job(generator, body, prompt_ids, limit, template.stop_ids, "messages")
        return await _answer(batcher, job, body, Reply(chat=True, model=model_id))

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        _check_model(body.model, model_id)
        tok = generator.tokenizer
        prompt_ids = [tok.bos_id, *tok.encode(body.prompt)]
        job = _job(generator, body, prompt_ids, body.max_tokens, (tok.eos_id,), "prompt")
        return await _answer(batcher, job, body, Reply(chat=False, model=model_id))

    return app


def _check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server has {model_id!r}",
            "model",
            "model_not_found",
        )


def _job(
    generator: Generator,
    body: Settings,
    prompt_ids: list[int],
    limit: int | None,
    stop_ids: tuple[int, ...],
    prompt_field: str,
) -> Job:
    """A job for the prompt; `limit` (None: what the context leaves) is cut to what it leaves."""
    context = generator.exp.model.seq_len
    if len(prompt_ids) > context:
        raise ApiError(
            400,
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {context} tokens; shorten it",
            prompt_field,
            "context_length_exceeded",
        )
    room = generator.room(len(prompt_ids))
    temperature = 1.0 if body.temperature is None else body.temperature
    sampling = Sampling(temperature, 1.0 if body.top_p is None else body.top_p, body.seed)
    return Job(
        prompt_ids, min(limit or room, room), sampling, stop_ids, body.stop_texts, generator.tokenizer.decode
    )


async def _answer(batcher: Batcher, job: Job, body: Settings, reply: Reply):
    batcher.submit(job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _JobStream(job, _events(job, reply, include_usage), media_type="text/event-stream")
    try:  # a handler cancelled (its client gone) lets go of its row too
        text = "".join([piece async for piece in job.texts()])
    except JobFailed as e:
        return JSONResponse(error_body(str(e), "server_error"), 500)
    finally:
        job.leave()
    return reply.whole(text, job.finish_reason, usage(len(job.prompt_ids), job.tokens))


async def _events(job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    if reply.chat:
        yield reply.chunk("", role=True)
    try:
        async for piece in job.texts():
            yield reply.chunk(piece)
    except JobFailed as e:
        yield event(error_body(str(e), "server_error"))
        return
    yield reply.chunk(None, job.finish_reason)
    if include_usage:
        yield reply.usage_chunk(usage(len(job.prompt_ids), job.tokens))
    yield event("[DONE]")


class _JobStream(StreamingResponse):
    """A stream that, however it ends (a client gone mid-stream included), lets go of its row."""

    def __init__(self, job: Job, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.leave()


def _add_error_handlers(app: FastAPI, log: Log) -> None:
    """Every error as OpenAI's error body: checks that failed are 400, unknown routes 404."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(UserError)
    async def user_error(_: Request, e: UserError) -> JSONResponse:
        return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = [str(p) for p in first["loc"][1:]]
        if first["type"] == "json_invalid":
            message, where = f"the request body is not valid JSON: {first['ctx']['error']}", []
        elif not where:
            message = "the request needs a JSON object as its body"
        else:
            message = f"{'.'.join(where)}: {first['msg']}"
            if first["type"] != "missing":
                message += f" (got {first['input']!r:.80})"
        return JSONResponse(error_body(message, "invalid_request_error", ".".join(where) or None), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        log(f"error answering a request: {e!r}")
        return JSONResponse(error_body(f"the server failed: {e}", "server_error"), status_code=500)
