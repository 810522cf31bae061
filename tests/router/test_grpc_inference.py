"""The router's public gRPC `baton.v1.Inference` service over real gRPC, against gRPC test doubles
of the decode/prefill workers (test_grpc_decode_double.py): same tokens as HTTP, typed errors."""
from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from test_grpc_decode_double import MODEL, SCRIPT_TEXT, Cluster, model_dir  # noqa: F401 - fixture

from baton.engine.tokenizer import Tokenizer
from baton.proto.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.anyio

pb = inference_pb2


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


async def test_grpc_generate_matches_http(redis_url, model_dir, tok) -> None:
    script = tok.encode(SCRIPT_TEXT, add_special_tokens=False)
    async with Cluster(redis_url, model_dir, script) as c, grpc.aio.insecure_channel(c.grpc_address) as channel, \
            httpx.AsyncClient(base_url=c.url) as http:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = pb.GenerateRequest(model=MODEL, text="Hello", sampling=pb.SamplingParams(max_tokens=6, logprobs=True))
        responses = [r async for r in stub.Generate(request)]
        tokens = [t for r in responses for t in r.token_ids]
        assert tokens == script[:6]
        assert "".join(r.text for r in responses) == tok.decode(script[:6])
        last = responses[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(tok.encode("Hello")) and last.usage.completion_tokens == 6
        assert [lp for r in responses for lp in r.logprobs] == pytest.approx([-0.5 * (i + 1) for i in range(6)])
        assert all(r.request_id == responses[0].request_id for r in responses)

        http_text = (await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 6})
                     ).json()["choices"][0]["text"]
        assert http_text == "".join(r.text for r in responses)
        sent = [list(r.token_ids) for r in c.decodes[0].requests]
        assert sent[0] == sent[1] == tok.encode("Hello"), "gRPC and HTTP send the same prompt ids"

        ids = [r async for r in stub.Generate(pb.GenerateRequest(
            model=MODEL, token_ids=pb.TokenIds(ids=[3, 4, 5]), request_id="mine",
            sampling=pb.SamplingParams(max_tokens=2)))]
        assert ids[0].request_id == "mine" and list(c.decodes[0].requests[-1].token_ids) == [3, 4, 5]
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
        out = [r async for r in stub.Generate(pb.GenerateRequest(model=MODEL, chat=chat))]
        assert out[-1].finish_reason == pb.FINISH_REASON_STOP and out[-1].usage.completion_tokens == len(script)
        assert list(c.decodes[0].requests[-1].token_ids) == tok.encode_chat([{"role": "user", "content": "hi"}])


async def test_grpc_errors_are_typed_statuses(redis_url, model_dir) -> None:
    async with Cluster(redis_url, model_dir, [5, 6], decodes=0) as c, \
            grpc.aio.insecure_channel(c.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        cases = [
            (pb.GenerateRequest(model="gpt-9", text="x"), grpc.StatusCode.NOT_FOUND, "does not exist"),
            (pb.GenerateRequest(model=MODEL), grpc.StatusCode.INVALID_ARGUMENT, "one of text"),
            (pb.GenerateRequest(model=MODEL, text="word " * 300), grpc.StatusCode.INVALID_ARGUMENT, "context length"),
            (pb.GenerateRequest(model=MODEL, token_ids=pb.TokenIds(ids=[10**6])), grpc.StatusCode.INVALID_ARGUMENT,
             "vocabulary"),
            (pb.GenerateRequest(model=MODEL, text="x"), grpc.StatusCode.UNAVAILABLE, "decode worker"),
        ]
        for request, code, fragment in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.Generate(request)]
            assert err.value.code() == code and fragment in err.value.details(), (request, err.value)
        health = await stub.Health(pb.HealthRequest())
        assert not health.ready and "no decode worker" in health.detail


async def test_grpc_models_and_health(redis_url, model_dir) -> None:
    async with Cluster(redis_url, model_dir, [5]) as c, grpc.aio.insecure_channel(c.grpc_address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        models = await stub.Models(pb.ModelsRequest())
        assert [(m.id, m.max_model_len) for m in models.models] == [(MODEL, 256)]
        assert (await stub.Health(pb.HealthRequest())).ready


async def test_grpc_cancel_aborts_the_decode_worker(redis_url, model_dir, tok) -> None:
    script = tok.encode(SCRIPT_TEXT * 4, add_special_tokens=False)
    async with Cluster(redis_url, model_dir, script, token_delay_s=0.02) as c, \
            grpc.aio.insecure_channel(c.grpc_address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(model=MODEL, text="x", sampling=pb.SamplingParams(max_tokens=100)))
        got = 0
        async for _ in call:
            got += 1
            if got == 3:
                call.cancel()
                break
        d = c.decodes[0]
        rid = d.requests[0].request_id
        for _ in range(300):
            if rid in d.aborted and rid in d.cancelled:
                break
            await asyncio.sleep(0.01)
        assert rid in d.aborted and rid in d.cancelled
