"""The router refuses workers whose KV block size differs from its own (their block hashes could never match
the router's): a real router and worker doubles registered in real Redis, one at 16 tokens and one at 32."""
from __future__ import annotations

import asyncio
import logging

import grpc
import httpx
import pytest
from test_grpc_decode_double import MODEL, Cluster, DecodeDouble, model_dir  # noqa: F401 - fixture

from baton.contracts.worker_registry import WorkerRecord, WorkerRegistration
from baton.proto.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.anyio
SCRIPT = [5, 6, 7]


async def _register(redis_url: str, worker: DecodeDouble, block_size: int) -> WorkerRegistration:
    await worker.start()
    reg = WorkerRegistration(redis_url, WorkerRecord(worker_id=worker.worker_id, pool="decode", model=MODEL,
                                                     grpc_address=worker.address, capacity=8, block_size=block_size),
                             interval_s=0.2, ttl_s=10.0)
    await reg.start()
    return reg


async def test_requests_never_reach_a_worker_of_another_block_size(redis_url, model_dir, caplog) -> None:
    odd = DecodeDouble("d-bs32", SCRIPT)
    reg = await _register(redis_url, odd, block_size=32)
    try:
        with caplog.at_level(logging.WARNING, logger="baton.router.dispatch"):
            # round_robin would alternate between the two decode workers if both were candidates.
            async with Cluster(redis_url, model_dir, SCRIPT, prefills=0, policy="round_robin", block_size=16) as c, \
                    httpx.AsyncClient(base_url=c.url, timeout=5) as http:
                for i in range(6):
                    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [i + 1] * 40,
                                                                 "max_tokens": 2})
                    assert r.status_code == 200, r.text
                await asyncio.sleep(0.5)  # several registry scans and heartbeats: still one warning
                ready = await http.get("/ready")
                good = c.decodes[0]
        assert len(good.requests) == 6 and odd.requests == []
        assert ready.status_code == 200
        body = ready.json()
        assert body["decode_workers"] == 1 and body["block_size"] == 16
        assert [(w["worker_id"], w["pool"], w["block_size"]) for w in body["refused_workers"]] == \
            [("d-bs32", "decode", 32)]
        warnings = [r.getMessage() for r in caplog.records if "d-bs32" in r.getMessage()]
        assert len(warnings) == 1 and "block size is 32" in warnings[0] and "router's is 16" in warnings[0]
    finally:
        await reg.stop()
        await odd.server.stop(None)


async def test_a_router_whose_only_decode_workers_are_refused_is_not_ready(redis_url, model_dir) -> None:
    odd = DecodeDouble("d-bs32", SCRIPT)
    reg = await _register(redis_url, odd, block_size=32)
    later: list[WorkerRegistration] = []
    try:
        async with Cluster(redis_url, model_dir, SCRIPT, decodes=0, prefills=0, block_size=16) as c, \
                httpx.AsyncClient(base_url=c.url, timeout=5) as http, \
                grpc.aio.insecure_channel(c.grpc_address) as channel:
            ready = await http.get("/ready")
            assert ready.status_code == 503
            assert [w["worker_id"] for w in ready.json()["refused_workers"]] == ["d-bs32"]
            health = await inference_pb2_grpc.InferenceStub(channel).Health(inference_pb2.HealthRequest())
            assert not health.ready and "d-bs32" in health.detail
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2})
            assert r.status_code == 503 and odd.requests == []
            # A worker with the router's block size makes it ready; the other stays refused.
            good = DecodeDouble("d-bs16", SCRIPT)
            later.append(await _register(redis_url, good, block_size=16))
            for _ in range(100):
                ready = await http.get("/ready")
                if ready.status_code == 200:
                    break
                await asyncio.sleep(0.02)
            assert ready.status_code == 200 and ready.json()["refused_workers"][0]["worker_id"] == "d-bs32"
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2})
            assert r.status_code == 200 and len(good.requests) == 1 and odd.requests == []
    finally:
        for registration in [reg, *later]:
            await registration.stop()
        await odd.server.stop(None)
        if later:
            await good.server.stop(None)
