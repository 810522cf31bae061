"""2 prefill + 2 decode workers: load spreads, a killed prefill worker is retried around (a killed decode
worker's streams migrate: test_migration.py)."""
from __future__ import annotations

import asyncio
import os
import signal

import openai
import pytest

from tests.e2e.conftest import start_cluster
from tests.e2e.test_openai_e2e import LONG, worker_stats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster_2p2d(e2e_model_dir, tmp_path_factory):
    cluster = start_cluster(e2e_model_dir, tmp_path_factory.mktemp("up22"), prefill=2, decode=2,
                            local_prefill_threshold=16, routing="least_load")
    yield cluster
    cluster.stop()


async def _many(cluster, n, max_tokens=8):
    async with openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        async def one(i):
            r = await c.completions.create(model=cluster.model_name, prompt=f"{i} {LONG}", max_tokens=max_tokens,
                                           temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].text
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_load_is_spread_over_2p2d(cluster_2p2d):
    texts = asyncio.run(_many(cluster_2p2d, 16))
    assert all(texts)
    stats = worker_stats(cluster_2p2d)
    by_pool = {"prefill": [], "decode": []}
    for s in stats.values():
        by_pool[s["pool"]].append(s)
    assert len(by_pool["prefill"]) == 2 and len(by_pool["decode"]) == 2
    assert all(int(s["prompt_tokens_computed_total"]) > 0 for s in by_pool["prefill"]), by_pool["prefill"]
    assert all(int(s["generation_tokens_total"]) > 0 for s in by_pool["decode"]), by_pool["decode"]


def test_killed_prefill_worker_is_retried_around(cluster_2p2d):
    stats = worker_stats(cluster_2p2d)
    victim = next(w for w, s in stats.items() if s["pool"] == "prefill")
    os.kill(int(stats[victim]["pid"]), signal.SIGKILL)
    texts = asyncio.run(_many(cluster_2p2d, 6))  # the registry still lists the dead worker for a while
    assert all(texts)
