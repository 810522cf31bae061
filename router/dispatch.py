"""Sends one request to the workers: pick a decode worker (and maybe a prefill worker), stream
DecodeWorker.Generate, retry on another worker while no token has been emitted, abort on cancel."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from proto.baton.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.metrics import RouterMetrics
from router.registry import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)
DecodeError = worker_pb2.DecodeError
_PREFILL_KINDS = (DecodeError.KIND_PREFILL_FAILED, DecodeError.KIND_KV_TRANSFER_FAILED)
# Connection-level failures: the worker never took the request, so another one may.
_RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE,)
_ABORT_TIMEOUT_S = 2.0


class NoWorkerAvailable(Exception):
    """No healthy decode worker is registered for the model."""


class WorkerFailed(Exception):
    """The request failed on a worker after retries (or after tokens were already streamed)."""

    def __init__(self, message: str, *, invalid_request: bool = False) -> None:
        super().__init__(message)
        self.invalid_request = invalid_request


@dataclass
class Route:
    decode: WorkerRecord
    prefill: WorkerRecord | None  # None: the decode worker prefills locally


class Dispatcher:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, metrics: RouterMetrics) -> None:
        self._config = config
        self._registry = registry
        self._metrics = metrics
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._suspect_until: dict[str, float] = {}
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}
        self._background: set[asyncio.Task] = set()
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}
        registry.add_listener(self)

    # -- worker choice ----------------------------------------------------------------------
    def _candidates(self, pool: str, excluded: set[str]) -> list[WorkerRecord]:
        now = time.monotonic()
        return [w for w in self._registry.workers(pool)
                if w.worker_id not in excluded and self._suspect_until.get(w.worker_id, 0.0) <= now]

    def _pick(self, pool: str, candidates: list[WorkerRecord]) -> WorkerRecord:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        return ordered[next(self._rr[pool]) % len(ordered)]

    def route(self, token_ids: list[int], excluded_decode: set[str], excluded_prefill: set[str]) -> Route:
        start = time.perf_counter()
        decodes = self._candidates("decode", excluded_decode)
        if not decodes:
            raise NoWorkerAvailable("no decode worker is available for this model")
        decode = self._pick("decode", decodes)
        self._metrics.decisions.labels(self._config.policy, "decode").inc()
        prefill = None
        if len(token_ids) >= self._config.local_prefill_threshold:
            prefills = self._candidates("prefill", excluded_prefill)
            if prefills:
                prefill = self._pick("prefill", prefills)
                self._metrics.decisions.labels(self._config.policy, "prefill").inc()
        self._metrics.decision_latency.observe(time.perf_counter() - start)
        return Route(decode, prefill)

    # -- streaming --------------------------------------------------------------------------
    async def generate(self, request_id: str, token_ids: list[int],
                       sampling: inference_pb2.SamplingParams) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """Yields D's chunks; the last has finish_reason set. Raises NoWorkerAvailable / WorkerFailed."""
        excluded_decode: set[str] = set()
        excluded_prefill: set[str] = set()
        emitted = False
        last_error = "no attempt made"
        for _attempt in range(self._config.max_attempts):
            route = self.route(token_ids, excluded_decode, excluded_prefill)
            request = worker_pb2.DecodeRequest(request_id=request_id, token_ids=token_ids, sampling=sampling,
                                               kv_transport=self._config.kv_transport)
            if route.prefill is not None:
                request.prefill.CopyFrom(worker_pb2.PrefillTarget(worker_id=route.prefill.worker_id,
                                                                  grpc_address=route.prefill.grpc_address))
            stub = worker_pb2_grpc.DecodeWorkerStub(self._channel(route.decode.grpc_address))
            call = stub.Generate(request, timeout=self._config.request_timeout_s)
            finished = False
            try:
                async for chunk in call:
                    if chunk.HasField("error"):
                        err = chunk.error
                        last_error = f"{DecodeError.Kind.Name(err.kind)} on {route.decode.worker_id}: {err.message}"
                        if emitted or not err.retryable:
                            raise WorkerFailed(last_error, invalid_request=err.kind == DecodeError.KIND_INVALID_REQUEST)
                        if err.kind in _PREFILL_KINDS:
                            failed_p = err.prefill_worker_id or (route.prefill.worker_id if route.prefill else "")
                            excluded_prefill.add(failed_p)
                        else:
                            excluded_decode.add(route.decode.worker_id)
                        log.warning("request %s: %s; retrying", request_id, last_error)
                        finished = True  # D ended this attempt itself; nothing to abort
                        break
                    emitted = emitted or len(chunk.token_ids) > 0
                    if chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                        finished = True
                    yield chunk
                    if finished:
                        return
                else:
                    finished = True
                    raise WorkerFailed(f"decode worker {route.decode.worker_id} ended the stream without finishing")
            except grpc.aio.AioRpcError as exc:
                finished = True
                last_error = f"decode worker {route.decode.worker_id}: {exc.code().name}: {exc.details()}"
                if emitted or exc.code() not in _RETRYABLE_CODES:
                    raise WorkerFailed(last_error) from None
                self._suspect(route.decode.worker_id)
                excluded_decode.add(route.decode.worker_id)
                log.warning("request %s: %s; retrying", request_id, last_error)
            finally:
                if not finished:
                    # Client went away (generator closed or task cancelled): stop D and tell it to abort.
                    call.cancel()
                    self._abort_later(route.decode, request_id)
        raise WorkerFailed(f"request failed after {self._config.max_attempts} attempts; last error: {last_error}")

    def _suspect(self, worker_id: str) -> None:
        self._suspect_until[worker_id] = time.monotonic() + self._config.worker_suspect_s

    def _abort_later(self, worker: WorkerRecord, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._abort(worker, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, worker: WorkerRecord, request_id: str) -> None:
        stub = worker_pb2_grpc.DecodeWorkerStub(self._channel(worker.grpc_address))
        try:
            await stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=_ABORT_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.info("abort of %s on %s failed: %s", request_id, worker.worker_id, exc.code().name)

    # -- channels ---------------------------------------------------------------------------
    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
        return channel

    def on_worker_removed(self, worker_id: str) -> None:
        self._suspect_until.pop(worker_id, None)
        live = {w.grpc_address for w in self._registry.workers()}
        for address in [a for a in self._channels if a not in live]:
            # A draining worker deregisters before its last streams end: let them finish first.
            channel = self._channels.pop(address)
            task = asyncio.get_running_loop().create_task(channel.close(grace=self._config.request_timeout_s))
            self._retiring[task] = channel
            task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        channels = [*self._channels.values(), *self._retiring.values()]
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for channel in channels:
            await channel.close()
        self._channels.clear()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
