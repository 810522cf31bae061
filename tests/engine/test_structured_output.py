"""Structured output: at temperature 1 a random-weight model's output parses and validates, because the engine
masks every token the grammar forbids; the first token obeys too when another engine prefilled it."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from baton.devtools.make_model import make_model
from baton.engine.config import EngineConfig
from baton.engine.errors import InvalidRequestError
from baton.engine.grammar import StructuredOutput
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams

SCHEMAS = [
    {"type": "object", "properties": {
        # Not maxLength: xgrammar 0.2.9's bounded-length string rule admits raw control characters (mlc-ai/xgrammar#800).
        "name": {"type": "string", "pattern": "^[a-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"}},
     "required": ["name", "age", "tags", "ok"], "additionalProperties": False},
    {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["id"], "additionalProperties": False}},
    {"enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"inner": {
        "type": "object", "properties": {"flag": {"type": "boolean"}, "n": {"type": "null"},
                                         "x": {"type": "number", "minimum": -1.5, "maximum": 2.5}},
        "required": ["flag", "n", "x"], "additionalProperties": False}},
     "required": ["inner"], "additionalProperties": False},
]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_model(tmp_path_factory.mktemp("so") / "llama", seed=5))


def new_engine(model_dir, **kw) -> LLMEngine:
    kw.setdefault("num_kv_blocks", 256)
    return LLMEngine(EngineConfig(model_dir, show_progress=False, **kw))


def constrained(schema: dict | None, seed: int, max_tokens: int = 300) -> SamplingParams:
    spec = StructuredOutput("json_object") if schema is None else StructuredOutput("json_schema", json.dumps(schema))
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, structured_output=spec)


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_output_validates_against_the_schema_at_temperature_1(model_dir, index):
    engine = new_engine(model_dir)
    schema = SCHEMAS[index]
    seqs = engine.generate([[5, 6, 7, 8]] * len(SEEDS), [constrained(schema, s) for s in SEEDS])
    for seq in seqs:
        text = engine.tokenizer.decode(seq.output_ids)
        assert seq.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert engine.stats().blocks.in_use == 0


@pytest.mark.parametrize("regex", [r"[0-9]{3}-[a-z]{2,5}", r"(yes|no)!", r"[A-Z][a-z]{1,6} [0-9]{1,3}\.[0-9]"])
def test_output_fully_matches_a_regex(model_dir, regex):
    engine = new_engine(model_dir)
    spec = StructuredOutput("regex", regex=regex)
    seqs = engine.generate([[5, 6, 7]] * len(SEEDS), [SamplingParams(max_tokens=60, temperature=1.0, seed=s,
                                                                     structured_output=spec) for s in SEEDS])
    for seq in seqs:
        text = engine.tokenizer.decode(seq.output_ids)
        assert seq.finish_reason == "stop" and re.fullmatch(regex, text), text


def test_output_is_one_of_the_choices(model_dir):
    engine = new_engine(model_dir)
    choices = ("alpha", "beta gamma", 'quote " and \\ backslash')
    spec = StructuredOutput("choice", choices=choices)
    seqs = engine.generate([[5, 6, 7]] * 6, [SamplingParams(max_tokens=60, temperature=1.0, seed=s,
                                                            structured_output=spec) for s in range(6)])
    for seq in seqs:
        assert seq.finish_reason == "stop" and engine.tokenizer.decode(seq.output_ids) in choices


def test_unconstrained_output_is_not_json(model_dir):
    """The control: the same model and seeds without a grammar produce no JSON, so the mask did the work."""
    engine = new_engine(model_dir)
    seqs = engine.generate([[5, 6, 7, 8]] * len(SEEDS), [SamplingParams(max_tokens=40, temperature=1.0, seed=s)
                                                           for s in SEEDS])
    for seq in seqs:
        with pytest.raises(ValueError):
            json.loads(engine.tokenizer.decode(seq.output_ids))


def test_json_object_gives_an_object(model_dir):
    engine = new_engine(model_dir)
    seqs = engine.generate([[9, 10]] * len(SEEDS), [constrained(None, s, max_tokens=400) for s in SEEDS])
    for seq in seqs:
        text = engine.tokenizer.decode(seq.output_ids)
        assert seq.finish_reason == "stop", text
        assert isinstance(json.loads(text), dict)


def test_greedy_and_biased_rows_obey_the_grammar_in_a_mixed_batch(model_dir):
    engine = new_engine(model_dir)
    schema = SCHEMAS[2]
    json_ids = engine.tokenizer.encode('"red"', add_special_tokens=False)
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, structured_output=StructuredOutput("json_schema",
                                                                                           json.dumps(schema))),
        SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True),  # unconstrained neighbour
        # A bias may not lift a forbidden token: "{" can never start a string enum.
        SamplingParams(max_tokens=20, temperature=1.0, seed=4, logit_bias={engine.tokenizer.token_to_id("{"): 100.0},
                       structured_output=StructuredOutput("json_schema", json.dumps(schema))),
    ]
    seqs = engine.generate([[3, 4, 5]] * 3, params)
    assert len(seqs[1].output_ids) == 20
    for seq in (seqs[0], seqs[2]):
        assert json.loads(engine.tokenizer.decode(seq.output_ids)) in schema["enum"]
    assert json_ids  # the enum's strings are in the vocabulary at all


def test_preempted_requests_keep_their_grammar_state(model_dir):
    """A preempted request recomputes its tokens but keeps its matcher: outputs still validate, and equal the
    outputs of the same seeds in a pool large enough for all."""
    schema = SCHEMAS[1]
    prompts = [list(range(3 + i, 40 + 7 * i)) for i in range(6)]
    params = [constrained(schema, s, max_tokens=100) for s in range(6)]
    small = new_engine(model_dir, num_kv_blocks=12, max_num_batched_tokens=128)
    got = [s.output_ids for s in small.generate(prompts, params)]
    assert small.stats().preemptions > 0, "the pool was meant to be too small for all requests at once"
    for ids in got:
        jsonschema.validate(json.loads(small.tokenizer.decode(ids)), schema)
    assert got == [new_engine(model_dir).generate([p], q)[0].output_ids for p, q in zip(prompts, params)]


def test_max_tokens_mid_json_is_length(model_dir):
    engine = new_engine(model_dir)
    seq = engine.generate([[5, 6, 7]], constrained(SCHEMAS[0], 0, max_tokens=5))[0]
    assert seq.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(engine.tokenizer.decode(seq.output_ids))


@pytest.mark.parametrize("seed", SEEDS)
def test_prefill_on_a_then_decode_on_b_obeys_the_grammar(model_dir, seed):
    a, b = new_engine(model_dir), new_engine(model_dir)
    schema = SCHEMAS[0]
    prompt = list(range(3, 40))
    params = constrained(schema, seed)
    a.add_request("r", prompt, params, prefill_only=True)
    first = None
    while first is None:
        first = next((o for o in a.step() if o.request_id == "r"), None)
    assert a.tokenizer.decode(first.new_token_ids) == "{"  # the prefill worker's own sample is masked
    reservation = b.reserve_remote("r", prompt, params)
    b.kv_cache[reservation.block_ids] = a.kv_cache[first.block_ids]
    a.release("r")
    out = b.commit_remote("r", first.new_token_ids[0], first.new_logprobs[0])
    tokens, reason = list(out.new_token_ids), out.finish_reason
    while b.has_unfinished():
        for out in b.step():
            tokens += out.new_token_ids
            reason = out.finish_reason or reason
    assert reason == "stop"
    jsonschema.validate(json.loads(b.tokenizer.decode(tokens)), schema)


def test_a_first_token_that_breaks_the_grammar_ends_the_request(model_dir):
    b = new_engine(model_dir)
    prompt = list(range(3, 20))
    b.reserve_remote("r", prompt, constrained(SCHEMAS[0], 0))
    out = b.commit_remote("r", b.tokenizer.token_to_id("x"))
    assert out.finished and out.finish_reason == "error"
    assert b.stats().blocks.in_use == 0


@pytest.mark.parametrize("schema", ['{"type": "object"', '{"type": "foo"}', '{"$ref": "#/nowhere"}', '[1, 2]',
                                    '{"type": "string", "pattern": "("}'])
def test_a_bad_schema_is_an_invalid_request(schema):
    with pytest.raises(InvalidRequestError, match="schema"):
        StructuredOutput("json_schema", schema)


def test_an_unknown_kind_a_bad_regex_or_no_choices_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="kind"):
        StructuredOutput("lark", "start: A")
    with pytest.raises(InvalidRequestError, match="regex.*parenthesis"):
        StructuredOutput("regex", regex="(ab")
    for choices in ((), ("",)):
        with pytest.raises(InvalidRequestError, match="choice"):
            StructuredOutput("choice", choices=choices)
