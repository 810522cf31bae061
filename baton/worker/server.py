"""Process plumbing shared by prefill and decode workers: engine thread, KV transport, gRPC + HTTP servers,
Redis registration with live load, KV events, metrics, graceful drain on SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from typing import Callable

import grpc
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from baton.contracts.kv_events import KVEventPublisher
from baton.contracts.worker_registry import WorkerLoad, WorkerRecord, WorkerRegistration
from baton.embedded_uvicorn import EmbeddedUvicorn
from baton.engine.async_engine import AsyncEngine
from baton.engine.kv_transfer.base import KVTransport
from baton.engine.kv_transfer.registry import create_transport
from baton.engine.llm_engine import LLMEngine
from baton.proto.v1 import inference_pb2, worker_pb2
from baton.redis_loops import every
from baton.worker.metrics import EngineCollector
from baton.worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Everything a worker's gRPC servicer needs; built once per process."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.engine = LLMEngine(settings.engine_config())
        # The publisher's thread may ask for a snapshot at once, so it starts after the engine exists.
        self.events = KVEventPublisher(settings.redis_url, settings.worker_id,
                                       snapshot_source=self.engine.block_manager.cached_hashes)
        self.engine.block_manager.events = self.events
        self.aengine = AsyncEngine(self.engine)
        # In order of preference. ipc registers first: on the CPU it moves the pool into shared memory, where
        # the others (nixl registers addresses) must then find it. tcp listens where the worker does.
        self.transports: list[KVTransport] = []
        for name in sorted(settings.kv_transports, key=lambda n: n != "ipc"):
            options = {"host": settings.host, "advertise_host": settings.public_host} if name == "tcp" else {}
            transport = create_transport(name, **options)
            transport.register_cache(self.engine.kv_cache, self.engine.kv_scales_for_transfer())
            self.transports.append(transport)
        self.transports.sort(key=lambda t: settings.kv_transports.index(t.name))
        self.block_size = settings.block_size
        self.ready = False
        self.draining = False
        self.metrics = EngineCollector(self)
        REGISTRY.register(self.metrics)  # beside the process's KV-transfer metrics

    def start(self) -> None:
        self.aengine.start()

    async def stop(self) -> None:
        self.aengine.stop()
        self.events.close()
        for transport in self.transports:
            transport.close()

    def fill_signals(self, publisher) -> None:
        stats = self.engine.stats()
        publisher.set_queue_depth(stats.waiting)
        publisher.set_kv_utilization(stats.blocks.usage)

    def load(self) -> WorkerLoad:
        s = self.engine.stats()
        return WorkerLoad(num_requests_running=s.running + s.prefilled + s.pending_remote,
                          num_requests_waiting=s.waiting, kv_blocks_used=s.blocks.in_use,
                          kv_blocks_total=s.blocks.total, queued_prefill_tokens=s.queued_prefill_tokens)

    def worker_stats(self) -> worker_pb2.WorkerStats:
        s = self.engine.stats()
        return worker_pb2.WorkerStats(
            worker_id=self.settings.worker_id, pool=self.settings.pool,
            num_requests_running=s.running + s.prefilled + s.pending_remote, num_requests_waiting=s.waiting,
            kv_blocks_total=s.blocks.total, kv_blocks_free=s.blocks.free, kv_blocks_used=s.blocks.in_use,
            kv_blocks_cached=s.blocks.cached, block_size=self.block_size,
            prompt_tokens_computed_total=s.prefill_tokens_computed,
            prompt_tokens_cached_total=s.prefill_tokens_cached, generation_tokens_total=s.generated_tokens)

    def health(self) -> inference_pb2.HealthResponse:
        if not self.aengine.alive:
            return inference_pb2.HealthResponse(ready=False, detail="engine thread is not running")
        if self.draining:
            return inference_pb2.HealthResponse(ready=False, detail="draining")
        return inference_pb2.HealthResponse(ready=self.ready, detail="" if self.ready else "starting")

    def http_app(self) -> FastAPI:
        app = FastAPI(title=f"baton {self.settings.pool} worker", docs_url=None, redoc_url=None)

        @app.get("/health")
        def health():
            alive = self.aengine.alive
            return JSONResponse({"status": "ok" if alive else "dead"}, status_code=200 if alive else 503)

        @app.get("/ready")
        def ready():
            h = self.health()
            return JSONResponse({"ready": h.ready, "detail": h.detail}, status_code=200 if h.ready else 503)

        @app.get("/metrics")
        def metrics():
            return PlainTextResponse(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

        @app.get("/stats")
        def stats():
            from google.protobuf.json_format import MessageToDict

            doc = MessageToDict(self.worker_stats(), preserving_proto_field_name=True,
                                always_print_fields_with_no_presence=True)
            return {**doc, "pid": os.getpid()}

        return app


class WorkerRPCs:
    """Abort, Stats and Health: the same on the PrefillWorker and DecodeWorker services."""

    rt: WorkerRuntime

    async def Abort(self, request, context):
        found = await self.rt.aengine.call(lambda e: e.abort(request.request_id))
        return worker_pb2.AbortResponse(found=found)

    async def Stats(self, request, context):
        return self.rt.worker_stats()

    async def Health(self, request, context):
        return self.rt.health()


async def publish_signals(runtime, interval_s: float = 2.0) -> None:
    """What `runtime.fill_signals` sets (queue depth, KV utilisation) for the control plane; routers publish rates
    and latencies."""
    import redis.asyncio as aioredis

    from baton.contracts.signals import SignalPublisher

    s = runtime.settings
    client = aioredis.Redis.from_url(s.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    publisher = SignalPublisher(client, region=s.region, pool=s.pool, model=s.served_model_name,
                                source=s.worker_id)

    async def publish() -> None:
        runtime.fill_signals(publisher)
        await publisher.flush()

    try:
        await every(interval_s, publish, "publishing signals")
    finally:
        await client.aclose()


async def serve(settings: WorkerSettings, add_servicer: Callable[[grpc.aio.Server, WorkerRuntime], None]) -> None:
    """Runs a worker until SIGINT/SIGTERM, then stops taking requests, drains in-flight ones and exits."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.pool == "embed":
        from baton.worker.embedding_runtime import EmbeddingRuntime as make_runtime
    else:
        make_runtime = WorkerRuntime
    runtime = await asyncio.to_thread(make_runtime, settings)
    runtime.start()
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", 64 << 20)])
    add_servicer(server, runtime)
    grpc_port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    await server.start()
    http = EmbeddedUvicorn(uvicorn.Config(runtime.http_app(), host=settings.host, port=settings.http_port,
                                          log_level="warning", lifespan="off"))
    http_task = asyncio.create_task(http.serve())
    while not http.started:
        if http_task.done():
            await http_task
            raise RuntimeError(f"HTTP server failed to start on port {settings.http_port}")
        await asyncio.sleep(0.02)
    http_port = http.servers[0].sockets[0].getsockname()[1]
    record = WorkerRecord(
        worker_id=settings.worker_id, pool=settings.pool, grpc_address=f"{settings.public_host}:{grpc_port}",
        model=settings.served_model_name, region=settings.region,
        http_address=f"{settings.public_host}:{http_port}", capacity=settings.max_num_seqs,
        block_size=settings.block_size, host=socket.gethostname(), pid=os.getpid())
    registration = WorkerRegistration(settings.redis_url, record, runtime.load)
    await registration.start()
    runtime.ready = True
    log.info("worker ready", extra={"worker_id": settings.worker_id, "pool": settings.pool,
                                    "grpc": record.grpc_address, "http": record.http_address})
    print(f"[baton] {settings.pool} worker {settings.worker_id} ready: grpc={record.grpc_address} "
          f"http={record.http_address}", flush=True)

    signals = asyncio.create_task(publish_signals(runtime))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Drain: leave the registry first so routers stop sending, then let in-flight requests finish.
    runtime.draining = True
    signals.cancel()
    await registration.stop()
    await server.stop(grace=settings.drain_timeout_s)
    http.should_exit = True
    await http_task
    await runtime.stop()
