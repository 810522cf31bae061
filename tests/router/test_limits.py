"""What a router takes in: body size (413), max_tokens_limit (400), and admission control (429 + Retry-After on
HTTP, RESOURCE_EXHAUSTED on gRPC) once max_inflight_requests are in flight; a slot frees when its stream ends."""
from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from test_grpc_decode_double import MODEL, Cluster, model_dir  # noqa: F401 - fixture

from baton.proto.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.anyio
SCRIPT = list(range(300, 340))


async def _eventually(predicate, timeout_s: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_a_body_over_the_limit_is_a_413_json_error(redis_url, model_dir) -> None:
    async with Cluster(redis_url, model_dir, SCRIPT, max_body_bytes=4096) as c, \
            httpx.AsyncClient(base_url=c.url, timeout=5) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x " * 4000, "max_tokens": 2})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text

        async def chunked():  # no Content-Length: the limit counts what arrives
            for _ in range(10):
                yield b" " * 1000

        r = await http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert 'route="/v1/completions",status="413"} 2.0' in (await http.get("/metrics")).text


async def test_max_tokens_limit_refuses_more_and_caps_the_default(redis_url, model_dir) -> None:
    async with Cluster(redis_url, model_dir, SCRIPT, max_tokens_limit=8) as c, \
            httpx.AsyncClient(base_url=c.url, timeout=5) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        # Chat without max_tokens asks for what the context leaves: the limit caps it.
        r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text


async def test_requests_past_max_inflight_get_429_with_retry_after(redis_url, model_dir) -> None:
    async with Cluster(redis_url, model_dir, SCRIPT, max_inflight_requests=1, retry_after_s=2,
                       token_delay_s=0.02) as c, httpx.AsyncClient(base_url=c.url, timeout=5) as http:
        admission = c.router.service.admission
        body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as first:
            lines = first.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass  # the first stream is admitted and streaming
            r = await http.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                               "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 429 and r.headers["retry-after"] == "2", r.text
            assert r.json()["error"]["code"] == "too_many_requests"
            async with grpc.aio.insecure_channel(c.grpc_address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    async for _ in inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
                            model=MODEL, text="x", sampling=inference_pb2.SamplingParams(max_tokens=2))):
                        pass
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await http.get("/v1/models")).status_code == 200, "only generation is admitted"
            async for _ in lines:
                pass
        assert await _eventually(lambda: admission.in_flight == 0), admission.in_flight
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text


async def test_a_client_leaving_mid_stream_frees_its_slot(redis_url, model_dir) -> None:
    async with Cluster(redis_url, model_dir, SCRIPT, max_inflight_requests=1, token_delay_s=0.02) as c, \
            httpx.AsyncClient(base_url=c.url, timeout=5) as http:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 40, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
        assert await _eventually(lambda: c.router.service.admission.in_flight == 0)
