"""EmbedWorker gRPC service: token-id inputs in, one pooled vector per input out, through the dynamic batcher."""
from __future__ import annotations

import logging
import time

import grpc

from baton.engine.errors import InvalidRequestError
from baton.proto.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from baton.worker.embedding_runtime import EmbeddingRuntime

log = logging.getLogger(__name__)


class EmbedService(worker_pb2_grpc.EmbedWorkerServicer):
    def __init__(self, runtime: EmbeddingRuntime) -> None:
        self.rt = runtime

    async def Embed(self, request: worker_pb2.EmbedRequest, context: grpc.aio.ServicerContext):
        inputs = [list(x.token_ids) for x in request.inputs]
        if not inputs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no inputs")
        started = time.perf_counter()
        try:
            vectors, queued = await self.rt.embed(inputs)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        tokens = sum(len(x) for x in inputs)
        log.debug("request %s: %d inputs, %d tokens, queued %.4f s, done in %.4f s", request.request_id, len(inputs),
                  tokens, queued, time.perf_counter() - started)
        return worker_pb2.EmbedResponse(dimensions=vectors.shape[1], vectors=vectors.astype("<f4").tobytes(),
                                        prompt_tokens=tokens, queue_seconds=queued)

    async def Stats(self, request, context):
        b = self.rt.batcher.stats()
        return worker_pb2.WorkerStats(worker_id=self.rt.settings.worker_id, pool="embed",
                                      num_requests_running=b.waiting_requests, num_requests_waiting=b.waiting_inputs,
                                      block_size=self.rt.block_size, prompt_tokens_computed_total=b.tokens)

    async def Health(self, request, context):
        ready, detail = self.rt.health()
        return inference_pb2.HealthResponse(ready=ready, detail=detail)


def add_service(server: grpc.aio.Server, runtime: EmbeddingRuntime) -> None:
    worker_pb2_grpc.add_EmbedWorkerServicer_to_server(EmbedService(runtime), server)
