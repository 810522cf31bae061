"""Admission on KV capacity on a real cluster (1 prefill + 2 decode workers) whose decode workers hold one long
request each: concurrent long requests either complete or get 429 with Retry-After (never a 503), and no KV
block is left in use afterwards."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import start_cluster

pytestmark = pytest.mark.slow
BLOCKS, PROMPT_TOKENS, MAX_TOKENS = 32, 300, 40  # a request needs 22 of a worker's 32 blocks: one fits at a time


@pytest.fixture(scope="module")
def tiny_pool_cluster(e2e_model_dir, tmp_path_factory):
    c = start_cluster(e2e_model_dir, tmp_path_factory.mktemp("kvcap"), prefill=1, decode=2, routing="least_load",
                      local_prefill_threshold=16, num_kv_blocks=BLOCKS)
    yield c
    c.stop()


def _decode_stats(cluster) -> list[dict]:
    return [httpx.get(f"http://{r.http_address}/stats", timeout=5).json()
            for r in cluster.workers() if r.pool == "decode"]


def _request(cluster, i: int) -> httpx.Response:
    prompt = [(7 * i + j) % 500 + 3 for j in range(PROMPT_TOKENS)]
    return httpx.post(f"{cluster.url}/v1/completions", timeout=120, json={
        "model": cluster.model_name, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True})


def test_full_decode_workers_answer_429_with_retry_after_not_503(tiny_pool_cluster):
    cluster = tiny_pool_cluster
    assert {int(s["kv_blocks_total"]) for s in _decode_stats(cluster)} == {BLOCKS}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: _request(cluster, i), range(12)))
    outcomes = {"ok": 0, "429": 0}
    for r in responses:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS
            outcomes["ok"] += 1
            continue
        assert r.status_code == 429, (r.status_code, r.text)
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "capacity", error
        outcomes["429"] += 1
    # How many of the 12 fit at once depends on timing (two 32-block workers): at least one completes, some wait.
    assert outcomes["ok"] >= 1 and outcomes["429"] >= 1, outcomes
    deadline = time.monotonic() + 10
    while any(int(s["kv_blocks_used"]) for s in _decode_stats(cluster)):
        assert time.monotonic() < deadline, f"decode workers still hold KV blocks: {_decode_stats(cluster)}"
        time.sleep(0.2)
    # Once the load is gone, a request the cluster refused completes.
    assert _request(cluster, 0).status_code == 200
