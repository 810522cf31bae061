"""gRPC front of the router: the public `baton.v1.Inference` service over the same core as HTTP. With an API
key, Generate and Models need `authorization: Bearer <key>` metadata."""
from __future__ import annotations

import hmac

import grpc

from baton.proto.finish_reason import finish_reason_to_wire
from baton.proto.v1 import inference_pb2, inference_pb2_grpc
from baton.router.dispatch import new_request_id
from baton.router.openai_protocol import APIError
from baton.router.service import RouterService

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
ROUTE = "grpc"


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, service: RouterService) -> None:
        self._service = service

    async def _abort(self, context: grpc.aio.ServicerContext, exc: APIError) -> None:
        self._service.metrics.request_done(ROUTE, exc.status)
        await context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        key = self._service.config.api_key_value
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'authorization: Bearer <key>' metadata")

    def _prepare(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        service = self._service
        self._authorize(context)
        service.check_model(request.model)
        which = request.WhichOneof("input")
        if which == "text":
            prompt_ids = service.tokenize(request.text)
        elif which == "token_ids":
            prompt_ids = service.tokenize(list(request.token_ids.ids))
        elif which == "chat":
            if not request.chat.messages:
                raise APIError(400, "chat.messages must not be empty", param="chat")
            prompt_ids = service.tokenize_chat([{"role": m.role, "content": m.content}
                                                for m in request.chat.messages])
        else:
            raise APIError(400, "one of text, token_ids or chat is required", param="input")
        s = request.sampling
        if s.temperature < 0 or not 0 <= s.top_p <= 1:
            raise APIError(400, "temperature must be >= 0 and top_p in [0, 1]", param="sampling")
        # Fields are taken as sent (proto3 cannot tell an unset 0 from a chosen one): max_tokens 0 means
        # what the context leaves, top_p 0 and repetition_penalty 0 mean off.
        return service.prepare(request.request_id or new_request_id("grpc"), ROUTE, prompt_ids, s)

    async def Generate(self, request, context):
        try:
            prepared = self._prepare(request, context)
        except APIError as exc:
            await self._abort(context, exc)
            return
        admission = self._service.admission
        if not admission.enter():
            await self._abort(context, admission.refusal())
            return
        status = 499  # unless it finishes or fails first
        try:
            async for delta in self._service.stream(prepared):
                yield inference_pb2.GenerateResponse(
                    request_id=prepared.request_id, text=delta.text, token_ids=delta.token_ids,
                    logprobs=delta.logprobs, finish_reason=finish_reason_to_wire(delta.finish_reason),
                    usage=delta.usage, top_logprobs=delta.top_logprobs, prompt_logprobs=delta.prompt_logprobs,
                    prompt_top_logprobs=delta.prompt_top_logprobs)
            status = 200
        except APIError as exc:
            status = exc.status
            await context.abort(_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        finally:
            admission.leave()
            self._service.metrics.request_done(ROUTE, status)

    async def Models(self, request, context):
        try:
            self._authorize(context)
        except APIError as exc:
            await self._abort(context, exc)
        return inference_pb2.ModelsResponse(models=[inference_pb2.ModelInfo(
            id=self._service.model_name, max_model_len=self._service.max_model_len, owned_by="baton")])

    async def Health(self, request, context):
        decodes = len(self._service.dispatcher.routable("decode"))
        if not self._service.registry.connected:
            return inference_pb2.HealthResponse(ready=False, detail="Redis (worker registry) unreachable")
        if decodes == 0:
            refused = ", ".join(w.worker_id for w in self._service.dispatcher.refused())
            return inference_pb2.HealthResponse(ready=False, detail="no decode worker registered" + (
                f" with this router's KV block size (refused: {refused})" if refused else ""))
        return inference_pb2.HealthResponse(ready=True)


def add_to_server(service: RouterService, server: grpc.aio.Server) -> None:
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(service), server)
