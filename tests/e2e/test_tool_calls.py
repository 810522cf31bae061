"""Tool calls through a `baton up` cluster (1 prefill + 1 decode worker, a random-weight Qwen2-style model whose chat
template renders `tools`) and the official openai client: with tool_choice "required" or a named function the
engine's grammar makes every call's arguments validate, at temperature 1, streamed or not, whether the prefill
worker (a long prompt) or the decode worker itself (a short one) ran the prompt and sampled the first token. A second
cluster serves the model with <tool_call> / </tool_call> as special tokens, as Hermes models hold them: "auto" calls
written with those tokens are parsed, while other special tokens stay out of the content."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
import redis

from baton.devtools.make_model import make_model
from baton.engine.tokenizer import Tokenizer
from tests.e2e import tool_calls_client
from tests.e2e.conftest import start_cluster
from tests.engine.checkpoints import add_special_tokens

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
    "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}
BOOKING = {"type": "object", "properties": {
    "guests": {"type": "integer", "minimum": 1, "maximum": 9},
    "price": {"type": "number", "minimum": 0, "maximum": 99.5},
    "when": {"type": "object", "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 31},
                                              "late": {"type": "boolean"}},
             "required": ["day", "late"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"enum": ["quiet", "view"]}, "maxItems": 2}},
    "required": ["guests", "price", "when", "tags"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "book_table": BOOKING}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": schema}}
         for name, schema in SCHEMAS.items()]
SHORT = [{"role": "user", "content": "Book a table with a view."}]
SEEDS = [0, 1, 2]


def tools_model(tmp_path_factory, name: str):
    return make_model(tmp_path_factory.mktemp(name) / f"{name}-qwen2", arch="qwen2", layers=2, hidden=64, heads=4,
                      kv_heads=2, vocab=512, max_position=2048, seed=23)


def threshold_for(tok) -> int:
    """Over the short prompt with its tools: that one prefills on the decode worker, a longer one remotely."""
    return len(tok.encode_chat(SHORT, tools=TOOLS)) + 16


def serve(model_dir, threshold: int, tmp_path_factory, name: str):
    cluster = start_cluster(model_dir, tmp_path_factory.mktemp(f"{name}-up"), prefill=1, decode=1,
                            local_prefill_threshold=threshold)
    try:
        yield cluster
    finally:
        cluster.stop()


def client_for(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tools_model(tmp_path_factory, "tools")


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def threshold(tok):
    return threshold_for(tok)


@pytest.fixture(scope="module")
def cluster(model_dir, threshold, tmp_path_factory):
    yield from serve(model_dir, threshold, tmp_path_factory, "tools")


@pytest.fixture(scope="module")
def client(cluster):
    return client_for(cluster)


def long_messages(tok, threshold: int, tag: str) -> list[dict]:
    """A user turn longer than the threshold on its own, unique per `tag` so no worker has it cached."""
    filler = f"Request {tag}: please plan the evening carefully. "
    n = (threshold + 32) // len(tok.encode(filler, add_special_tokens=False)) + 1
    return [{"role": "user", "content": filler * n}]


def prefill_worker_prompt_tokens(cluster) -> float:
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    for key in r.scan_iter(match="baton:worker:*"):
        rec = r.hgetall(key)
        if rec["pool"] == "prefill":
            text = httpx.get(f"http://{rec['http_address']}/metrics", timeout=5).text
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("baton_worker_prompt_tokens_total"))
    raise AssertionError("no prefill worker registered")


def ask(client, cluster, messages, choice: str, seed: int, stream: bool, **kw) -> tuple[list[dict], str, str | None]:
    return tool_calls_client.ask(client, cluster.model_name, messages, TOOLS, choice, stream, seed=seed, **kw)


def check_calls(calls: list[dict], choice: str) -> None:
    assert calls, "no tool call"
    if choice != "required":
        assert [c["name"] for c in calls] == [choice]
    assert len({c["id"] for c in calls}) == len(calls)
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "get_weather", "book_table"])
def test_required_and_named_calls_validate_with_remote_and_local_prefill(client, cluster, tok, threshold, choice,
                                                                         stream):
    for seed in SEEDS:
        for remote in (True, False):
            before = prefill_worker_prompt_tokens(cluster)
            messages = long_messages(tok, threshold, f"{choice}-{stream}-{seed}") if remote else SHORT
            calls, finish, content = ask(client, cluster, messages, choice, seed, stream,
                                         parallel_tool_calls=seed != 0)
            assert finish == "tool_calls" and content is None
            check_calls(calls, choice)
            if seed == 0:
                assert len(calls) == 1  # parallel_tool_calls false
            ran_remote = prefill_worker_prompt_tokens(cluster) > before
            assert ran_remote == remote


@pytest.mark.parametrize("stream", [False, True])
def test_every_choice_of_n_gets_its_own_calls(client, cluster, stream):
    args = {"model": cluster.model_name, "messages": SHORT, "tools": TOOLS, "tool_choice": "required", "n": 2,
            "seed": 5, "temperature": 1.0, "max_tokens": 300, "parallel_tool_calls": False}
    if not stream:
        choices = client.chat.completions.create(**args).choices
        got = {c.index: (c.finish_reason, [(t.function.name, t.function.arguments) for t in c.message.tool_calls])
               for c in choices}
    else:
        got = {}
        for chunk in client.chat.completions.create(stream=True, **args):
            for c in chunk.choices:
                finish, calls = got.setdefault(c.index, [None, []])
                for d in c.delta.tool_calls or []:
                    if d.id is not None:
                        calls.append([d.function.name, d.function.arguments])
                    else:
                        calls[d.index][1] += d.function.arguments
                got[c.index][0] = c.finish_reason or finish
    assert sorted(got) == [0, 1]
    for finish, calls in got.values():
        assert finish == "tool_calls" and len(calls) == 1
        jsonschema.validate(json.loads(calls[0][1]), SCHEMAS[calls[0][0]])


def test_tools_reach_the_prompt_through_the_chat_template(client, cluster, tok):
    """auto: the template renders the tools; a random model calls none, so its text is the content. none: the tools
    are left out of the prompt."""
    for choice, tools in (("auto", TOOLS), ("none", None)):
        resp = client.chat.completions.create(model=cluster.model_name, messages=SHORT, tools=TOOLS, tool_choice=choice,
                                              max_tokens=8, temperature=0)
        assert resp.usage.prompt_tokens == len(tok.encode_chat(SHORT, tools=tools))
        assert resp.choices[0].message.tool_calls is None and resp.choices[0].message.content
        assert resp.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_mid_json_is_length_not_a_call(client, cluster, stream):
    calls, finish, content = ask(client, cluster, SHORT, "book_table", 0, stream, max_tokens=4)
    assert finish == "length"
    if not stream:  # streamed, the first fragments are out already; whole, a cut call is no call
        assert calls == [] and content
        with pytest.raises(ValueError):
            json.loads(content)


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_cut_by_max_tokens_is_length(client, cluster, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "booking", "schema": BOOKING}}
    args = {"model": cluster.model_name, "messages": SHORT, "response_format": fmt, "max_tokens": 4, "seed": 0,
            "temperature": 1.0}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **args))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        resp = client.chat.completions.create(**args)
        text, finish = resp.choices[0].message.content, [resp.choices[0].finish_reason]
    assert finish == ["length"] and text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("body,param,message", [
    ({"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice",
     "'fly', which is not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]}, "tools",
     r"tools\[0\].function.parameters \(f\)"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}]}, "tools",
     "parameters"),
    ({"tools": None, "tool_choice": "auto"}, "tool_choice", "only allowed when tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "tools.0.type"),
    ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice", "constrains the output"),
])
def test_bad_tools_are_a_400_naming_the_problem(cluster, body, param, message):
    payload = {"model": cluster.model_name, "messages": SHORT, "tools": TOOLS, **body}
    resp = httpx.post(f"{cluster.url}/v1/chat/completions", json={k: v for k, v in payload.items() if v is not None},
                      timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert re.search(message, error["message"]), error["message"]


MARKERS = ("<tool_call>", "</tool_call>")


@pytest.fixture(scope="module")
def marker_model_dir(tmp_path_factory):
    return add_special_tokens(tools_model(tmp_path_factory, "markers"), MARKERS, seed=23)


@pytest.fixture(scope="module")
def marker_tok(marker_model_dir):
    return Tokenizer.from_dir(marker_model_dir)


@pytest.fixture(scope="module")
def marker_threshold(marker_tok):
    return threshold_for(marker_tok)


@pytest.fixture(scope="module")
def marker_cluster(marker_model_dir, marker_threshold, tmp_path_factory):
    yield from serve(marker_model_dir, marker_threshold, tmp_path_factory, "markers")


@pytest.fixture(scope="module")
def marker_client(marker_cluster):
    return client_for(marker_cluster)


# A Hermes call after an <|im_start|>, each tag one special token (logit_bias picks it over spelling the tag out in
# plain tokens, which the grammar allows too); the grammar then leaves only EOS (<|im_end|> or <|end_of_text|>).
HERMES_CALL = (r'<\|im_start\|><tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,8}", '
               r'"unit": "[cf]"\}\}\n</tool_call>')


def marker_request(tok, messages, stream: bool, **kw) -> dict:
    bias = {str(tok.token_to_id(t)): 100 for t in ("<|im_start|>", *MARKERS)}
    return {"messages": messages, "stream": stream, "temperature": 1.0, "seed": 3, "max_tokens": 100,
            "logprobs": True, "logit_bias": bias, "extra_body": {"structured_outputs": {"regex": HERMES_CALL}}, **kw}


def answer(client, cluster, args: dict) -> tuple[str | None, list[dict], str, list[str]]:
    """(content, calls as {"name", "arguments"}, finish_reason, the sampled tokens' strings from logprobs)."""
    if not args["stream"]:
        choice = client.chat.completions.create(model=cluster.model_name, **args).choices[0]
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason, [t.token for t in choice.logprobs.content]
    content, calls, finish, tokens = "", [], None, []
    for chunk in client.chat.completions.create(model=cluster.model_name, **args):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                if d.id is not None:
                    calls.append({"name": d.function.name, "arguments": d.function.arguments or ""})
                else:
                    calls[d.index]["arguments"] += d.function.arguments
            tokens += [t.token for t in (c.logprobs.content if c.logprobs else None) or []]
            finish = c.finish_reason or finish
    return content or None, calls, finish, tokens


@pytest.mark.parametrize("stream", [False, True])
def test_auto_calls_written_with_special_marker_tokens_are_parsed(marker_client, marker_cluster, marker_tok,
                                                                  marker_threshold, stream):
    """The markers reach the parser although they are special tokens; <|im_start|> and the closing EOS, special
    tokens too, do not reach the content (it would hold them: the parser keeps text around calls)."""
    for remote in (True, False):
        before = prefill_worker_prompt_tokens(marker_cluster)
        messages = long_messages(marker_tok, marker_threshold, f"markers-{stream}") if remote else SHORT
        content, calls, finish, tokens = answer(marker_client, marker_cluster,
                                                marker_request(marker_tok, messages, stream, tools=TOOLS))
        assert tokens[:2] == ["<|im_start|>", "<tool_call>"] and "</tool_call>" in tokens  # one token each
        assert tokens[-1] in ("<|im_end|>", "<|end_of_text|>")
        assert content is None and finish == "tool_calls"
        assert [c["name"] for c in calls] == ["get_weather"]
        jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)
        assert (prefill_worker_prompt_tokens(marker_cluster) > before) == remote


@pytest.mark.parametrize("stream", [False, True])
def test_without_tools_special_tokens_stay_skipped_unless_asked(marker_client, marker_cluster, marker_tok, stream):
    """The same tokens without tools (or with tool_choice "none") are plain content: every special token skipped;
    with skip_special_tokens false all of them show but EOS."""
    for tools in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        content, calls, finish, tokens = answer(marker_client, marker_cluster,
                                                marker_request(marker_tok, SHORT, stream, **tools))
        assert tokens[:2] == ["<|im_start|>", "<tool_call>"] and calls == [] and finish == "stop"
        assert content.startswith('\n{"name": "get_weather"') and content.endswith("}}\n")
        assert "<" not in content
    args = marker_request(marker_tok, SHORT, stream)
    args["extra_body"]["skip_special_tokens"] = False
    content, calls, _, _ = answer(marker_client, marker_cluster, args)
    assert content.startswith('<|im_start|><tool_call>\n{"name": "get_weather"')
    assert content.endswith("}}\n</tool_call>") and calls == []
