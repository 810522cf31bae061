"""OpenAI-compatible HTTP front of the router (FastAPI): completions, chat, SSE streaming, models,
health, readiness and Prometheus metrics. Errors are always OpenAI-style JSON, never tracebacks."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton.router.dispatch import new_request_id
from baton.router.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_json,
    completion_json,
    usage_chunk_json,
    usage_json,
)
from baton.router.service import Prepared, RouterService, TextDelta

log = logging.getLogger(__name__)
_END = object()


class ClientGone(Exception):
    """The HTTP client disconnected before the response was complete."""


class _Run:
    """Runs one request's stream in its own task, so a client disconnect cancels it (and through
    it the workers' streams) wherever the response is, not only when the next write fails."""

    def __init__(self, request: Request, stream: AsyncIterator[TextDelta]) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._gone = False
        self._pump = asyncio.create_task(self._feed(stream))
        self._watch = asyncio.create_task(self._watch_disconnect(request))

    async def _feed(self, stream: AsyncIterator[TextDelta]) -> None:
        try:
            async for delta in stream:
                self._queue.put_nowait(delta)
            self._queue.put_nowait(_END)
        except APIError as exc:
            self._queue.put_nowait(exc)
        except asyncio.CancelledError:
            self._queue.put_nowait(ClientGone())
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500, logged here
            log.exception("request stream failed")
            self._queue.put_nowait(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    async def _watch_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._gone = True
        self._pump.cancel()

    async def next(self) -> TextDelta | None:
        """The next delta; None at the end. Raises APIError or ClientGone."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._pump.cancel()
        self._watch.cancel()


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # Drop "body" and the union-member tags pydantic puts in loc ("str", "list[int]", "function-after[...]").
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if param is None:
        return f"Invalid request body: {msg}", None
    return f"Invalid value for '{param}': {msg}", param


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict", "none"})


def create_app(service: RouterService) -> FastAPI:
    app = FastAPI(title="Baton router", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = service.metrics

    def rejected(request: Request, status: int) -> None:
        metrics.requests.labels(request.url.path, str(status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        rejected(request, exc.status)
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        rejected(request, 400)
        return _error(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        rejected(request, 500)
        return _error(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        dispatcher = service.dispatcher
        decodes = len(dispatcher.routable("decode"))
        body = {"ready": decodes > 0 and service.registry.connected, "decode_workers": decodes,
                "prefill_workers": len(dispatcher.routable("prefill")), "redis": service.registry.connected,
                "block_size": service.config.block_size,
                "refused_workers": [{"worker_id": w.worker_id, "pool": w.pool, "block_size": w.block_size,
                                     "reason": f"KV block size {w.block_size}, the router's is "
                                               f"{service.config.block_size}"} for w in dispatcher.refused()]}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "baton", "max_model_len": service.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        service.check_model(body.model)
        prepared = service.prepare(
            new_request_id("cmpl"), request.url.path, service.tokenize(body.prompt), max_tokens=body.max_tokens,
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
            stop=body.stop_strings(), ignore_eos=body.ignore_eos, logprobs=bool(body.logprobs))
        return await _respond(service, request, prepared, chat=False, stream=body.stream,
                              include_usage=body.include_usage)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        service.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prepared = service.prepare(
            new_request_id("chatcmpl"), request.url.path, service.tokenize_chat(messages),
            max_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            seed=body.seed, stop=body.stop_strings(), ignore_eos=body.ignore_eos, logprobs=body.logprobs)
        return await _respond(service, request, prepared, chat=True, stream=body.stream,
                              include_usage=body.include_usage)

    return app


def _logprobs(service: RouterService, delta: TextDelta, chat: bool, offset: int) -> dict | None:
    if not delta.logprobs:
        return None
    tokens = [service.tokenizer.decode([t], skip_special_tokens=False) for t in delta.token_ids[:len(delta.logprobs)]]
    if chat:
        return {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
                            for tok, lp in zip(tokens, delta.logprobs)]}
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": list(delta.logprobs), "top_logprobs": None, "text_offset": offsets}


def _merge_logprobs(parts: list[dict], chat: bool) -> dict | None:
    if not parts:
        return None
    if chat:
        return {"content": [c for p in parts for c in p["content"]]}
    return {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "text_offset")} | {
        "top_logprobs": None}


async def _respond(service: RouterService, request: Request, prepared: Prepared, *, chat: bool, stream: bool,
                   include_usage: bool) -> Response:
    run = _Run(request, service.stream(prepared))
    render = chat_json if chat else completion_json
    model, rid = service.model_name, prepared.request_id
    try:
        # Wait for the first delta before answering, so "no worker" is a real 503, not an SSE event.
        first = await run.next()
    except ClientGone:
        run.close()
        return Response(status_code=499)
    except APIError:
        run.close()
        raise
    if not stream:
        try:
            deltas, delta = [first], first
            while delta is not None and delta.finish_reason is None:
                delta = await run.next()
                deltas.append(delta)
        except ClientGone:
            return Response(status_code=499)
        finally:
            run.close()
        deltas = [d for d in deltas if d is not None]
        last = deltas[-1]
        offset, parts = 0, []
        for d in deltas:
            lp = _logprobs(service, d, chat, offset)
            if lp:
                parts.append(lp)
            offset += len(d.text)
        usage = usage_json(last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_prompt_tokens)
        text = "".join(d.text for d in deltas)
        return JSONResponse(render(rid, model, text, last.finish_reason, _merge_logprobs(parts, chat), usage,
                                   chunk=False))

    async def events() -> AsyncIterator[str]:
        delta, offset, is_first = first, 0, True
        try:
            while delta is not None:
                if chat and is_first:
                    yield _sse(chat_json(rid, model, "", None, None, None, chunk=True, first=True))
                    is_first = False
                if delta.text or delta.finish_reason or delta.logprobs:
                    lp = _logprobs(service, delta, chat, offset)
                    yield _sse(render(rid, model, delta.text, delta.finish_reason, lp, None, chunk=True))
                    offset += len(delta.text)
                if delta.finish_reason is not None:
                    if include_usage:
                        u = delta.usage
                        usage = usage_json(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
                        yield _sse(usage_chunk_json(rid, model, usage, chat=chat))
                    break
                delta = await run.next()
            yield "data: [DONE]\n\n"
        except APIError as exc:
            # Headers are out already: the failure becomes an error event the client raises on.
            yield _sse(exc.body())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        finally:
            run.close()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
