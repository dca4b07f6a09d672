"""The OpenAI-compatible HTTP API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, as a thin layer over
`ApiService` (which runs generations through `Client`, so every answer is recorded and replayable)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hivegen import __version__
from hivegen.api.errors import describe, error_response, install_error_handlers
from hivegen.api.schemas import ApiParameterError, ChatCompletionRequest, CompletionRequest, SamplingFields
from hivegen.api.service import ApiService, Choice, ChoicePlan, Event, ServedModel
from hivegen.credits.units import format_credits

DEFAULT_MAX_TOKENS = 512  # chat answers without max_tokens stop at eos, the context's end, or here
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 4 << 20


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before it is read whole."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiParameterError("body", f"the request body is over {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"the request body is over {limit} bytes", "invalid_request_error", "body")


def create_app(
    service: ApiService, api_key: str | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> FastAPI:
    """The API over `service`; with `api_key`, every /v1 request must carry `Authorization: Bearer <key>`."""
    app = FastAPI(title="hivegen", version=__version__, docs_url=None, redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(BodyLimit)

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return error_response(
                    401, "missing or wrong API key: send `Authorization: Bearer <key>` with the server's --api-key",
                    "authentication_error", None, "invalid_api_key",
                )  # fmt: skip
        response: Response = await call_next(request)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": [m.id for m in service.models]}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m) for m in service.models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        return _model_card(service.model(name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        body.check()
        served = service.model(body.model)
        prompt = await asyncio.to_thread(served.client.encode_chat, body.conversation())
        return await _complete(service, served, body, [prompt], "chat", default_max_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        body.check()
        served = service.model(body.model)
        prompts = [await asyncio.to_thread(_prompt_ids, served, p) for p in body.prompts()]
        return await _complete(service, served, body, prompts, "text", COMPLETION_MAX_TOKENS)

    return app


def _model_card(served: ServedModel) -> dict[str, Any]:
    return {"id": served.id, "object": "model", "created": served.created, "owned_by": "hivegen",
            "context_length": served.context_length, "fingerprint": served.fingerprint}  # fmt: skip


def _prompt_ids(served: ServedModel, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return served.client.encode(prompt)
    vocab = int(served.client.checkpoint.text_config.vocab_size)
    if any(not 0 <= t < vocab for t in prompt):
        raise ApiParameterError("prompt", f"token ids must be in [0, {vocab})")
    return list(prompt)


def _token_limit(served: ServedModel, body: SamplingFields, prompt: Sequence[int], default: int) -> int:
    """max_tokens as asked, or the default, within the model's context."""
    context = served.context_length
    if context is not None and len(prompt) >= context:
        field = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        raise ApiParameterError(field, f"the prompt has {len(prompt)} tokens; the model's context is {context}")
    room = None if context is None else context - len(prompt)
    if body.token_limit is None:
        return default if room is None else min(default, room)
    if room is not None and body.token_limit > room:
        raise ApiParameterError(
            body.token_limit_field,
            f"{len(prompt)} prompt tokens + {body.token_limit} new tokens exceed the model's context of {context}",
        )
    return body.token_limit


async def _complete(
    service: ApiService, served: ServedModel, body: SamplingFields, prompts: list[list[int]], kind: str, default: int
) -> Response:
    sampling = {"temperature": 1.0 if body.temperature is None else body.temperature, "top_p": body.top_p,
                "top_k": body.top_k, "seed": body.seed, "stop": body.stop_strings()}  # fmt: skip
    plans: list[ChoicePlan] = []
    for p, prompt in enumerate(prompts):
        limit = _token_limit(served, body, prompt, default)
        for plan in await asyncio.to_thread(service.plan, served, prompt, body.n, limit, **sampling):
            plans.append(ChoicePlan(p * body.n + plan.index, plan.request, plan.replayed))
    events, cancelled = service.start(served, plans, asyncio.get_running_loop(), body.stream)
    replayed = "true" if all(p.replayed for p in plans) else "false"
    usage_prompt = sum(len(p) for p in prompts)
    if not body.stream:
        try:
            choices = await _collect(events, len(plans))
        finally:
            cancelled.set()
        headers = {
            "x-hivegen-replayed": "true" if all(c.generation.replayed for c in choices) else "false",
            "x-hivegen-ref": ",".join(c.generation.ref for c in choices),
            "x-hivegen-cost": format_credits(sum(c.cost for c in choices)),
        }
        return JSONResponse(_response(kind, body.model, served, choices, usage_prompt), headers=headers)
    first = await events.get()  # the route and the first token, or why not: still time for an HTTP status
    if first.error is not None:
        cancelled.set()
        raise first.error
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    stream = _stream(kind, body.model, served, first, events, len(plans), cancelled, usage_prompt, include_usage)
    headers = {"x-hivegen-replayed": replayed, "x-hivegen-request-ref": ",".join(p.request.ref for p in plans),
               "cache-control": "no-cache", "x-accel-buffering": "no"}  # fmt: skip
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _collect(events: asyncio.Queue[Event], count: int) -> list[Choice]:
    done: dict[int, Choice] = {}
    while len(done) < count:
        event = await events.get()
        if event.error is not None:
            raise event.error
        if event.choice is not None:
            done[event.index] = event.choice
    return [done[i] for i in sorted(done)]


def _response(kind: str, model: str, served: ServedModel, choices: list[Choice], prompt_tokens: int) -> dict:
    completion = sum(len(c.generation.tokens) for c in choices)
    base = {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + choices[0].generation.ref[:32],
            "created": int(time.time()), "model": model, "system_fingerprint": served.fingerprint,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}  # fmt: skip
    if kind == "chat":
        return {**base, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.generation.text},
             "finish_reason": c.finish_reason, "logprobs": None} for i, c in enumerate(choices)]}  # fmt: skip
    return {**base, "object": "text_completion", "choices": [
        {"index": i, "text": c.generation.text, "finish_reason": c.finish_reason, "logprobs": None}
        for i, c in enumerate(choices)]}  # fmt: skip


async def _stream(
    kind: str, model: str, served: ServedModel, first: Event, events: asyncio.Queue[Event], count: int,
    cancelled: Any, prompt_tokens: int, include_usage: bool,
) -> AsyncIterator[str]:  # fmt: skip
    """Server-sent events: each choice's deltas, its finish, an optional usage chunk, then `[DONE]`."""
    chunk_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {"id": chunk_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": created, "model": model, "system_fingerprint": served.fingerprint, "choices": choices,
                **extra}  # fmt: skip
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    def delta(index: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
        if kind == "chat":
            content: dict[str, Any] = {} if text is None else {"content": text}
            return {"index": index, "delta": content, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}

    done: list[Choice] = []
    try:
        if kind == "chat":
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                          "logprobs": None} for i in range(count)])  # fmt: skip
        event: Event | None = first
        while event is not None:
            if event.error is not None:
                yield f"data: {json.dumps(describe(event.error)[1])}\n\n"
                break
            if event.delta:
                yield chunk([delta(event.index, event.delta)])
            if event.choice is not None:
                done.append(event.choice)
                g = event.choice.generation
                yield chunk(
                    [delta(event.index, None, event.choice.finish_reason)],
                    hivegen={"ref": g.ref, "replayed": g.replayed, "cost": format_credits(event.choice.cost)},
                )
            event = await events.get() if len(done) < count else None  # fmt: skip
        else:
            if include_usage:
                completion = sum(len(c.generation.tokens) for c in done)
                yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                       "total_tokens": prompt_tokens + completion})  # fmt: skip
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()  # the client went away (or all is sent): stop what still runs
