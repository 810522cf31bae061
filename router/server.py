"""Assembles one router process: worker registry, core service, HTTP (uvicorn) and gRPC servers on one loop."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

import grpc
import uvicorn
from redis.exceptions import RedisError

from baton.contracts.worker_registry import WorkerRegistry
from baton.embedded_uvicorn import EmbeddedUvicorn
from baton.redis_loops import stop_task
from baton.router import grpc_server
from baton.router.config import RouterConfig
from baton.router.http_server import create_app
from baton.router.kv_event_consumer import KVEventConsumer
from baton.router.metrics import RouterMetrics
from baton.router.prefix_index import PrefixIndex
from baton.router.service import RouterService
from baton.router.traffic import Traffic

log = logging.getLogger(__name__)


class Router:
    def __init__(self, config: RouterConfig, tokenizer=None) -> None:
        if tokenizer is None:
            from baton.engine.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(config.model_dir, chat_template=config.chat_template_text())
        self.config = config
        self.metrics = RouterMetrics(config.model_name)
        self.registry = WorkerRegistry(config.redis_url, model=config.model_name,
                                       poll_interval_s=config.registry_poll_interval_s)
        self.index = PrefixIndex()
        self.kv_events = KVEventConsumer(config.redis_url, self.index)
        self.registry.add_listener(self.kv_events)
        self.metrics.prefix_index_blocks.set_function(lambda: self.index.num_entries)
        self.metrics.kv_events_lag.set_function(lambda: self.kv_events.lag_seconds)
        self.traffic = Traffic(config.redis_url, config.region, config.model_name,
                               source=f"router-{socket.gethostname()}-{os.getpid()}")
        self.service = RouterService(config, tokenizer, self.registry, self.metrics, self.index, self.traffic)
        self._kv_events_task: asyncio.Task | None = None
        self.app = create_app(self.service)
        # Keep idle connections longer than clients' pools do (httpx 5 s, Go 90 s): a server closing one just as a
        # client reuses it fails that request before any byte (seen once in 10k requests of bench/soak.py).
        self._http = EmbeddedUvicorn(uvicorn.Config(self.app, host=config.host, port=config.http_port,
                                                     log_level="warning", lifespan="off", access_log=False,
                                                     timeout_keep_alive=120))
        self._http_task: asyncio.Task | None = None
        self._grpc: grpc.aio.Server | None = None
        self.http_port = config.http_port
        self.grpc_port = config.grpc_port

    async def _start_kv_events(self) -> None:
        # Replay the retained stream before following it live, then drop what belongs to workers
        # that died while no router watched. Retried, so a router started before Redis still gets an index.
        while True:
            try:
                while await self.kv_events.poll(block_ms=None):
                    pass
                self.kv_events.sync_workers(w.worker_id for w in self.registry.workers())
                await self.kv_events.start()
                return
            except (RedisError, OSError) as exc:
                log.warning("KV event stream not readable yet (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def start(self) -> None:
        await self.registry.start()
        self.traffic.start()
        self._kv_events_task = asyncio.create_task(self._start_kv_events(), name="kv-events-start")
        if self.config.grpc_port:
            self._grpc = grpc.aio.server()
            grpc_server.add_to_server(self.service, self._grpc)
            self.grpc_port = self._grpc.add_insecure_port(f"{self.config.host}:{self.config.grpc_port}")
            if self.grpc_port == 0:
                raise OSError(f"cannot bind the gRPC port {self.config.host}:{self.config.grpc_port}")
            await self._grpc.start()
        self._http_task = asyncio.create_task(self._http.serve(), name="router-http")
        while not self._http.started:
            if self._http_task.done():
                # uvicorn reports a bind failure by exiting (SystemExit); surface it as an OSError.
                exc = self._http_task.exception()
                raise OSError(f"router HTTP server failed to start on {self.config.host}:{self.config.http_port}"
                              f" ({exc!r})")
            await asyncio.sleep(0.01)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]
        log.info("router serving %s: HTTP :%d, gRPC :%s", self.service.model_name, self.http_port,
                 self.grpc_port or "off")

    async def stop(self) -> None:
        self._http.should_exit = True
        if self._http_task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._http_task, timeout=5)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        await self.service.dispatcher.close()
        await stop_task(self._kv_events_task)
        await asyncio.wait({asyncio.create_task(self.kv_events.stop())}, timeout=5.0)
        await self.traffic.stop()
        await self.registry.stop()

    async def serve_forever(self) -> None:
        """Runs until SIGINT/SIGTERM, then shuts down cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
