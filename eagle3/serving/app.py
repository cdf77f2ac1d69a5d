"""The HTTP front: an OpenAI-compatible API over the scheduler (FastAPI).

    POST /v1/chat/completions, /v1/completions (streamed as server-sent events or not), GET /v1/models,
    /health, /metrics

A request is checked (key, body, model, room), encoded, submitted, and answered from its job's events; a client
that goes away cancels its job, which frees its row at the next round.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from eagle3.decoding.engine import Request as EngineRequest
from eagle3.serving import metrics, protocol
from eagle3.serving.protocol import ApiError, ChatRequest, CompletionRequest
from eagle3.serving.scheduler import Job, QueueFull, Scheduler, ShuttingDown
from eagle3.runtimes.target import Target, encode_messages

RETRY_AFTER_S = 1  # what a refused client is told to wait


def _stopped() -> ApiError:
    """What a request still decoding when the server stops gets."""
    return ApiError(503, "the server stopped before the answer was complete", "server_error", code="shutting_down")


def _validation_message(err: RequestValidationError) -> str:
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


class KeyCheck:
    """401 for /v1/* without `Authorization: Bearer KEY`. Plain ASGI (Starlette's BaseHTTPMiddleware would hide
    a client's disconnect from the routes, which cancel its request on it)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                err = ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(scheduler: Scheduler, target: Target, model_name: str, api_key: str | None = None) -> FastAPI:
    """The API for `scheduler`'s engine, serving `target` as model_name (started and stopped with the app)."""
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop(grace_s=0)  # (the ASGI server has already waited its grace period for open requests)

    app = FastAPI(title="eagle3", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
        return await api_error(request, ApiError(400, _validation_message(err)))

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> JSONResponse:  # still the OpenAI shape
        return await api_error(request, ApiError(500, f"internal error, {type(err).__name__}: {err}", "server_error"))

    if api_key is not None:
        app.add_middleware(KeyCheck, api_key=api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.accepting
        return JSONResponse({"status": "ok" if ok else "shutting down"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(scheduler), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "eagle3", "max_model_len": scheduler.max_len}]}  # fmt: skip

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        body.unsupported()
        try:
            prompt_ids = encode_messages(target, body.conversation())
        except Exception as err:  # (chat templates raise their own errors, e.g. on roles out of order)
            raise ApiError(400, f"the chat template refused the messages: {err}", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        engine_request = protocol.engine_request(body, prompt_ids, scheduler.max_len, max_tokens)
        return await answer(request, body, engine_request, protocol.new_id("chatcmpl"), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        body.unsupported()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):  # one string in a list
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = target.encode(prompt)
        else:
            vocab = target.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            prompt_ids = list(prompt)
        engine_request = protocol.engine_request(body, prompt_ids, scheduler.max_len, body.max_tokens)
        return await answer(request, body, engine_request, protocol.new_id("cmpl"), chat=False)

    async def answer(http: Request, body: ChatRequest | CompletionRequest, engine_request: EngineRequest, rid: str,
                     chat: bool):  # fmt: skip
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(kind: str, value: object) -> None:  # (the engine thread)
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        try:
            job = scheduler.submit(engine_request, sink, stream=body.stream)
        except QueueFull as err:
            raise ApiError(429, str(err), kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        except ShuttingDown as err:
            raise ApiError(503, str(err), kind="server_error", code="shutting_down",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(job, events, rid, body.model, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})  # fmt: skip
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        scheduler.cancel(job)
                        return JSONResponse({}, status_code=499)  # (nobody reads it)
                    continue
                if kind == "done" and value is not None:
                    build = protocol.chat_response if chat else protocol.completion_response
                    return build(rid, body.model, value)
                if kind == "error":
                    raise ApiError(500, str(value), kind="server_error")
                if kind == "done":  # cancelled: the server is stopping
                    raise _stopped()
        finally:
            scheduler.cancel(job)  # (a no-op once it has ended)

    async def stream(job: Job, events: asyncio.Queue, rid: str, model: str, chat: bool, include_usage: bool
                     ) -> AsyncIterator[str]:  # fmt: skip
        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(text: str, finish: str | None = None) -> dict:
            if chat:
                return protocol.chat_chunk(rid, model, {"content": text} if text or finish is None else {}, finish)
            return protocol.completion_chunk(rid, model, text, finish)

        try:
            if chat:
                yield event(protocol.chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield event(chunk(value))
                elif kind == "error":
                    yield event(ApiError(500, str(value), kind="server_error").body())
                    break
                elif value is None:  # cancelled: the server is stopping
                    yield event(_stopped().body())
                    break
                else:
                    last = chunk("", protocol.finish_reason(value))
                    last["usage"] = protocol.usage(value)
                    last["eagle3"] = protocol.speculation(value)
                    yield event(last)
                    if include_usage:
                        yield event({**chunk(""), "choices": [], "usage": protocol.usage(value)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            scheduler.cancel(job)  # the client went away mid-stream (a no-op once the job has ended)

    return app
