"""OpenAI-compatible HTTP front of the router (FastAPI): completions, chat, SSE streaming, models, tokenize,
detokenize, version, health, readiness and Prometheus metrics. Errors are always OpenAI-style JSON, never
tracebacks. With an API key, /v1/*, /tokenize and /detokenize need `Authorization: Bearer <key>`; the probes,
/metrics and /version stay open."""
from __future__ import annotations

import hmac
import importlib.metadata
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton.router.dispatch import new_request_id
from baton.router.embeddings import add_embedding_routes
from baton.router.limits import RequestLimits
from baton.router.openai_protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FieldError,
    TokenizeRequest,
)
from baton.router.openai_responses import Rendering, fan_out, respond
from baton.router.service import RouterService
from baton.router.tool_calls import special_marker_ids
from baton.router.tool_parsers import PARSERS

log = logging.getLogger(__name__)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


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
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        return str(cause), cause.param
    if first.get("type") == "extra_forbidden":
        return f"'{param}' is not supported by this server", param
    if param is None:
        return f"Invalid request body: {msg}", None
    return f"Invalid value for '{param}': {msg}", param


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "list", "dict", "none"})


def create_app(service: RouterService) -> FastAPI:
    metrics = service.metrics
    api_key = service.config.api_key_value

    def authorize(request: Request) -> None:
        # A dependency, not a middleware: it runs before the body is parsed and leaves streaming untouched.
        if api_key and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                               f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    app = FastAPI(title="Baton router", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestLimits, max_body_bytes=service.config.max_body_bytes, admission=service.admission,
                       metrics=metrics)
    guarded = [Depends(authorize)]

    def rejected(request: Request, status: int) -> None:
        metrics.request_done(request.url.path, status)

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
        decodes, embeds = len(dispatcher.routable("decode")), len(dispatcher.routable("embed"))
        body = {"ready": (decodes > 0 or embeds > 0) and service.registry.connected, "decode_workers": decodes,
                "prefill_workers": len(dispatcher.routable("prefill")), "embed_workers": embeds,
                "redis": service.registry.connected,
                "block_size": service.config.block_size,
                "refused_workers": [{"worker_id": w.worker_id, "pool": w.pool, "block_size": w.block_size,
                                     "reason": f"KV block size {w.block_size}, the router's is "
                                               f"{service.config.block_size}"} for w in dispatcher.refused()]}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": importlib.metadata.version("baton")}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "baton", "max_model_len": service.max_model_len}]}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest) -> dict:
        if body.model is not None:
            service.check_model(body.model)
        if body.messages is not None:
            ids = service.tokenize_chat([m.template_dict() for m in body.messages], body.add_generation_prompt,
                                        **body.chat_template_kwargs)
        else:
            ids = service.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
        out = {"count": len(ids), "max_model_len": service.max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [service.tokenizer.id_to_token(t) for t in ids]
        return out

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest) -> dict:
        if body.model is not None:
            service.check_model(body.model)
        service.tokenize(body.tokens)  # the vocabulary check, as a 400 naming the ids
        return {"prompt": service.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        service.check_model(body.model)
        prompts = []
        for prompt in body.prompts():
            ids = service.tokenize(prompt)
            echo = (prompt if isinstance(prompt, str) else service.tokenizer.decode(ids)) if body.echo else None
            prompts.append((ids, echo))
        rid = new_request_id("cmpl")
        choices = fan_out(service, rid, request.url.path, prompts, body.wire_sampling(service.defaults),
                          body.num_samples)
        how = Rendering(chat=False, stream=body.stream, include_usage=body.include_usage,
                        logprobs=body.logprobs is not None, top=body.logprobs or 0, n=body.n)
        return await respond(service, request, rid, choices, how)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        service.check_model(body.model)
        messages, tools, parser = body.template_messages(), None, PARSERS[service.config.tool_call_parser]
        if body.tool_use is not None:
            messages, tools = body.tool_use.prompt(messages, service.tokenizer, parser)
        ids = service.tokenize_chat(messages, body.add_generation_prompt, tools=tools, **body.chat_template_kwargs)
        sampling = body.wire_sampling(service.defaults)
        if body.tool_use is not None:
            sampling.kept_special_token_ids.extend(special_marker_ids(service.tokenizer, parser))
        rid = new_request_id("chatcmpl")
        choices = fan_out(service, rid, request.url.path, [(ids, None)], sampling, body.n)
        how = Rendering(chat=True, stream=body.stream, include_usage=body.include_usage, logprobs=body.logprobs,
                        top=body.top_logprobs, n=body.n,
                        tools=body.tool_use.output(parser) if body.tool_use is not None else None)
        return await respond(service, request, rid, choices, how)

    add_embedding_routes(app, service, guarded)
    return app
