"""Sends one request to the workers: pick a decode worker (and maybe a prefill worker), stream
DecodeWorker.Generate, retry on another worker before the first token, migrate the request to another decode
worker after it, abort on cancel."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

import grpc

from baton.contracts.block_hash import hash_blocks
from baton.contracts.worker_registry import WorkerRecord, WorkerRegistry
from baton.grpc_channels import ChannelCache, abort
from baton.proto.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from baton.router.config import RouterConfig
from baton.router.inflight import InFlight
from baton.router.metrics import RouterMetrics
from baton.router.prefix_index import PrefixIndex
from baton.router.selection import (
    ConditionalDisaggregation,
    NoWorkerAvailable,
    Route,
    RoutingRequest,
    WorkerState,
    make_policy,
    select_route,
)
from baton.router.traffic import Traffic

log = logging.getLogger(__name__)
DecodeError = worker_pb2.DecodeError
_PREFILL_KINDS = (DecodeError.KIND_PREFILL_FAILED, DecodeError.KIND_KV_TRANSFER_FAILED)
# Connection-level failures: the worker never took the request, so another one may.
_RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE,)
# A stream that broke after tokens came (the worker died or dropped the connection): migrate the request. Not
# DEADLINE_EXCEEDED: the request's own time is up.
_BROKEN_STREAM_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.UNKNOWN)


class OutOfCapacity(Exception):
    """Every decode worker tried refused the request for lack of free KV blocks before its first token: the
    cluster is full, not broken, so the client may come back later."""


class WorkerFailed(Exception):
    """The request failed on a worker after its retries or migrations (or for a reason no other worker changes)."""

    def __init__(self, message: str, *, invalid_request: bool = False) -> None:
        super().__init__(message)
        self.invalid_request = invalid_request


def worker_state(record: WorkerRecord, healthy: bool = True) -> WorkerState:
    load = record.load
    return WorkerState(worker_id=record.worker_id, pool=record.pool, address=record.grpc_address,
                       region=record.region, capacity=record.capacity,
                       queued_prefill_tokens=load.queued_prefill_tokens, running_requests=load.num_requests_running,
                       active_kv_blocks=load.kv_blocks_used, total_kv_blocks=load.kv_blocks_total, healthy=healthy)


class Dispatcher:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, metrics: RouterMetrics,
                 index: PrefixIndex | None = None, traffic: Traffic | None = None) -> None:
        self._config = config
        self._registry = registry
        self._metrics = metrics
        routing = config.routing()
        self._policy = make_policy(routing, index, timing=self._time_step)
        self._decider = ConditionalDisaggregation(routing.local_prefill_threshold_tokens)
        self.inflight = InFlight()
        self.traffic = traffic
        self._channels = ChannelCache()
        self._suspect_until: dict[str, float] = {}
        self._background: set[asyncio.Task] = set()
        self._retiring: dict[asyncio.Task, grpc.aio.Channel] = {}
        registry.add_listener(self)

    def _time_step(self, step: str, seconds: float) -> None:
        self._metrics.decision_latency.labels(step).observe(seconds)

    # -- worker choice ----------------------------------------------------------------------
    def route(self, request: RoutingRequest, excluded_decode: set[str], excluded_prefill: set[str]) -> Route:
        """Decode worker first, then whether (and where) to prefill remotely. Raises NoWorkerAvailable."""
        now = time.monotonic()
        excluded = {"decode": excluded_decode, "prefill": excluded_prefill}
        # A worker that refused a connection stays in Redis until its TTL runs out; skip it until then.
        workers = [self.inflight.adjust(worker_state(w, healthy=self._suspect_until.get(w.worker_id, 0.0) <= now))
                   for w in self._in_region(self.routable())
                   if w.pool in excluded and w.worker_id not in excluded[w.pool]]  # embed workers never generate
        route = select_route(self._policy, self._decider, request, workers)
        for selection in (route.decode, route.prefill):
            if selection is not None:
                self._metrics.decisions.labels(selection.policy, selection.pool).inc()
        if request.prompt_tokens:
            self._metrics.predicted_hit_ratio.observe(route.decode.predicted_cached_tokens / request.prompt_tokens)
        return route

    def routable(self, pool: str | None = None) -> list[WorkerRecord]:
        """Registered workers this router may route to: those whose KV block size is the router's. With another
        size their block hashes differ from the router's, so no prompt could ever hit their prefix cache."""
        return [w for w in self._registry.workers(pool) if w.block_size == self._config.block_size]

    def refused(self) -> list[WorkerRecord]:
        """Registered workers never routed to, for their block size."""
        return [w for w in self._registry.workers() if w.block_size != self._config.block_size]

    def _in_region(self, workers: list[WorkerRecord]) -> list[WorkerRecord]:
        """Workers of this router's region, or of the region the control plane spills this request to;
        all workers when neither has a decode worker (a single-region deployment never filters)."""
        if self.traffic is None:
            return workers
        for region in dict.fromkeys((self.traffic.target_region(), self.traffic.region)):
            chosen = [w for w in workers if w.region == region]
            if any(w.pool == "decode" for w in chosen):
                return chosen
        return workers

    # -- streaming --------------------------------------------------------------------------
    async def generate(self, request_id: str, token_ids: list[int],
                       sampling: inference_pb2.SamplingParams) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """Yields D's chunks; the last has finish_reason set. A failure before the first token is retried on
        another worker (max_attempts); one after it migrates the request: another decode worker prefills the
        prompt plus the tokens streamed so far and goes on from there (max_migrations). Raises NoWorkerAvailable /
        WorkerFailed, or OutOfCapacity when every decode worker tried refused it for lack of free KV blocks."""
        # Prompt logprobs and the first token's alternatives exist only on the engine that prefills.
        local = sampling.HasField("prompt_logprobs") or sampling.top_logprobs > 0
        excluded_decode: set[str] = set()
        excluded_prefill: set[str] = set()
        full: set[str] = set()  # decode workers that refused for lack of free KV blocks
        generated: list[int] = []  # every token yielded so far, over all attempts
        retries = migrations = 0
        last_error = "no attempt made"
        while True:
            request = self._decode_request(request_id, token_ids, sampling, generated)
            # A resumed request prefills on its new decode worker, where its own output may be a prefix hit.
            tokens = [*token_ids, *generated]
            routing_request = RoutingRequest(tokens, hash_blocks(tokens, self._config.block_size),
                                             self._config.block_size, local_prefill=local or bool(generated))
            try:
                route = self.route(routing_request, excluded_decode, excluded_prefill)
            except NoWorkerAvailable as exc:
                if full and full == excluded_decode and not generated:
                    raise OutOfCapacity(last_error) from None
                if retries == migrations == 0:
                    raise
                raise NoWorkerAvailable(f"{exc} to {'migrate' if generated else 'retry'} on; "
                                        f"last error: {last_error}") from None
            decode = route.decode.worker
            prefill = route.prefill.worker if route.prefill is not None else None
            log.info("request %s -> decode %s, prefill %s (%s; %d of %d tokens cached on decode; %d generated)",
                     request_id, decode.worker_id, prefill.worker_id if prefill else "local",
                     route.decode.policy, route.decode.predicted_cached_tokens, routing_request.prompt_tokens,
                     len(generated),
                     extra={"request_id": request_id, "decode_worker": decode.worker_id,
                            "prefill_worker": prefill.worker_id if prefill else None,
                            "policy": route.decode.policy, "attempt": retries + migrations,
                            "resumed_tokens": len(generated)})
            if prefill is not None:
                request.prefill.CopyFrom(worker_pb2.PrefillTarget(worker_id=prefill.worker_id,
                                                                  grpc_address=prefill.address))
            stub = worker_pb2_grpc.DecodeWorkerStub(self.channel(decode.address))
            call = stub.Generate(request, timeout=self._config.request_timeout_s)
            finished = False
            emitted = False  # on this attempt
            ticket = self.inflight.start(route, routing_request.prompt_tokens)
            try:
                async for chunk in call:
                    if chunk.HasField("error"):
                        err = chunk.error
                        finished = True  # D ended this attempt itself; nothing to abort
                        last_error = f"{DecodeError.Kind.Name(err.kind)} on {decode.worker_id}: {err.message}"
                        invalid = err.kind == DecodeError.KIND_INVALID_REQUEST
                        # After its first token a worker's failure is its own (e.g. its engine died), not the request's.
                        if invalid or not (err.retryable or emitted):
                            raise WorkerFailed(last_error, invalid_request=invalid)
                        if err.kind in _PREFILL_KINDS:
                            excluded_prefill.add(err.prefill_worker_id or (prefill.worker_id if prefill else ""))
                        else:
                            excluded_decode.add(decode.worker_id)
                        if err.kind == DecodeError.KIND_OUT_OF_CAPACITY:
                            full.add(decode.worker_id)
                        break
                    if chunk.token_ids and not emitted:
                        emitted = True
                        self.inflight.prefilled(ticket)
                    if chunk.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED:
                        finished = True
                    generated += chunk.token_ids
                    yield chunk
                    if finished:
                        return
                else:
                    finished = True
                    last_error = f"decode worker {decode.worker_id} ended the stream without finishing"
                    if not emitted and not generated:
                        raise WorkerFailed(last_error)
                    self._suspect(decode.worker_id)
                    excluded_decode.add(decode.worker_id)
            except grpc.aio.AioRpcError as exc:
                finished = True
                last_error = f"decode worker {decode.worker_id}: {exc.code().name}: {exc.details()}"
                if exc.code() not in (_BROKEN_STREAM_CODES if emitted else _RETRYABLE_CODES):
                    raise WorkerFailed(last_error) from None
                self._suspect(decode.worker_id)
                excluded_decode.add(decode.worker_id)
            finally:
                self.inflight.end(ticket)
                if not finished:
                    # Client went away (generator closed or task cancelled): stop D and tell it to abort.
                    call.cancel()
                    self._abort_later(decode, request_id)
            if generated:
                migrations += 1
                if migrations > self._config.max_migrations:
                    raise WorkerFailed(f"request failed after {self._config.max_migrations} migrations; "
                                       f"last error: {last_error}")
                self._metrics.migrations.inc()
                log.warning("request %s: %s; migrating after %d tokens", request_id, last_error, len(generated),
                            extra={"request_id": request_id, "resumed_tokens": len(generated)})
            else:
                retries += 1
                if retries >= self._config.max_attempts and full and full == excluded_decode:
                    raise OutOfCapacity(last_error)
                if retries >= self._config.max_attempts:
                    raise WorkerFailed(f"request failed after {self._config.max_attempts} attempts; "
                                       f"last error: {last_error}")
                log.warning("request %s: %s; retrying", request_id, last_error)

    @staticmethod
    def _decode_request(request_id: str, token_ids: list[int], sampling: inference_pb2.SamplingParams,
                        generated: list[int]) -> worker_pb2.DecodeRequest:
        request = worker_pb2.DecodeRequest(request_id=request_id, token_ids=token_ids, sampling=sampling,
                                           generated_token_ids=generated)
        if generated:
            # The client has the prompt's logprobs already (they came with the first token).
            request.sampling.ClearField("prompt_logprobs")
        return request

    def _suspect(self, worker_id: str) -> None:
        self._suspect_until[worker_id] = time.monotonic() + self._config.worker_suspect_s

    def _abort_later(self, worker: WorkerState, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._abort(worker, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, worker: WorkerState, request_id: str) -> None:
        await abort(worker_pb2_grpc.DecodeWorkerStub(self.channel(worker.address)), request_id, worker.worker_id)

    # -- channels ---------------------------------------------------------------------------
    def channel(self, address: str) -> grpc.aio.Channel:
        return self._channels.open(address)

    def on_worker_added(self, worker_id: str) -> None:
        self._suspect_until.pop(worker_id, None)
        worker = self._registry.get(worker_id)
        if worker is not None and worker.block_size != self._config.block_size:
            log.warning("refusing %s worker %s: its KV block size is %d tokens, this router's is %d; start both with "
                        "the same --block-size", worker.pool, worker_id, worker.block_size, self._config.block_size,
                        extra={"worker_id": worker_id, "worker_block_size": worker.block_size,
                               "router_block_size": self._config.block_size})

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
