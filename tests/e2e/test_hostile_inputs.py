"""The hostile-request corpus (hostile_requests.py) against a real router with real prefill and decode workers:
every answer is an OpenAI-style 4xx JSON error or a correct completion (as the case expects), no worker crashes,
and afterwards no worker holds a request or a KV block."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.e2e.hostile_requests import CHAT, CMPL, DETOKENIZE, MAX_TOKENS, REFUSE, SERVE, TOKENIZE, Case, corpus
from tests.e2e.test_openai_e2e import worker_stats

pytestmark = pytest.mark.slow


def check_error(response: httpx.Response) -> str | None:
    """None when the response is an OpenAI-style JSON error, else what is wrong with it."""
    try:
        body = response.json()
    except ValueError:
        return f"error body is not JSON: {response.text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error["message"]:
        return f"not an OpenAI error object: {str(body)[:200]}"
    if not isinstance(error.get("type"), str) or "Traceback" in error["message"]:
        return f"bad error type or a traceback: {str(body)[:200]}"
    return None


def _check_choices(path: str, body: dict, n: int) -> str | None:
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) < 1:
        return f"no choices: {str(body)[:200]}"
    for choice in choices:
        text = choice.get("text") if path == CMPL else (choice.get("message") or {}).get("content")
        if not isinstance(text, str):
            return f"choice without text: {str(choice)[:200]}"
        if choice.get("finish_reason") not in ("stop", "length"):
            return f"finish_reason {choice.get('finish_reason')!r}"
    usage = body.get("usage") or {}
    if not 0 <= usage.get("completion_tokens", -1) <= MAX_TOKENS * max(n, len(choices)):
        return f"usage {usage}"
    return None


def check_served(case: Case, response: httpx.Response) -> str | None:
    """None when a 200 is a well-formed answer to the case, else what is wrong with it."""
    request = json.loads(case.body)
    n = request.get("n", 1) if isinstance(request.get("n"), int) else 1
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]":
            return f"stream does not end with [DONE]: {lines[-2:]}"
        for line in lines[:-1]:
            event = json.loads(line[6:])
            if "error" in event:
                return f"error event mid-stream: {line[:200]}"
        return None
    body = response.json()
    if case.path == TOKENIZE:
        return None if isinstance(body.get("tokens"), list) and body.get("count") == len(body["tokens"]) else \
            f"tokenize answer {str(body)[:200]}"
    if case.path == DETOKENIZE:
        return None if isinstance(body.get("prompt"), str) else f"detokenize answer {str(body)[:200]}"
    if case.path in (CMPL, CHAT):
        return _check_choices(case.path, body, n)
    return f"unexpected 200 on {case.path}"


def verdict(case: Case, response: httpx.Response) -> str | None:
    status = response.status_code
    if 400 <= status < 500:
        problem = check_error(response)
        if problem is None and case.expect == SERVE:
            problem = f"refused a request that should be served: {response.text[:200]}"
        return problem
    if status == 200:
        problem = check_served(case, response)
        if problem is None and case.expect == REFUSE:
            problem = f"served a request that must be refused: {response.text[:200]}"
        return problem
    return f"status {status}: {response.text[:200]!r}"


async def run_corpus(url: str, cases: list[Case], concurrency: int = 4) -> dict[str, str]:
    """Sends every case; returns case name -> problem for those answered wrongly."""
    problems: dict[str, str] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(case: Case) -> None:
            async with gate:
                try:
                    response = await client.request(case.method, case.path, content=case.body, headers=case.headers)
                except httpx.HTTPError as exc:
                    problems[case.name] = f"no answer: {type(exc).__name__}: {exc}"
                    return
                problem = verdict(case, response)
                if problem is not None:
                    problems[case.name] = f"{response.status_code}: {problem}"
        await asyncio.gather(*(one(case) for case in cases))
    return problems


def settled_workers(cluster, timeout_s: float = 20.0) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = worker_stats(cluster)
        if all(int(s["num_requests_running"]) == 0 and int(s["kv_blocks_used"]) == 0 for s in stats.values()) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_hostile_corpus_gets_errors_or_completions_and_leaks_nothing(cluster_1p1d):
    cluster = cluster_1p1d
    cases = corpus(cluster.model_name)
    assert len(cases) >= 200
    before = {w: s["pid"] for w, s in worker_stats(cluster).items()}
    assert len(before) == 2
    problems = asyncio.run(run_corpus(cluster.url, cases))
    assert not problems, f"{len(problems)} of {len(cases)} answered wrongly:\n" + "\n".join(
        f"  {name}: {problem}" for name, problem in sorted(problems.items()))
    after = settled_workers(cluster)
    assert {w: s["pid"] for w, s in after.items()} == before, "a worker died or was replaced during the corpus"
    for worker, s in after.items():
        assert int(s["num_requests_running"]) == 0 and int(s["kv_blocks_used"]) == 0, (worker, s)
    ok = httpx.post(f"{cluster.url}/v1/completions", timeout=60,
                    json={"model": cluster.model_name, "prompt": "still serving", "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def router_openapi(cluster) -> dict:
    """The router's own OpenAPI document, built from its app as the cluster's router runs it (the router serves
    no /openapi.json: nothing there is for clients)."""
    from baton.contracts.worker_registry import WorkerRegistry
    from baton.engine.tokenizer import Tokenizer
    from baton.router.config import RouterConfig
    from baton.router.http_server import create_app
    from baton.router.metrics import RouterMetrics
    from baton.router.service import RouterService

    config = RouterConfig(model=str(cluster.model_dir), redis_url=cluster.redis_url,
                          served_model_name=cluster.model_name)
    service = RouterService(config, Tokenizer.from_dir(cluster.model_dir), WorkerRegistry(cluster.redis_url),
                            RouterMetrics(cluster.model_name))
    return create_app(service).openapi()


def test_schemathesis_cases_from_the_routers_openapi_schema(cluster_1p1d):
    """Bodies generated from the router's schema (valid and not) get a well-formed answer, never a 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    cluster = cluster_1p1d
    schema = schemathesis.openapi.from_dict(router_openapi(cluster))
    operations = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= paths, paths
    answered: dict[str, int] = {}
    problems: list[str] = []
    for op in operations:
        @settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            if isinstance(case.body, dict) and case.path in ("/v1/completions", "/v1/chat/completions"):
                case.body["model"] = cluster.model_name  # else nearly every case stops at "model not found"
                if isinstance(case.body.get("max_tokens"), int) and case.body["max_tokens"] > 0:
                    case.body["max_tokens"] = min(case.body["max_tokens"], 8)  # keep the batch seconds long
            response = case.call(base_url=cluster.url, timeout=120)
            answered[f"{op.method.upper()} {op.path} {response.status_code}"] = \
                answered.get(f"{op.method.upper()} {op.path} {response.status_code}", 0) + 1
            if response.status_code >= 500 or (400 <= response.status_code < 500 and check_error(response)):
                problems.append(f"{op.method.upper()} {op.path} {str(case.body)[:300]} -> {response.status_code} "
                                f"{response.text[:300]}")
        check()
    assert not problems, "\n".join(problems[:20])
    assert any(k.startswith("POST /v1/completions 200") for k in answered), answered  # not only refusals
    assert any(" 400" in k for k in answered), answered
    after = settled_workers(cluster)
    for worker, s in after.items():
        assert int(s["num_requests_running"]) == 0 and int(s["kv_blocks_used"]) == 0, (worker, s)


GRPC_REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "FAILED_PRECONDITION"}


def _sampling_strategy():
    """Half plausible values (in range, so some requests get served), half anything the wire can carry."""
    from hypothesis import strategies as st

    from baton.proto.v1 import inference_pb2

    u32 = st.integers(0, 2**32 - 1)
    wild = dict(
        max_tokens=u32, temperature=st.floats(width=32), top_p=st.floats(width=32),
        top_k=st.integers(-2**31, 2**31 - 1), seed=st.integers(0, 2**64 - 1), stop=st.lists(st.text(), max_size=4),
        stop_token_ids=st.lists(u32, max_size=4), ignore_eos=st.booleans(), logprobs=st.booleans(),
        min_p=st.floats(width=32), presence_penalty=st.floats(width=32), frequency_penalty=st.floats(width=32),
        repetition_penalty=st.floats(width=32), logit_bias=st.dictionaries(u32, st.floats(width=32), max_size=4),
        min_tokens=u32, top_logprobs=u32,
        structured_output=st.builds(inference_pb2.StructuredOutput, kind=st.text(max_size=12), regex=st.text(),
                                    json_schema=st.text(), choice=st.lists(st.text(), max_size=3)))
    plausible = dict(
        max_tokens=st.integers(1, 6), temperature=st.floats(0, 2, width=32), top_p=st.floats(0, 1, width=32),
        top_k=st.integers(-1, 50), stop=st.lists(st.text(max_size=4), max_size=2),
        stop_token_ids=st.lists(st.integers(0, 511), max_size=2), ignore_eos=st.booleans(),
        logprobs=st.booleans(), min_p=st.floats(0, 1, width=32), presence_penalty=st.floats(-2, 2, width=32),
        frequency_penalty=st.floats(-2, 2, width=32), repetition_penalty=st.floats(0, 2, width=32),
        logit_bias=st.dictionaries(st.integers(0, 511), st.floats(-100, 100, width=32), max_size=3),
        min_tokens=st.integers(0, 1), top_logprobs=st.integers(0, 20),
        structured_output=st.builds(inference_pb2.StructuredOutput,
                                    kind=st.sampled_from(["", "json_object", "regex", "choice"]),
                                    regex=st.sampled_from(["[ab]{1,3}", "a*b"]),
                                    choice=st.lists(st.sampled_from(["yes", "no", "x"]), min_size=1, max_size=3)))
    return st.builds(inference_pb2.SamplingParams, **plausible) | st.builds(inference_pb2.SamplingParams, **wild)


def test_hypothesis_on_the_routers_grpc_generate(cluster_1p1d):
    """Generated GenerateRequests (any field values the wire can carry) end in a completion or a refusal status,
    never INTERNAL / UNKNOWN, and leave nothing running on the workers."""
    import grpc
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from baton.proto.v1 import inference_pb2, inference_pb2_grpc

    cluster = cluster_1p1d
    channel = grpc.insecure_channel(f"127.0.0.1:{cluster.opts.grpc_port}")
    stub = inference_pb2_grpc.InferenceStub(channel)
    text = st.text(max_size=40)
    chat = st.builds(inference_pb2.ChatMessages, messages=st.lists(st.builds(
        inference_pb2.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "wizard", ""]),
        content=text), max_size=3))
    requests = st.builds(
        inference_pb2.GenerateRequest, model=st.sampled_from([cluster.model_name] * 4 + ["", "other"]),
        sampling=_sampling_strategy(), request_id=st.sampled_from(["", "dup", "x" * 300]),
        **{"text": text}) | st.builds(
        inference_pb2.GenerateRequest, model=st.just(cluster.model_name), sampling=_sampling_strategy(),
        token_ids=st.builds(inference_pb2.TokenIds, ids=st.lists(st.integers(0, 2**32 - 1), max_size=30))) | \
        st.builds(inference_pb2.GenerateRequest, model=st.just(cluster.model_name), sampling=_sampling_strategy(),
                  chat=chat)
    outcomes: dict[str, int] = {}
    problems: list[str] = []

    @settings(max_examples=80, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(request=requests)
    def check(request):
        try:
            chunks = list(stub.Generate(request, timeout=60))
            outcome = "OK"
            last = chunks[-1] if chunks else None
            if last is None or last.finish_reason == inference_pb2.FINISH_REASON_UNSPECIFIED:
                problems.append(f"stream ended without a finish reason: {request}")
        except grpc.RpcError as exc:
            outcome = exc.code().name
            if outcome not in GRPC_REFUSALS or not exc.details():
                problems.append(f"{outcome} {exc.details()!r} for {str(request)[:400]}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    try:
        check()
    finally:
        channel.close()
    assert not problems, "\n".join(problems[:10])
    assert outcomes.get("OK", 0) > 0 and outcomes.get("INVALID_ARGUMENT", 0) > 0, outcomes
    after = settled_workers(cluster)
    for worker, s in after.items():
        assert int(s["num_requests_running"]) == 0 and int(s["kv_blocks_used"]) == 0, (worker, s)
