"""Every OpenAI request field has an observable effect, through the official `openai` client and raw HTTP,
against a real router and a real decode worker process (a small random-weight model with a real tokenizer)."""
from __future__ import annotations

import json
import math
import re

import httpx
import jsonschema
import openai
import pytest

from baton.devtools.make_model import make_model
from baton.engine.tokenizer import Tokenizer
from baton.router.config import RouterConfig
from baton.router.server import Router
from tests.cluster import start_worker
from tests.conftest import free_port

pytestmark = pytest.mark.anyio
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fields") / "fields-llama", arch="llama", vocab=512, seed=11,
                      max_position=512)


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def decode_worker(model_dir, redis_server):
    worker = start_worker("decode", str(model_dir), redis_server.url, "d-fields")
    yield worker
    worker.stop()


@pytest.fixture
async def router(model_dir, decode_worker, redis_server):
    config = RouterConfig(model=str(model_dir), host="127.0.0.1", http_port=0, grpc_port=0,
                          redis_url=redis_server.url, registry_poll_interval_s=0.05)
    r = Router(config)
    await r.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{r.http_port}", timeout=60) as http:
        while (await http.get("/ready")).status_code != 200:
            pass
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{r.http_port}/v1", api_key="unused", max_retries=0,
                                timeout=60)
    yield r, client
    await client.close()
    await r.stop()


def name(model_dir) -> str:
    return model_dir.name


async def test_logit_bias_and_penalties_change_the_greedy_output(router, model_dir, tok):
    _, client = router
    common = dict(model=name(model_dir), prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    plain = await client.completions.create(**common, logprobs=0)
    first = tok.encode(plain.choices[0].logprobs.tokens[0], add_special_tokens=False)[0]
    banned = await client.completions.create(**common, logit_bias={str(first): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]
    forced = await client.completions.create(**common, logit_bias={"77": 100})
    assert forced.choices[0].text == tok.decode([77] * 12)
    chat = await client.chat.completions.create(model=name(model_dir), messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, temperature=0, logit_bias={"77": 100})
    assert chat.choices[0].message.content == tok.decode([77] * 4)
    # A small bias makes token t the greedy choice every step; each penalty then stops it repeating.
    t = next(i for i in range(300, 512) if i not in tok.encode(PROMPT))
    looped = await client.completions.create(**common, logit_bias={str(t): 1.0})
    assert looped.choices[0].text == tok.decode([t] * 12)
    for penalty in ({"presence_penalty": 2.0}, {"frequency_penalty": 1.0}):
        once = await client.completions.create(**common, logit_bias={str(t): 1.0}, **penalty, logprobs=0)
        tokens = once.choices[0].logprobs.tokens
        assert tokens[0] == tok.decode([t]) and tokens[1] != tokens[0], penalty
    once = await client.completions.create(**{**common, "extra_body": {"ignore_eos": True, "repetition_penalty": 1e9}},
                                           logit_bias={str(t): 100.0}, logprobs=0)
    assert once.choices[0].logprobs.tokens[0] == tok.decode([t]) != once.choices[0].logprobs.tokens[1]
    # min_p = 1 keeps only the most likely token, so sampling at any temperature is greedy.
    hot = await client.completions.create(**{**common, "temperature": 1.5, "seed": 3,
                                            "extra_body": {"ignore_eos": True, "min_p": 1.0}})
    assert hot.choices[0].text == plain.choices[0].text


async def test_n_with_a_seed_is_reproducible_and_best_of_keeps_the_likeliest(router, model_dir):
    _, client = router
    args = dict(model=name(model_dir), prompt=PROMPT, max_tokens=8, temperature=1.0, seed=42, n=3,
                extra_body={"ignore_eos": True})
    a = await client.completions.create(**args)
    b = await client.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1, "each choice samples its own sequence"
    assert a.usage.completion_tokens == 24
    chat = await client.chat.completions.create(model=name(model_dir), messages=[{"role": "user", "content": "x"}],
                                                max_tokens=6, n=2, seed=1, temperature=1.0)
    assert [c.index for c in chat.choices] == [0, 1]
    best = await client.completions.create(**{**args, "n": 1, "extra_body": {"ignore_eos": True, "best_of": 3},
                                              "logprobs": 0})
    assert len(best.choices) == 1
    # The samples of best_of are the n=3 ones (same seeds); the one kept has the highest cumulative logprob.
    scores = []
    for c in (await client.completions.create(**{**args, "logprobs": 0})).choices:
        scores.append((sum(c.logprobs.token_logprobs), c.text))
    assert best.choices[0].text == max(scores)[1]


async def test_top_logprobs_are_sorted_and_hold_the_sampled_token(router, model_dir):
    _, client = router
    done = await client.completions.create(model=name(model_dir), prompt=PROMPT, max_tokens=5, temperature=1.0,
                                           seed=5, logprobs=5)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(logprob) and 5 <= len(top) <= 6
        values = list(top.values())
        assert all(v <= 0 for v in values)
    chat = await client.chat.completions.create(model=name(model_dir), messages=[{"role": "user", "content": "x"}],
                                                max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    for entry in chat.choices[0].logprobs.content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == pytest.approx(
            entry.logprob)  # greedy: the sampled token is the most likely


async def test_echo_with_prompt_logprobs_for_a_list_of_prompts(router, model_dir, tok):
    # What lm-eval-harness sends for loglikelihood tasks.
    _, client = router
    prompts = ["Paris is the capital of", "Two plus two is"]
    done = await client.completions.create(model=name(model_dir), prompt=prompts, echo=True, logprobs=1,
                                           max_tokens=1, temperature=0)
    assert [c.index for c in done.choices] == [0, 1]
    for prompt, choice in zip(prompts, done.choices):
        ids = tok.encode(prompt)
        lp = choice.logprobs
        assert choice.text.startswith(prompt)
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
        assert all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert done.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    single = await client.completions.create(model=name(model_dir), prompt=[5], echo=True, logprobs=1, max_tokens=1)
    lp = single.choices[0].logprobs
    assert lp.tokens[0] == tok.decode([5]) and lp.token_logprobs[0] is None and len(lp.tokens) == 2


async def test_min_tokens_stop_token_ids_and_stop_strings(router, model_dir, tok):
    _, client = router
    eos = next(iter(tok.eos_token_ids))
    common = dict(model=name(model_dir), prompt=PROMPT, max_tokens=20, temperature=0)
    early = await client.completions.create(**common, logit_bias={str(eos): 100})
    assert early.usage.completion_tokens == 1 and early.choices[0].finish_reason == "stop"
    held = await client.completions.create(**common, logit_bias={str(eos): 100}, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    stop_id = await client.completions.create(**common, logit_bias={"77": 100}, extra_body={"stop_token_ids": [77]})
    assert stop_id.usage.completion_tokens == 1 and stop_id.choices[0].finish_reason == "stop"
    text = (await client.completions.create(**common, extra_body={"ignore_eos": True})).choices[0].text
    stop = text[4:7]
    cut = await client.completions.create(**common, stop=[stop], extra_body={"ignore_eos": True})
    kept = await client.completions.create(**common, stop=[stop],
                                           extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert cut.choices[0].text == text[:text.index(stop)]
    assert kept.choices[0].text == text[:text.index(stop) + len(stop)]


async def test_raw_http_streams_n_choices_with_usage(router, model_dir):
    r, _ = router
    body = {"model": name(model_dir), "prompt": PROMPT, "max_tokens": 4, "n": 2, "seed": 9, "temperature": 1.0,
            "stream": True, "stream_options": {}, "ignore_eos": True, "logprobs": 2, "user": "me"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{r.http_port}", timeout=60) as http:
        text = (await http.post("/v1/completions", json=body)).text
        whole = (await http.post("/v1/completions", json={**body, "stream": False, "stream_options": None})).json()
    events = [e[len("data: "):] for e in text.split("\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]["usage"]  # `stream_options: {}` asks for usage
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 8
    streamed = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            streamed[choice["index"]] += choice["text"]
            assert all(not math.isnan(v) for v in choice["logprobs"]["token_logprobs"])
    assert streamed == {c["index"]: c["text"] for c in whole["choices"]}


async def test_worker_metrics_carry_the_model_and_the_request_phases(router, model_dir, decode_worker):
    _, client = router
    await client.completions.create(model=name(model_dir), prompt=PROMPT, max_tokens=3)
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"http://127.0.0.1:{decode_worker.http_port}/metrics")).text
    labels = f'model_name="{name(model_dir)}",pool="decode",worker_id="d-fields"'
    for metric in ("request_queue_time_seconds_count", "request_prefill_time_seconds_count",
                   "request_decode_time_seconds_count", "prefix_cache_queries_total"):
        line = next(x for x in text.splitlines() if x.startswith(f"baton_worker_{metric}{{{labels}}}"))
        assert float(line.rsplit(" ", 1)[1]) > 0, line


async def test_response_format_output_parses_and_validates(router, model_dir):
    """At temperature 1 a random-weight model writes garbage, so valid JSON every time is the engine's doing."""
    _, client = router
    schema = {"type": "object", "properties": {
        "city": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "rank": {"type": "integer", "minimum": 1, "maximum": 10},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
        "required": ["city", "rank", "tags"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    messages = [{"role": "user", "content": "Where?"}]
    for seed in range(3):
        chat = await client.chat.completions.create(model=name(model_dir), messages=messages, max_tokens=200,
                                                    temperature=1.0, seed=seed, response_format=fmt)
        assert chat.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    stream = await client.chat.completions.create(model=name(model_dir), messages=messages, max_tokens=200,
                                                  temperature=1.0, seed=7, response_format=fmt, stream=True)
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    jsonschema.validate(json.loads(text), schema)
    done = await client.completions.create(model=name(model_dir), prompt=PROMPT, max_tokens=300, temperature=1.0,
                                           seed=3, extra_body={"response_format": {"type": "json_object"}})
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(done.choices[0].text), dict)
    cut = await client.chat.completions.create(model=name(model_dir), messages=messages, max_tokens=3,
                                               temperature=1.0, seed=0, response_format=fmt)
    assert cut.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="response_format"):
        await client.chat.completions.create(model=name(model_dir), messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": 3}}})


async def test_vllm_structured_outputs_regex_and_choice(router, model_dir):
    _, client = router
    common = {"model": name(model_dir), "max_tokens": 60, "temperature": 1.0}
    for seed in range(3):
        out = await client.completions.create(**common, prompt=PROMPT, seed=seed,
                                              extra_body={"structured_outputs": {"regex": r"[0-9]{2}-[a-z]{1,4}"}})
        assert re.fullmatch(r"[0-9]{2}-[a-z]{1,4}", out.choices[0].text) and out.choices[0].finish_reason == "stop"
        chat = await client.chat.completions.create(**common, messages=[{"role": "user", "content": "?"}], seed=seed,
                                                    extra_body={"structured_outputs": {"choice": ["left", "right"]}})
        assert chat.choices[0].message.content in ("left", "right")
    for bad, match in (({"regex": "(a"}, "structured_outputs: unsupported regex"),
                       ({"regex": "a", "choice": ["b"]}, "exactly one"),
                       ({"choice": []}, "non-empty")):
        with pytest.raises(openai.BadRequestError, match=match):
            await client.completions.create(**common, prompt=PROMPT, extra_body={"structured_outputs": bad})
    with pytest.raises(openai.BadRequestError, match="not both"):
        await client.completions.create(**common, prompt=PROMPT, extra_body={
            "structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}})


async def test_speculative_extra_keeps_greedy_output_and_refuses_what_is_not_served(router, model_dir):
    _, client = router
    common = {"model": name(model_dir), "max_tokens": 40, "temperature": 0.0, "prompt": PROMPT * 3}
    plain = await client.completions.create(**common)
    for spec in ({"method": "ngram", "num_tokens": 4}, {"method": "ngram"}, {"method": "off"}):
        out = await client.completions.create(**common, extra_body={"speculative": spec})
        assert out.choices[0].text == plain.choices[0].text, spec
        assert out.usage.completion_tokens == plain.usage.completion_tokens == 40
    for bad, match in (({"method": "medusa"}, "speculative.method"), ({"num_tokens": 17}, "speculative.num_tokens"),
                       ({"method": "draft"}, "speculative method 'draft' is not served here")):
        with pytest.raises(openai.BadRequestError, match=match):
            await client.completions.create(**common, extra_body={"speculative": bad})


async def test_skip_special_tokens_false_shows_special_tokens_but_never_eos(router, model_dir, tok):
    """vLLM's skip_special_tokens extra: special tokens are skipped by default; false shows them, streamed or not,
    but the EOS that ends the answer is not part of it. vLLM's spaces_between_special_tokens is not served: a 400."""
    r, client = router
    start, eos = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|end_of_text|>")
    common = dict(model=name(model_dir), prompt=PROMPT, max_tokens=3, temperature=0, logit_bias={str(start): 100})
    skipped = await client.completions.create(**common)
    assert skipped.choices[0].text == "" and skipped.usage.completion_tokens == 3
    shown = await client.completions.create(**common, extra_body={"skip_special_tokens": False})
    assert shown.choices[0].text == "<|im_start|>" * 3
    streamed = await client.completions.create(**common, stream=True, extra_body={"skip_special_tokens": False})
    assert "".join([c.choices[0].text async for c in streamed if c.choices]) == "<|im_start|>" * 3
    chat = await client.chat.completions.create(model=name(model_dir), messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2, temperature=0, logit_bias={str(start): 100},
                                                extra_body={"skip_special_tokens": False})
    assert chat.choices[0].message.content == "<|im_start|>" * 2
    ended = await client.completions.create(**{**common, "logit_bias": {str(eos): 100}},
                                            extra_body={"skip_special_tokens": False})
    assert ended.choices[0].text == "" and ended.choices[0].finish_reason == "stop"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{r.http_port}", timeout=60) as http:
        resp = await http.post("/v1/completions", json={"model": name(model_dir), "prompt": PROMPT,
                                                        "spaces_between_special_tokens": False})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "spaces_between_special_tokens"
