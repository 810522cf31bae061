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
