"""`baton up`'s default model, SmolLM2-135M-Instruct (fetched and converted into the cache on first use), served by a
real 1 prefill + 1 decode cluster and asked through the official openai client: the chat template is applied, the
answer is right, and generation stops at <|im_end|>."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from baton.devtools.fetch_model import DEFAULT_MODEL
from baton.engine.tokenizer import Tokenizer
from tests.e2e.conftest import start_cluster

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # A threshold under the prompt's length: the prefill worker runs it and hands its KV blocks to decode.
    cluster = start_cluster(DEFAULT_MODEL, tmp_path_factory.mktemp("smollm2"), prefill=1, decode=1,
                            local_prefill_threshold=8)
    yield cluster
    cluster.stop()


def test_default_model_answers_through_the_chat_template_and_stops_at_im_end(cluster):
    assert cluster.model_name == "SmolLM2-135M-Instruct"
    tok = Tokenizer.from_dir(cluster.model_dir)
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none")
    resp = client.chat.completions.create(model=cluster.model_name, messages=QUESTION, max_tokens=48, temperature=0)
    answer = resp.choices[0].message.content
    assert "Paris" in answer, answer
    assert resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens < 48
    assert "<|im_end|>" not in answer and "<|im_start|>" not in answer
    # The template's default system line is part of the prompt.
    prompt = tok.apply_chat_template(QUESTION)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert resp.usage.prompt_tokens == len(tok.encode_chat(QUESTION))

    # The same prompt as raw text: generation ends on <|im_end|> (the eos id), which is not part of the text.
    raw = client.completions.create(model=cluster.model_name, prompt=prompt, max_tokens=48, temperature=0)
    assert raw.choices[0].text == answer and raw.choices[0].finish_reason == "stop"
    assert tok.token_to_id("<|im_end|>") in tok.eos_token_ids


REAL_SCHEMAS = [
    {"type": "object", "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action"]}, "minItems": 1, "maxItems": 3},
        "rating": {"type": "number", "minimum": 0, "maximum": 10}},
     "required": ["title", "year", "genres", "rating"], "additionalProperties": False},
    {"type": "array", "minItems": 1, "maxItems": 4, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1}, "done": {"type": "boolean"}},
        "required": ["id", "done"], "additionalProperties": False}},
    {"type": "object", "properties": {"person": {
        "type": "object", "properties": {"name": {"type": "string"}, "nick": {"type": "null"}},
        "required": ["name", "nick"], "additionalProperties": False}},
     "required": ["person"], "additionalProperties": False},
]


@pytest.mark.parametrize("index", range(len(REAL_SCHEMAS)))
def test_response_format_validates_with_remote_and_local_prefill(cluster, index):
    """The chat prompt is over the local-prefill threshold (the prefill worker samples the first token); the short
    completions prompt is under it (the decode worker prefills)."""
    from concurrent.futures import ThreadPoolExecutor

    schema = REAL_SCHEMAS[index]
    fmt = {"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema}}
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none")

    def chat(seed: int) -> tuple[str, str]:
        out = client.chat.completions.create(model=cluster.model_name, messages=[
            {"role": "user", "content": "Reply with JSON."}], max_tokens=200, temperature=1.0, seed=seed,
            response_format=fmt).choices[0]
        return out.finish_reason, out.message.content

    def raw(seed: int) -> tuple[str, str]:
        out = client.completions.create(model=cluster.model_name, prompt="JSON:", max_tokens=200, temperature=1.0,
                                        seed=seed, extra_body={"response_format": fmt}).choices[0]
        return out.finish_reason, out.text

    # All at once: the decode worker batches them (constrained rows beside each other), as a server would.
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda call: call[0](call[1]), [(f, seed) for seed in range(3) for f in (chat, raw)]))
    for finish, text in answers:
        assert finish == "stop"
        jsonschema.validate(json.loads(text), schema)


REAL_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "book_flight", "description": "Book a flight",
                                      "parameters": {"type": "object", "properties": {
                                          "to": {"type": "string"},
                                          "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                                          "seat": {"type": "object", "properties": {
                                              "row": {"type": "integer", "minimum": 1, "maximum": 40},
                                              "window": {"type": "boolean"}},
                                              "required": ["row", "window"], "additionalProperties": False},
                                          "meals": {"type": "array", "items": {"enum": ["veg", "fish"]},
                                                    "maxItems": 2}},
                                          "required": ["to", "passengers", "seat"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", "get_weather", "book_flight"])
def test_tool_calls_validate_from_the_openai_client(cluster, choice, stream):
    """SmolLM2's template ignores `tools`, so they reach the prompt as a Hermes-style system prompt; with
    tool_choice "required" or a named function every call's arguments validate, at temperature 1."""
    from baton.router.tool_calls import template_renders_tools
    from tests.e2e.tool_calls_client import ask

    tok = Tokenizer.from_dir(cluster.model_dir)
    assert not template_renders_tools(tok)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in REAL_TOOLS}
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="none")
    messages = [{"role": "user", "content": "What is the weather in Paris? Then book me a flight to Rome."}]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # at once: the decode worker batches them
        answers = list(pool.map(lambda seed: ask(client, cluster.model_name, messages, REAL_TOOLS, choice, stream,
                                                 seed=seed), range(2)))
    for calls, finish, content in answers:
        assert finish == "tool_calls" and calls and content is None
        for call in calls:
            assert choice == "required" or call["name"] == choice
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
