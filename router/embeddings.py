"""`POST /v1/embeddings` (OpenAI shape): validate the inputs, tokenize text off the event loop, send the token ids
to the least-loaded embedding worker (pool "embed", which batches them with other requests' inputs), then
truncate (`dimensions`), encode (float / base64) and count (`usage`)."""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, Literal

import grpc
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import Field

from baton.contracts.worker_registry import EMBED_POOL, WorkerRecord
from baton.engine.embedding_config import EmbeddingSpec
from baton.engine.errors import ModelFilesError
from baton.proto.v1 import worker_pb2, worker_pb2_grpc
from baton.router.dispatch import new_request_id
from baton.router.openai_protocol import APIError, _Request
from baton.router.service import RouterService

log = logging.getLogger(__name__)
ROUTE = "/v1/embeddings"
# Texts per tokenizer call: the GIL-holding part of a call (building the id lists) stays short.
TOKENIZE_CHUNK = 512
_INPUT_SHAPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


class EmbeddingRequest(_Request):
    model: str
    input: Any  # checked by `parse_inputs`, whose messages name the offending item
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_inputs(raw: Any, max_inputs: int) -> list[str | list[int]]:
    """The request's inputs as texts or token-id lists; APIError (400) naming the first bad one."""
    if isinstance(raw, str):
        items: list = [raw]
    elif isinstance(raw, list) and raw and all(_is_id(x) for x in raw):
        items = [raw]
    elif isinstance(raw, list):
        items = raw
    else:
        raise APIError(400, f"'input' must be {_INPUT_SHAPES}; got {type(raw).__name__}", param="input")
    if not items:
        raise APIError(400, "'input' must not be empty", param="input")
    if len(items) > max_inputs:
        raise APIError(400, f"'input' has {len(items)} items; this server takes at most {max_inputs} per request "
                            f"(max_embedding_inputs)", param="input", code="too_many_inputs")
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"input[{i}] is an empty string", param="input")
        elif isinstance(item, list):
            if not item:
                raise APIError(400, f"input[{i}] is an empty list of token ids", param="input")
            bad = next((x for x in item if not _is_id(x)), None)
            if bad is not None:
                raise APIError(400, f"input[{i}] must hold token ids (integers); got {bad!r}", param="input")
        else:
            raise APIError(400, f"input[{i}] must be a string or a list of token ids; got {type(item).__name__} "
                                f"('input' must be {_INPUT_SHAPES})", param="input")
    return items


class Embeddings:
    """The endpoint's state: the model's embedding spec and the inputs in flight on each embed worker (channels
    are the dispatcher's, which retires those of workers that leave)."""

    def __init__(self, service: RouterService) -> None:
        self.service = service
        self._spec: EmbeddingSpec | None = None
        self._inflight: dict[str, int] = {}

    @property
    def spec(self) -> EmbeddingSpec:
        if self._spec is None:
            try:
                self._spec = EmbeddingSpec.from_dir(self.service.config.model_dir)
            except ModelFilesError as exc:
                raise APIError(500, f"this model cannot embed: {exc}", type="server_error") from None
        return self._spec

    async def tokenize(self, items: list[str | list[int]]) -> list[list[int]]:
        """Token ids of every input. Texts are encoded by the tokenizers batch API on a thread, TOKENIZE_CHUNK at a
        time, so the event loop keeps serving other requests meanwhile (bench/embeddings.py measures this against
        a process pool)."""
        texts = [(i, self.spec.prefix + x) for i, x in enumerate(items) if isinstance(x, str)]
        out: list[list[int]] = [x if isinstance(x, list) else [] for x in items]
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            chunk = texts[start:start + TOKENIZE_CHUNK]
            encoded = await asyncio.to_thread(self.service.tokenizer.encode_batch, [t for _, t in chunk])
            for (i, _), ids in zip(chunk, encoded):
                out[i] = ids
        limit, vocab = self.service.max_model_len, self.service.vocab_size
        for i, ids in enumerate(out):
            if not ids:
                raise APIError(400, f"input[{i}] is empty after tokenization", param="input")
            if len(ids) > limit:
                raise APIError(400, f"input[{i}] has {len(ids)} tokens; this model's maximum input length is {limit} "
                                    f"tokens (max_model_len)", param="input", code="context_length_exceeded")
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"input[{i}]: token id {bad} is outside the vocabulary [0, {vocab})",
                               param="input")
        return out

    def _pick(self, excluded: set[str]) -> WorkerRecord:
        workers = [w for w in self.service.dispatcher.routable(EMBED_POOL) if w.worker_id not in excluded]
        if not workers:
            raise APIError(503, "no embedding worker is available (start one with `baton embed-worker` or "
                                "`baton up --embed N`)", type="service_unavailable",
                           code="no_worker_available")
        # Inputs this router has in flight there, plus the queue the worker last reported.
        return min(workers, key=lambda w: (self._inflight.get(w.worker_id, 0) + w.load.num_requests_waiting,
                                           w.worker_id))

    async def embed(self, request_id: str, inputs: list[list[int]]) -> worker_pb2.EmbedResponse:
        message = worker_pb2.EmbedRequest(request_id=request_id,
                                          inputs=[worker_pb2.EmbedInput(token_ids=ids) for ids in inputs])
        excluded: set[str] = set()
        last = "no attempt made"
        for _ in range(self.service.config.max_attempts):
            try:
                worker = self._pick(excluded)
            except APIError:
                if not excluded:
                    raise
                break
            stub = worker_pb2_grpc.EmbedWorkerStub(self.service.dispatcher.channel(worker.grpc_address))
            self._inflight[worker.worker_id] = self._inflight.get(worker.worker_id, 0) + len(inputs)
            try:
                return await stub.Embed(message, timeout=self.service.config.request_timeout_s)
            except grpc.aio.AioRpcError as exc:
                last = f"embed worker {worker.worker_id}: {exc.code().name}: {exc.details()}"
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise APIError(400, exc.details() or "invalid input", param="input") from None
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise APIError(500, last, type="server_error", code="worker_failed") from None
                excluded.add(worker.worker_id)
                log.warning("request %s: %s; retrying", request_id, last)
            finally:
                self._inflight[worker.worker_id] -= len(inputs)
        raise APIError(503, f"embedding failed on every worker tried; last error: {last}",
                       type="service_unavailable", code="no_worker_available")

    def render(self, response: worker_pb2.EmbedResponse, n: int, dimensions: int | None, fmt: str) -> dict:
        vectors = np.frombuffer(response.vectors, dtype="<f4").reshape(n, response.dimensions)
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
            if self.spec.normalize:  # Matryoshka: a truncated unit vector is renormalised
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if fmt == "base64":
            data = [base64.b64encode(v.tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        tokens = int(response.prompt_tokens)
        return {"object": "list", "model": self.service.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def add_embedding_routes(app: FastAPI, service: RouterService, dependencies: list) -> None:
    embeddings = Embeddings(service)

    @app.post(ROUTE, dependencies=dependencies)
    async def create_embeddings(body: EmbeddingRequest, request: Request) -> Response:
        service.check_model(body.model)
        if body.dimensions is not None:
            why = embeddings.spec.check_dimensions(body.dimensions)
            if why is not None:
                raise APIError(400, why, param="dimensions")
        items = parse_inputs(body.input, service.config.max_embedding_inputs)
        inputs = await embeddings.tokenize(items)
        response = await embeddings.embed(new_request_id("embd"), inputs)
        out = embeddings.render(response, len(inputs), body.dimensions, body.encoding_format)
        service.metrics.request_done(ROUTE, 200)
        return Response(json.dumps(out, separators=(",", ":")), media_type="application/json")
