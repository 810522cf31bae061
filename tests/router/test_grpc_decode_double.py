"""Test doubles of the real decode and prefill workers (gRPC servers on loopback speaking
worker.proto), plus a `Cluster` that runs a real router against them over real Redis.

The workers themselves are written elsewhere; these doubles stream a fixed token script instead of
running a model, so router behaviour (routing, retries, cancellation, errors) is tested here and
the real end-to-end test comes when the workers land."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from baton.contracts.worker_registry import WorkerRecord, WorkerRegistration
from baton.engine.output_text import TextTracker
from baton.engine.tokenizer import Tokenizer
from baton.proto.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from baton.router.config import RouterConfig
from baton.router.server import Router

pytestmark = pytest.mark.anyio
MODEL = "tiny"
SCRIPT_TEXT = " the quick brown fox jumps over the lazy dog, then naps."
Err = worker_pb2.DecodeError


def make_model_dir(root: Path, max_position: int = 256) -> Path:
    """A model directory with a real trained tokenizer and chat template (no weights: the router needs none)."""
    from baton.devtools.tokenizer_training import write_tokenizer_files

    out = root / MODEL
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_files(out, "llama", 512, False)
    (out / "config.json").write_text(json.dumps({"max_position_embeddings": max_position,
                                                 "eos_token_id": ids["eos_token_id"]}))
    return out


class DecodeDouble(worker_pb2_grpc.DecodeWorkerServicer):
    """Stand-in for the real decode worker: prefills through the named prefill worker (or locally),
    then streams `script` one token per chunk, with its text and stop strings applied by the engine's own
    TextTracker (as the real worker does) when given the model directory. A resumed request (generated_token_ids)
    goes on from where the script had got to. `die_after=n` stops the whole gRPC server after it streamed n
    tokens, like a crashed process."""

    def __init__(self, worker_id: str, script: list[int], *, token_delay_s: float = 0.002,
                 die_after: int | None = None, model_dir: Path | None = None) -> None:
        self.worker_id = worker_id
        self.tokenizer = Tokenizer.from_dir(model_dir) if model_dir is not None else None
        self.script = script
        self.token_delay_s = token_delay_s
        self.die_after = die_after
        self.out_of_capacity = False
        self.requests: list[worker_pb2.DecodeRequest] = []
        self.prefill_calls: list[str] = []  # prefill worker ids called, in order
        self.cancelled: list[str] = []
        self.aborted: list[str] = []
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def _prefill(self, request: worker_pb2.DecodeRequest) -> worker_pb2.PrefillResponse:
        target = request.prefill
        self.prefill_calls.append(target.worker_id)
        async with grpc.aio.insecure_channel(target.grpc_address) as channel:
            kv = worker_pb2.KVDestination(
                version=worker_pb2.KV_HANDOFF_VERSION_2, offers=[worker_pb2.KVOffer(transport="tcp", endpoint=b"double")],
                dst_block_ids=list(range(len(request.token_ids) // 16 + 1)), block_size=16,
                transfer_id=f"{request.request_id}-{len(self.prefill_calls)}", decode_worker_id=self.worker_id)
            return await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(
                worker_pb2.PrefillRequest(request_id=request.request_id, token_ids=request.token_ids,
                                          sampling=request.sampling, kv=kv), timeout=5)

    async def Generate(self, request, context):
        self.requests.append(request)
        if self.out_of_capacity:
            yield worker_pb2.DecodeChunk(error=Err(kind=Err.KIND_OUT_OF_CAPACITY, message="no free blocks",
                                                   retryable=True))
            return
        n = len(request.token_ids)
        stats = worker_pb2.PrefillStats(computed_tokens=n)
        if request.HasField("prefill"):
            try:
                stats = (await self._prefill(request)).stats
            except grpc.aio.AioRpcError as exc:
                yield worker_pb2.DecodeChunk(error=Err(
                    kind=Err.KIND_PREFILL_FAILED, message=f"{exc.code().name}: {exc.details()}",
                    prefill_worker_id=request.prefill.worker_id, retryable=True))
                return
        max_tokens = request.sampling.max_tokens
        done = len(request.generated_token_ids)
        tokens = self.script[done:max_tokens]
        finish = inference_pb2.FINISH_REASON_LENGTH if len(self.script) >= max_tokens else inference_pb2.FINISH_REASON_STOP
        text = None
        if self.tokenizer is not None:
            text = TextTracker(self.tokenizer, list(request.token_ids), list(request.sampling.stop))
            for token in request.generated_token_ids:
                text.push(token)
        try:
            for i, token in enumerate(tokens):
                if self.die_after is not None and i == self.die_after:
                    asyncio.get_running_loop().create_task(self.server.stop(None))
                    await asyncio.sleep(30)
                chunk = worker_pb2.DecodeChunk(token_ids=[token])
                stopped = False
                if text is not None:
                    chunk.text, stopped = text.push(token)
                if request.sampling.logprobs:
                    chunk.logprobs.append(-0.5 * (done + i + 1))
                if i == 0:
                    chunk.prefill.CopyFrom(stats)
                if stopped:
                    finish, tokens = inference_pb2.FINISH_REASON_STOP, tokens[: i + 1]
                if i == len(tokens) - 1:
                    if text is not None:
                        chunk.text += text.flush()
                    chunk.finish_reason = finish
                    chunk.usage.CopyFrom(inference_pb2.Usage(prompt_tokens=n, completion_tokens=done + len(tokens),
                                                              cached_prompt_tokens=stats.cached_tokens))
                yield chunk
                await asyncio.sleep(self.token_delay_s)
        except asyncio.CancelledError:
            self.cancelled.append(request.request_id)
            raise

    async def Abort(self, request, context):
        self.aborted.append(request.request_id)
        return worker_pb2.AbortResponse(found=True)


class PrefillDouble(worker_pb2_grpc.PrefillWorkerServicer):
    """Stand-in for the real prefill worker: checks the hand-off version and answers the first token."""

    def __init__(self, worker_id: str, first_token: int, cached_tokens: int = 0) -> None:
        self.worker_id = worker_id
        self.first_token = first_token
        self.cached_tokens = cached_tokens
        self.requests: list[worker_pb2.PrefillRequest] = []
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()

    async def Prefill(self, request, context):
        if request.kv.version != worker_pb2.KV_HANDOFF_VERSION_2:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown KV hand-off version")
        self.requests.append(request)
        return worker_pb2.PrefillResponse(first_token_id=self.first_token, stats=worker_pb2.PrefillStats(
            computed_tokens=len(request.token_ids) - self.cached_tokens, cached_tokens=self.cached_tokens))


class Cluster:
    """A real Router (HTTP + gRPC on free loopback ports) and worker doubles registered in real Redis.
    `dead_prefills` / `dead_decodes` are registered at addresses where nothing listens, like a worker
    killed after its last heartbeat. `die_after` is every decode double's, or one per double."""

    def __init__(self, redis_url: str, model_dir: Path, script: list[int], *, decodes: int = 1, prefills: int = 1,
                 dead_prefills: int = 0, dead_decodes: int = 0, die_after: int | list[int | None] | None = None,
                 token_delay_s: float = 0.002, **router_overrides) -> None:
        self.redis_url, self.model_dir, self.script = redis_url, model_dir, script
        dies = die_after if isinstance(die_after, list) else [die_after] * decodes
        self.decodes = [DecodeDouble(f"d{i}", script, die_after=dies[i], token_delay_s=token_delay_s,
                                     model_dir=model_dir)
                        for i in range(decodes)]
        self.prefills = [PrefillDouble(f"p{i}", script[0]) for i in range(prefills)]
        self.dead = [("prefill", f"p-dead{i}") for i in range(dead_prefills)] + \
                    [("decode", f"d-dead{i}") for i in range(dead_decodes)]
        self.router_overrides = {"local_prefill_threshold": 0, **router_overrides}
        self.registrations: list[WorkerRegistration] = []

    async def __aenter__(self) -> "Cluster":
        from tests.conftest import free_port

        for worker in [*self.decodes, *self.prefills]:
            await worker.start()
            pool = "decode" if isinstance(worker, DecodeDouble) else "prefill"
            await self._register(worker.worker_id, pool, worker.address)
        for pool, worker_id in self.dead:
            await self._register(worker_id, pool, f"127.0.0.1:{free_port()}")
        config = RouterConfig(model=str(self.model_dir), host="127.0.0.1", http_port=0, grpc_port=free_port(),
                              redis_url=self.redis_url, registry_poll_interval_s=0.05, **self.router_overrides)
        self.router = Router(config)
        await self.router.start()
        self.url = f"http://127.0.0.1:{self.router.http_port}"
        self.grpc_address = f"127.0.0.1:{self.router.grpc_port}"
        return self

    async def _register(self, worker_id: str, pool: str, address: str) -> None:
        reg = WorkerRegistration(self.redis_url, WorkerRecord(worker_id=worker_id, pool=pool, grpc_address=address,
                                                              model=MODEL, capacity=8), interval_s=1.0, ttl_s=10.0)
        await reg.start()
        self.registrations.append(reg)

    async def __aexit__(self, *exc: object) -> None:
        await self.router.stop()
        for reg in self.registrations:
            await reg.stop()
        for worker in [*self.decodes, *self.prefills]:
            await worker.server.stop(None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"))


async def test_decode_double_prefills_through_prefill_double(model_dir: Path) -> None:
    # Keeps the doubles honest: they speak worker.proto end to end, version check included.
    d, p = DecodeDouble("d0", [5, 6, 7]), PrefillDouble("p0", 5, cached_tokens=2)
    await d.start()
    await p.start()
    try:
        async with grpc.aio.insecure_channel(d.address) as channel:
            stub = worker_pb2_grpc.DecodeWorkerStub(channel)
            req = worker_pb2.DecodeRequest(request_id="r", token_ids=[1, 2, 3, 4],
                                           sampling=inference_pb2.SamplingParams(max_tokens=2),
                                           prefill=worker_pb2.PrefillTarget(worker_id="p0", grpc_address=p.address))
            chunks = [c async for c in stub.Generate(req)]
        assert [t for c in chunks for t in c.token_ids] == [5, 6]
        assert chunks[0].prefill.cached_tokens == 2 and chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        assert p.requests[0].kv.version == worker_pb2.KV_HANDOFF_VERSION_2
    finally:
        await d.server.stop(None)
        await p.server.stop(None)
