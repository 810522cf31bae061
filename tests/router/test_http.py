"""The router's OpenAI HTTP API through real HTTP (httpx and the official `openai` client) against
a real router process core, real Redis, and gRPC test doubles of the decode/prefill workers (see
test_grpc_decode_double.py; the real end-to-end test comes when the workers land)."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from test_grpc_decode_double import MODEL, SCRIPT_TEXT, Cluster, model_dir  # noqa: F401 - fixture

from baton.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def script(tok) -> list[int]:
    return tok.encode(SCRIPT_TEXT, add_special_tokens=False)


def _events(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.split("\n") if line.startswith("data: ")]


async def test_completion_tokenizes_once_and_returns_text_and_usage(redis_url, model_dir, tok, script) -> None:
    async with Cluster(redis_url, model_dir, script) as c, httpx.AsyncClient(base_url=c.url) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 5,
                                                     "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        prompt_ids = tok.encode("Hello there")
        assert body["choices"][0]["text"] == tok.decode(script[:5])
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                                 "total_tokens": len(prompt_ids) + 5, "prompt_tokens_details": {"cached_tokens": 0}}
        sent = c.decodes[0].requests[0]
        assert list(sent.token_ids) == prompt_ids and sent.sampling.max_tokens == 5
        assert sent.prefill.worker_id == "p0"
        assert len(c.prefills[0].requests) == 1


async def test_openai_client_completions_and_chat(redis_url, model_dir, tok, script) -> None:
    async with Cluster(redis_url, model_dir, script) as c:
        client = openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=10)
        done = await client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4)
        assert done.choices[0].text == tok.decode(script[:4]) and done.usage.prompt_tokens == 3
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        chat = await client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
        assert chat.choices[0].message.content == tok.decode(script[:3])
        assert chat.choices[0].message.role == "assistant"
        assert list(c.decodes[0].requests[-1].token_ids) == tok.encode_chat(messages)
        assert chat.usage.prompt_tokens == len(tok.encode_chat(messages)) and chat.usage.completion_tokens == 3

        stream = await client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                      stream_options={"include_usage": True})
        parts, usage, finish = [], None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(parts) == tok.decode(script) and finish == "stop"
        assert usage.completion_tokens == len(script) and usage.total_tokens == usage.prompt_tokens + len(script)
        await client.close()


async def test_raw_sse_stream_ends_with_done(redis_url, model_dir, tok, script) -> None:
    async with Cluster(redis_url, model_dir, script) as c, httpx.AsyncClient(base_url=c.url) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 6, "stream": True,
                                                     "logprobs": 1})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == tok.decode(script[:6])
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all("usage" not in ch for ch in chunks), "no usage without stream_options.include_usage"
        logprobs = [lp for ch in chunks for lp in ch["choices"][0]["logprobs"]["token_logprobs"]]
        assert logprobs == pytest.approx([-0.5 * (i + 1) for i in range(6)])


async def test_stop_string_truncates_and_ends_the_worker_stream(redis_url, model_dir, tok, script) -> None:
    async with Cluster(redis_url, model_dir, script, token_delay_s=0.01) as c, \
            httpx.AsyncClient(base_url=c.url) as http:
        r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50, "stop": " fox"})
        body = r.json()
        assert body["choices"][0]["text"] == " the quick brown" and body["choices"][0]["finish_reason"] == "stop"
        # The decode worker applies the stop string itself and ends the stream: nothing left to abort.
        assert "quick brown fox" in tok.decode(script)
        assert c.decodes[0].aborted == [] and c.decodes[0].cancelled == []


async def test_short_prompt_prefills_on_the_decode_worker(redis_url, model_dir, script) -> None:
    async with Cluster(redis_url, model_dir, script, local_prefill_threshold=8) as c, \
            httpx.AsyncClient(base_url=c.url) as http:
        short = await http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2})
        long = await http.post("/v1/completions", json={"model": MODEL, "prompt": list(range(1, 12)), "max_tokens": 2})
        assert short.status_code == long.status_code == 200
        assert short.json()["choices"][0]["text"] == long.json()["choices"][0]["text"]
        first, second = c.decodes[0].requests
        assert not first.HasField("prefill") and second.prefill.worker_id == "p0"


async def test_meta_endpoints(redis_url, model_dir, script) -> None:
    async with Cluster(redis_url, model_dir, script) as c, httpx.AsyncClient(base_url=c.url) as http:
        models = (await http.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["max_model_len"] == 256
        assert (await http.get("/health")).json() == {"status": "ok"}
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["decode_workers"] == 1
        await http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2, "stream": True})
        await http.post("/v1/completions", json={"model": "nope", "prompt": "a"})
        text = (await http.get("/metrics")).text
        m = f'model_name="{MODEL}"'
        assert 'baton_router_requests_total{' + m + ',route="/v1/completions",status="200"} 1.0' in text
        assert 'baton_router_requests_total{' + m + ',route="/v1/completions",status="404"} 1.0' in text
        assert 'baton_router_request_success_total{finished_reason="length",' + m + '} 1.0' in text
        assert 'baton_router_decisions_total{policy="kv_aware",pool="decode"} 1.0' in text
        assert 'baton_router_decision_latency_seconds_count{step="decision"} 2.0' in text  # decode + prefill
        assert "baton_router_time_to_first_token_seconds_count{" + m + "} 1.0" in text
        assert "baton_router_inter_token_latency_seconds_count{" + m + "} 1.0" in text  # 2 tokens: one gap
        assert "baton_router_e2e_request_latency_seconds_count{" + m + "} 1.0" in text
        assert 'baton_router_e2e_request_latency_seconds_bucket{le="3600.0",' + m + '} 1.0' in text
        assert "baton_router_prefix_index_blocks 0.0" in text


async def test_ready_is_503_without_decode_workers(redis_url, model_dir, script) -> None:
    async with Cluster(redis_url, model_dir, script, decodes=0) as c, httpx.AsyncClient(base_url=c.url) as http:
        r = await http.get("/ready")
        assert r.status_code == 503 and r.json()["decode_workers"] == 0
