"""/tokenize, /detokenize, /version, the API key (HTTP and gRPC), and what reaches the workers for n, best_of,
lists of prompts, echo, prompt logprobs and chat templates. Workers are gRPC test doubles
(test_grpc_decode_double.py); tests/router/test_request_fields.py runs the fields against a real worker."""
from __future__ import annotations

import shutil

import grpc
import httpx
import openai
import pytest
from test_grpc_decode_double import MODEL, SCRIPT_TEXT, Cluster, model_dir  # noqa: F401 - fixture

from baton.engine.tokenizer import Tokenizer
from baton.proto.v1 import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.anyio
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def script(tok) -> list[int]:
    return tok.encode(SCRIPT_TEXT, add_special_tokens=False)


async def test_tokenize_detokenize_round_trip_and_version(redis_url, model_dir, tok, script) -> None:
    async with Cluster(redis_url, model_dir, script) as c, httpx.AsyncClient(base_url=c.url) as http:
        text = "Hello there, tokenizer!"
        r = (await http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True})).json()
        assert r["tokens"] == tok.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
        assert r["token_strs"] == [tok.id_to_token(t) for t in r["tokens"]]
        bare = (await http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})).json()
        assert bare["tokens"] == tok.encode(text, add_special_tokens=False)
        back = (await http.post("/detokenize", json={"model": MODEL, "tokens": bare["tokens"]})).json()
        assert back == {"prompt": text}
        messages = [{"role": "user", "content": "hi"}]
        chat = (await http.post("/tokenize", json={"messages": messages})).json()
        assert chat["tokens"] == tok.encode_chat(messages)
        bad = await http.post("/detokenize", json={"tokens": [99999]})
        assert bad.status_code == 400 and "outside the vocabulary" in bad.json()["error"]["message"]
        neither = await http.post("/tokenize", json={"model": MODEL})
        assert neither.status_code == 400 and neither.json()["error"]["param"] == "prompt"
        version = (await http.get("/version")).json()
        assert version["version"].count(".") >= 1


async def test_api_key_is_required_where_it_is_set(redis_url, model_dir, script) -> None:
    async with Cluster(redis_url, model_dir, script, api_key="s3cret") as c, httpx.AsyncClient(base_url=c.url) as http:
        for method, path, body in [("POST", CMPL, {"model": MODEL, "prompt": "x"}), ("GET", "/v1/models", None),
                                   ("POST", CHAT, {"model": MODEL, "messages": []}),
                                   ("POST", "/tokenize", {"prompt": "x"})]:
            r = await http.request(method, path, json=body)
            assert r.status_code == 401, path
            assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                          "param": None, "code": "invalid_api_key"}}
            wrong = await http.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
        for open_path in ("/health", "/ready", "/metrics", "/version"):
            assert (await http.get(open_path)).status_code == 200, open_path
        ok = await http.post(CMPL, json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                             headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.decodes[0].requests and len(c.decodes[0].requests) == 1, "no unauthorized request reached a worker"

        denied = openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="wrong", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError):
            await denied.completions.create(model=MODEL, prompt="x")
        allowed = openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="s3cret", max_retries=0, timeout=10)
        assert (await allowed.completions.create(model=MODEL, prompt="x", max_tokens=2)).choices[0].text
        await denied.close()
        await allowed.close()

        async with grpc.aio.insecure_channel(c.grpc_address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            request = inference_pb2.GenerateRequest(model=MODEL, text="x", sampling=inference_pb2.SamplingParams(
                max_tokens=2))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [r async for r in stub.Generate(request)]
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = [r async for r in stub.Generate(request, metadata=[("authorization", "Bearer s3cret")])]
            assert ok[-1].usage.completion_tokens == 2


async def test_env_api_key(monkeypatch, tmp_path) -> None:
    from baton.router.config import RouterConfig

    monkeypatch.setenv("BATON_API_KEY", "from-env")
    assert RouterConfig(model=str(tmp_path)).api_key_value == "from-env"
    monkeypatch.setenv("BATON_ROUTER_API_KEY", "router-own")
    assert RouterConfig(model=str(tmp_path)).api_key_value == "router-own"
    assert RouterConfig(model=str(tmp_path), api_key="flag").api_key_value == "flag"


async def test_n_and_prompt_lists_fan_out_with_derived_seeds(redis_url, model_dir, tok, script) -> None:
    async with Cluster(redis_url, model_dir, script) as c, httpx.AsyncClient(base_url=c.url) as http:
        r = await http.post(CMPL, json={"model": MODEL, "prompt": ["one", "two"], "n": 2, "seed": 7, "max_tokens": 3,
                                        "echo": True})
        body = r.json()
        assert r.status_code == 200 and [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
        assert [ch["text"] for ch in body["choices"]] == [p + tok.decode(script[:3]) for p in ("one", "one", "two",
                                                                                                "two")]
        sent = c.decodes[0].requests
        assert sorted((list(s.token_ids), s.sampling.seed) for s in sent) == sorted(
            (tok.encode(p), 7 + j) for p in ("one", "two") for j in range(2))
        assert len({s.request_id for s in sent}) == 4
        assert body["usage"]["prompt_tokens"] == len(tok.encode("one")) + len(tok.encode("two"))
        assert body["usage"]["completion_tokens"] == 12

        stream = await http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2,
                                             "max_tokens": 4, "stream": True})
        import json

        chunks = [json.loads(line[6:]) for line in stream.text.split("\n")
                  if line.startswith("data: ") and line != "data: [DONE]"]
        texts = {0: "", 1: ""}
        for chunk in chunks:
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["delta"].get("content", "")
        assert texts == {0: tok.decode(script[:4]), 1: tok.decode(script[:4])}
        assert all("usage" not in chunk for chunk in chunks)  # no stream_options: no usage (`{}` asks for it)


async def test_logprob_requests_prefill_on_the_decode_worker(redis_url, model_dir, script) -> None:
    # Prompt logprobs and the first token's alternatives exist only where the prompt runs.
    async with Cluster(redis_url, model_dir, script) as c, httpx.AsyncClient(base_url=c.url) as http:
        await http.post(CMPL, json={"model": MODEL, "prompt": "a b c", "max_tokens": 1, "echo": True, "logprobs": 1})
        await http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                                    "logprobs": True, "top_logprobs": 2})
        await http.post(CMPL, json={"model": MODEL, "prompt": "a b c", "max_tokens": 2})
        sent = c.decodes[0].requests
        assert sent[0].sampling.HasField("prompt_logprobs") and sent[0].sampling.prompt_logprobs == 1
        assert sent[1].sampling.top_logprobs == 2 and not sent[1].sampling.HasField("prompt_logprobs")
        assert [s.HasField("prefill") for s in sent] == [False, False, True]


async def test_message_fields_and_template_kwargs_reach_the_chat_template(redis_url, model_dir, tmp_path, script):
    own = tmp_path / MODEL
    shutil.copytree(model_dir, own)
    (own / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}{% if m.name %}({{ m.name }}){% endif %}: {{ m.content or '' }}"
        "{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}"
        "{% for call in m.tool_calls or [] %} call {{ call.function.name }}{% endfor %}|{% endfor %}"
        "{% if greeting %}{{ greeting }}{% endif %}")
    messages = [{"role": "user", "content": "hi", "name": "alice"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"}]
    async with Cluster(redis_url, own, script) as c, httpx.AsyncClient(base_url=c.url) as http:
        r = await http.post(CHAT, json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                        "chat_template_kwargs": {"greeting": "ahoy"}})
        assert r.status_code == 200, r.text
        prompt = Tokenizer.from_dir(own).decode(c.decodes[0].requests[0].token_ids)
        assert prompt == "user(alice): hi|assistant:  call lookup|tool: 42 [c1]|ahoy"


async def test_sampling_defaults_come_from_generation_config(redis_url, model_dir, tmp_path, script) -> None:
    import json

    own = tmp_path / MODEL
    shutil.copytree(model_dir, own)
    (own / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 5,
         "eos_token_id": 2}))
    async with Cluster(redis_url, own, script) as c, httpx.AsyncClient(base_url=c.url) as http:
        await http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        await http.post(CMPL, json={"model": MODEL, "prompt": "x", "temperature": 0, "top_p": None, "top_k": 3})
        defaults, explicit = (r.sampling for r in c.decodes[0].requests)
        assert (defaults.temperature, defaults.top_k, defaults.max_tokens) == (pytest.approx(0.6), 20, 5)
        assert defaults.top_p == pytest.approx(0.9) and defaults.repetition_penalty == pytest.approx(1.1)
        assert (explicit.temperature, explicit.top_k, explicit.max_tokens) == (0, 3, 16)
        assert explicit.top_p == pytest.approx(0.9), "an explicit null is the default"
