"""The official openai client, unmodified, against a `baton up` cluster (1 prefill + 1 decode worker)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest

from baton.engine.tokenizer import Tokenizer
from baton.proto.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow

LONG = "The quick brown fox jumps over the lazy dog while the router picks a prefill worker. " * 3


def baton_generate(model_dir, ids, max_tokens) -> dict:
    out = subprocess.run([sys.executable, "-m", "baton.cli", "generate", str(model_dir), "--prompt-ids",
                          ",".join(map(str, ids)), "--max-tokens", str(max_tokens), "--ignore-eos", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def engine(e2e_model_dir):
    """The engine `baton generate` runs, in-process, for references beyond the CLI comparisons."""
    from baton.engine.config import EngineConfig
    from baton.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(str(e2e_model_dir), num_kv_blocks=256, show_progress=False))


def greedy(engine, ids, max_tokens) -> dict:
    from baton.engine.sampling_params import SamplingParams

    seq = engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))[0]
    return {"token_ids": seq.output_ids, "text": engine.tokenizer.decode(seq.output_ids)}


@pytest.fixture(scope="module")
def client(cluster_1p1d):
    return openai.OpenAI(base_url=f"{cluster_1p1d.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(e2e_model_dir):
    return Tokenizer.from_dir(e2e_model_dir)


def worker_stats(cluster) -> dict[str, dict]:
    import redis

    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    stats = {}
    for key in client.scan_iter(match="baton:worker:*"):
        rec = client.hgetall(key)
        try:
            stats[rec["worker_id"]] = httpx.get(f"http://{rec['http_address']}/stats", timeout=5).json()
        except httpx.ConnectError:
            continue  # a killed worker stays registered until its key's TTL runs out
    return stats


@pytest.mark.parametrize("prompt", ["Hi", LONG])  # short: decode prefills locally; long: remote prefill + KV hand-off
def test_completions_match_baton_generate(client, cluster_1p1d, tok, prompt):
    ids = tok.encode(prompt)
    ref = baton_generate(cluster_1p1d.model_dir, ids, 20)
    resp = client.completions.create(model=cluster_1p1d.model_name, prompt=prompt, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == ref["text"]
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(ref["token_ids"]) == 20
    stream = client.completions.create(model=cluster_1p1d.model_name, prompt=prompt, max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref["text"]
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_streaming_and_not_match(client, cluster_1p1d, tok, engine):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": LONG}]
    ref = greedy(engine, tok.encode_chat(messages), 16)
    resp = client.chat.completions.create(model=cluster_1p1d.model_name, messages=messages, max_tokens=16,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content == ref["text"]
    assert resp.usage.prompt_tokens == len(tok.encode_chat(messages))
    stream = client.chat.completions.create(model=cluster_1p1d.model_name, messages=messages, max_tokens=16,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref["text"]


def test_32_concurrent_streams_all_correct(cluster_1p1d, tok, engine):
    prompts = [f"Request {i}: " + LONG[: 40 + 7 * i] for i in range(32)]
    refs = {p: greedy(engine, tok.encode(p), 12)["text"] for p in prompts}

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model=cluster_1p1d.model_name, prompt=prompt, max_tokens=12,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{cluster_1p1d.url}/v1", api_key="x", max_retries=0,
                                      timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    texts = asyncio.run(run())
    assert texts == [refs[p] for p in prompts]


def test_grpc_gets_the_same_tokens_as_http(client, cluster_1p1d, tok, engine):
    http = client.completions.create(model=cluster_1p1d.model_name, prompt=LONG, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})

    async def grpc_call():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster_1p1d.opts.grpc_port}") as ch:
            stub = inference_pb2_grpc.InferenceStub(ch)
            req = inference_pb2.GenerateRequest(model=cluster_1p1d.model_name, text=LONG,
                                                sampling=inference_pb2.SamplingParams(max_tokens=10, ignore_eos=True))
            return [r async for r in stub.Generate(req)]

    responses = asyncio.run(grpc_call())
    ids = [t for r in responses for t in r.token_ids]
    assert "".join(r.text for r in responses) == http.choices[0].text
    assert ids == greedy(engine, tok.encode(LONG), 10)["token_ids"]
    assert responses[-1].usage.completion_tokens == 10


@pytest.mark.parametrize("body,status", [
    ("{not json", 400),
    (json.dumps({"model": "nope", "prompt": "x"}), 404),
    (json.dumps({"model": "e2e-llama"}), 400),
    (json.dumps({"model": "e2e-llama", "prompt": "x", "max_tokens": "many"}), 400),
    (json.dumps({"model": "e2e-llama", "prompt": "x", "tools": []}), 400),
    (json.dumps({"model": "e2e-llama", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"type": "foo"}}}}), 400),
    (json.dumps({"model": "e2e-llama", "prompt": "word " * 2000}), 400),
])
def test_bad_input_gets_openai_errors(cluster_1p1d, body, status):
    r = httpx.post(f"{cluster_1p1d.url}/v1/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert "Traceback" not in r.text


def test_client_disconnect_frees_blocks_on_both_workers(cluster_1p1d):
    with httpx.stream("POST", f"{cluster_1p1d.url}/v1/completions", timeout=60, json={
            "model": cluster_1p1d.model_name, "prompt": LONG, "max_tokens": 400, "stream": True,
            "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    while True:
        stats = worker_stats(cluster_1p1d)
        busy = {w: (s.get("kv_blocks_used"), s.get("num_requests_running")) for w, s in stats.items()
                if s.get("kv_blocks_used") or s.get("num_requests_running")}
        if not busy:
            break
        assert time.monotonic() < deadline, f"blocks still held after disconnect: {busy}"
        time.sleep(0.2)
    assert len(stats) == 2


def _samples(text: str) -> dict[str, float]:
    """name{labels} -> value for every sample in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def _total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


def test_metrics_of_every_component_after_traffic(client, cluster_1p1d):
    import redis

    for prompt in ("Hi", LONG):
        client.completions.create(model=cluster_1p1d.model_name, prompt=prompt, max_tokens=8,
                                  extra_body={"ignore_eos": True})
    router = _samples(httpx.get(f"{cluster_1p1d.url}/metrics", timeout=5).text)
    assert _total(router, "baton_router_time_to_first_token_seconds_count") >= 2
    assert _total(router, "baton_router_inter_token_latency_seconds_count") >= 2 * 7
    assert 0 < _total(router, "baton_router_e2e_request_latency_seconds_sum") < 120
    assert _total(router, "baton_router_requests_total") >= 2
    assert _total(router, "baton_router_decisions_total") >= 2
    assert _total(router, "baton_router_decision_latency_seconds_count") >= 1

    client_r = redis.Redis.from_url(cluster_1p1d.redis_url, decode_responses=True)
    pools = {}
    for key in client_r.scan_iter(match="baton:worker:*"):
        rec = client_r.hgetall(key)
        pools[rec["pool"]] = _samples(httpx.get(f"http://{rec['http_address']}/metrics", timeout=5).text)
    decode, prefill = pools["decode"], pools["prefill"]
    assert _total(decode, "baton_worker_generation_tokens_total") >= 16
    assert 0 <= _total(decode, "baton_worker_kv_cache_usage_perc") <= 1
    assert _total(decode, "baton_worker_num_requests_running") >= 0
    assert _total(prefill, "baton_worker_prompt_tokens_total") >= len(LONG.split()) // 2
    assert _total(prefill, "baton_kv_transfer_bytes_total") > 0  # the long prompt's KV went to decode
    assert _total(decode, "baton_kv_transfer_seconds_count") >= 1

    cp = _samples(httpx.get(f"http://127.0.0.1:{cluster_1p1d.opts.controlplane_port}/metrics", timeout=5).text)
    assert _total(cp, "baton_controlplane_desired_replicas") >= 2  # 1 prefill + 1 decode
    assert _total(cp, "baton_controlplane_actual_replicas") >= 2


def test_request_id_follows_the_request_through_every_log(client, cluster_1p1d):
    # A prompt no worker has cached, so it is long enough uncached to be prefilled remotely.
    resp = client.completions.create(model=cluster_1p1d.model_name, prompt="Log trail. " + LONG, max_tokens=4,
                                     extra_body={"ignore_eos": True})
    rid = resp.id
    logs = {p.name: p for p in cluster_1p1d.run_dir.glob("*.log")}

    def mentions(name_part):
        return any(rid in p.read_text() for n, p in logs.items() if name_part in n)

    deadline = time.monotonic() + 10
    while not (mentions("router") and mentions("prefill") and mentions("decode")):
        assert time.monotonic() < deadline, f"{rid} missing from some of {sorted(logs)}"
        time.sleep(0.2)

