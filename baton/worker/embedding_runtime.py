"""What an embedding worker process runs: the embedding model, the dynamic batcher in front of it, its live load
for the registry, its signals and metrics, and the /health, /ready, /metrics, /stats HTTP probes."""
from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from baton.contracts.worker_registry import WorkerLoad
from baton.engine.config import EngineConfig
from baton.engine.embedding import Embedder
from baton.worker.embedding_batcher import EmbeddingBatcher
from baton.worker.settings import WorkerSettings

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FORWARD_INPUTS = Histogram("baton_worker_embedding_forward_inputs", "Inputs packed into one embedding forward",
                           buckets=_SIZES)
FORWARD_TOKENS = Histogram("baton_worker_embedding_forward_tokens", "Tokens in one embedding forward",
                           buckets=_SIZES)
FORWARD_SECONDS = Histogram("baton_worker_embedding_forward_seconds", "Time of one embedding forward")
QUEUE_SECONDS = Histogram("baton_worker_embedding_queue_time_seconds",
                          "Time from a request's arrival until its first input entered a forward")
INPUTS = Counter("baton_worker_embedding_inputs_total", "Inputs embedded")


class EmbeddingRuntime:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        s = settings
        self.embedder = Embedder(EngineConfig(
            model_dir=str(s.model_dir), device=s.device, dtype=s.dtype, max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens, show_progress=True))
        self.batcher: EmbeddingBatcher | None = None
        self.block_size = s.block_size
        self.ready = False
        self.draining = False
        self._signals = None  # the SignalPublisher, once publish_signals runs

    def _on_forward(self, inputs: int, tokens: int, seconds: float) -> None:
        FORWARD_INPUTS.observe(inputs)
        FORWARD_TOKENS.observe(tokens)
        FORWARD_SECONDS.observe(seconds)
        INPUTS.inc(inputs)

    def start(self) -> None:
        s = self.settings
        # An input longer than the budget still runs (alone), so the budget never refuses what the model takes.
        self.batcher = EmbeddingBatcher(lambda inputs: self.embedder.embed(inputs).numpy(),
                                        max_batch_tokens=s.max_num_batched_tokens, max_batch_inputs=s.max_num_seqs,
                                        max_batch_delay_s=s.max_batch_delay_ms / 1000, dynamic=s.dynamic_batching)
        self.batcher.on_forward = self._on_forward
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def embed(self, inputs: list[list[int]]):
        """(vectors, queue seconds); raises InvalidRequestError for an input the model cannot take."""
        self.embedder.check(inputs)
        # Counted on arrival: the control plane sizes the pool by what comes in, not by what a full pool serves.
        if self._signals is not None:
            self._signals.record_request(sum(len(x) for x in inputs), inputs=len(inputs))
        vectors, queued = await self.batcher.embed(inputs)
        QUEUE_SECONDS.observe(queued)
        if self._signals is not None:
            self._signals.record_queue_time(queued)
        return vectors, queued

    @property
    def alive(self) -> bool:
        return self.batcher is not None and self.batcher.alive

    def fill_signals(self, publisher) -> None:
        # Requests, as the generation pools count their queues; the planner converts with inputs per request.
        self._signals = publisher
        publisher.set_queue_depth(self.batcher.stats().waiting_requests)

    def load(self) -> WorkerLoad:
        b = self.batcher.stats()
        return WorkerLoad(num_requests_running=b.waiting_requests, num_requests_waiting=b.waiting_inputs,
                          queued_prefill_tokens=b.waiting_tokens)

    def health(self) -> tuple[bool, str]:
        if not self.alive:
            return False, "embedding batcher is not running"
        if self.draining:
            return False, "draining"
        return self.ready, "" if self.ready else "starting"

    def http_app(self) -> FastAPI:
        app = FastAPI(title="baton embed worker", docs_url=None, redoc_url=None)

        @app.get("/health")
        def health():
            return JSONResponse({"status": "ok" if self.alive else "dead"}, status_code=200 if self.alive else 503)

        @app.get("/ready")
        def ready():
            ok, detail = self.health()
            return JSONResponse({"ready": ok, "detail": detail}, status_code=200 if ok else 503)

        @app.get("/metrics")
        def metrics():
            return PlainTextResponse(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

        @app.get("/stats")
        def stats():
            b = self.batcher.stats()
            return {"worker_id": self.settings.worker_id, "pool": "embed", "pid": os.getpid(),
                    "forwards": b.forwards, "inputs": b.inputs, "tokens": b.tokens,
                    "waiting_requests": b.waiting_requests, "waiting_inputs": b.waiting_inputs,
                    "dynamic_batching": self.batcher.dynamic}

        return app
