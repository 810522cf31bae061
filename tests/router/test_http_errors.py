"""Bad input to the router's OpenAI API: every case returns an OpenAI-style JSON error with the
right status and never a traceback. Workers are gRPC test doubles (test_grpc_decode_double.py)."""
from __future__ import annotations

import httpx
import openai
import pytest
from test_grpc_decode_double import MODEL, SCRIPT_TEXT, Cluster, model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.anyio

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
LONG = "word " * 300  # > 256-token context of the test model

CASES = [
    # (path, raw body or JSON, status, param, message fragment)
    (CMPL, b"{not json", 400, None, "not valid JSON"),
    (CMPL, b"[1, 2]", 400, None, "Invalid request body"),
    (CMPL, {"model": MODEL}, 400, "prompt", "Field required"),
    (CHAT, {"model": MODEL}, 400, "messages", "Field required"),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", "at least 1"),
    (CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "'user'"),
    (CMPL, {"prompt": "x"}, 400, "model", "Field required"),
    (CMPL, {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    (CMPL, {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    (CMPL, {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    (CMPL, {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    (CMPL, {"model": MODEL, "prompt": 12}, 400, "prompt", None),
    (CMPL, {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    (CMPL, {"model": MODEL, "prompt": ["a", ""]}, 400, "prompt", "empty"),
    (CMPL, {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt", "outside the vocabulary"),
    (CMPL, {"model": MODEL, "prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    (CMPL, {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "stream"),
    # A schema the grammar backend cannot enforce is refused, never answered unconstrained.
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "foo"}}}}, 400, "response_format",
     "Unsupported type"),
    (CMPL, {"model": MODEL, "prompt": "x", "response_format": {"type": "json_schema"}}, 400, "response_format",
     "needs a 'json_schema'"),
    (CMPL, {"model": MODEL, "prompt": "x", "response_format": {"type": "xml"}}, 400, "response_format.type", None),
    # Fields that are not applied are refused by name, never silently dropped.
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools",
     "at least 1 item"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, 400,
     "tool_choice", "only allowed when tools are given"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "functions": []}, 400,
     "functions", "not supported"),
    (CMPL, {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    (CMPL, {"model": MODEL, "prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}}, 400,
     "stream_options.continuous_usage_stats", "not supported"),
    (CMPL, {"model": MODEL, "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias.5", "less than or equal"),
    (CMPL, {"model": MODEL, "prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias", "outside the vocabulary"),
    (CMPL, {"model": MODEL, "prompt": "x", "stop_token_ids": [99999]}, 400, "stop_token_ids", "outside the vocab"),
    (CMPL, {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    (CMPL, {"model": MODEL, "prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "less than or equal"),
    (CMPL, {"model": MODEL, "prompt": "x", "min_tokens": 20}, 400, "min_tokens", "must not exceed max_tokens"),
    (CMPL, {"model": MODEL, "prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", "must be >= n"),
    (CMPL, {"model": MODEL, "prompt": "x", "best_of": 2, "stream": True}, 400, "best_of", "cannot be streamed"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs",
     "requires logprobs"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs", "less than or equal to 20"),
    (CMPL, {"model": "gpt-9", "prompt": "x"}, 404, "model", "does not exist"),
    (CHAT, {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "does not exist"),
    (CMPL, {"model": MODEL, "prompt": LONG}, 400, "prompt", "maximum context length is 256"),
    (CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 300}, 400, "max_tokens", "maximum context length"),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "prompt", "maximum context"),
    ("/v1/nothing", {}, 404, None, "Not Found"),
]


async def test_bad_input_gets_openai_errors(redis_url, model_dir) -> None:
    async with Cluster(redis_url, model_dir, [5, 6, 7]) as c, httpx.AsyncClient(base_url=c.url) as http:
        for path, body, status, param, fragment in CASES:
            if isinstance(body, bytes):
                r = await http.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = await http.post(path, json=body)
            case = f"{path} {body!r:.60}"
            assert r.status_code == status, f"{case}: {r.status_code} {r.text}"
            assert r.headers["content-type"] == "application/json", case
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, case
            assert error["param"] == param, f"{case}: {error}"
            assert fragment is None or fragment in error["message"], f"{case}: {error['message']}"
            assert "Traceback" not in r.text and "File \"" not in r.text, case
        assert c.decodes[0].requests == [], "no bad request may reach a worker"


@pytest.mark.parametrize("stream", [False, True])
async def test_no_decode_worker_is_503(redis_url, model_dir, stream) -> None:
    async with Cluster(redis_url, model_dir, [5], decodes=0, prefills=1) as c, \
            httpx.AsyncClient(base_url=c.url) as http:
        r = await http.post(CMPL, json={"model": MODEL, "prompt": "x", "stream": stream})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_worker_available"


async def test_openai_client_raises_typed_errors(redis_url, model_dir) -> None:
    async with Cluster(redis_url, model_dir, [5]) as c:
        client = openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=10)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="gpt-9", prompt="x")
        with pytest.raises(openai.BadRequestError, match="response_format.json_schema.schema: unsupported"):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 response_format={"type": "json_schema", "json_schema": {
                                                     "name": "s", "schema": {"$ref": "#/nowhere"}}})
        with pytest.raises(openai.BadRequestError, match="tool_choice names function 'g', which is not among"):
            await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                tool_choice={"type": "function", "function": {"name": "g"}})
        await client.close()


async def test_ignore_eos_and_sampling_reach_the_worker(redis_url, model_dir) -> None:
    # aiperf sends ignore_eos; `user` cannot change the output and is ignored; explicit nulls are defaults.
    async with Cluster(redis_url, model_dir, [5, 6]) as c, httpx.AsyncClient(base_url=c.url) as http:
        r = await http.post(CMPL, json={"model": MODEL, "prompt": "x", "ignore_eos": True, "top_k": 5, "seed": 7,
                                        "top_p": 0.5, "temperature": 0.7, "frequency_penalty": 0.5, "user": "u1",
                                        "max_tokens": None, "stop": None, "logprobs": None})
        assert r.status_code == 200, r.text
        s = c.decodes[0].requests[0].sampling
        assert s.ignore_eos and s.top_k == 5 and s.seed == 7 and s.top_p == pytest.approx(0.5)
        assert s.temperature == pytest.approx(0.7) and s.frequency_penalty == pytest.approx(0.5)
        assert s.max_tokens == 16 and not s.logprobs and not s.stop  # completions default max_tokens: 16
