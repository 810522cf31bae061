"""Router ↔ control plane through a real Redis: traffic signals out, spillover shares in."""
from __future__ import annotations

import asyncio
import json
import random
import time

import redis.asyncio as aioredis

from baton.contracts.keys import spillover_key
from baton.contracts.worker_registry import WorkerRecord
from baton.controlplane.signals import SignalReader
from baton.router.config import RouterConfig
from baton.router.dispatch import Dispatcher
from baton.router.metrics import RouterMetrics
from baton.router.traffic import Traffic


def test_signals_reach_the_control_plane_reader(redis_url):
    async def scenario():
        traffic = Traffic(redis_url, "us-east", "m", "router-1")
        for _ in range(4):
            traffic.first_token(prompt_tokens=100, ttft_s=0.2)
            traffic.tokens(1, None)
            traffic.tokens(9, 0.05)
        await traffic.prefill.flush()
        await traffic.decode.flush()
        client = aioredis.Redis.from_url(redis_url)
        reader = SignalReader(client)
        windows = await reader.windows([("m", "us-east", "prefill"), ("m", "us-east", "decode")],
                                       now=time.time(), window_s=20, stale_after_s=30)
        entries = {pool: await reader.entries("us-east", pool, since=0) for pool in ("prefill", "decode")}
        await client.aclose()
        await traffic.stop()
        return windows, entries

    windows, entries = asyncio.run(scenario())
    prefill, decode = windows[("m", "us-east", "prefill")], windows[("m", "us-east", "decode")]
    assert prefill.prompt_tokens_per_s > 0 and prefill.ttft_p90_s == 0.2
    assert decode.output_tokens_per_s > 0 and decode.itl_p90_s == 0.05
    (p,), (d,) = entries["prefill"], entries["decode"]
    assert (p.requests, p.prompt_tokens, p.output_tokens) == (4, 400, 0)
    assert (d.requests, d.output_tokens, len(d.itl_s)) == (4, 40, 36)


class _Registry:
    def __init__(self, workers):
        self._workers = workers

    def workers(self, pool=None):
        return [w for w in self._workers if pool is None or w.pool == pool]

    def add_listener(self, listener):
        pass


def test_spillover_shares_send_that_fraction_to_the_other_region(redis_url, tmp_path):
    from baton.devtools.make_model import make_model

    model_dir = make_model(tmp_path / "m", vocab=300)
    workers = [WorkerRecord(f"{r}-{p}", p, f"127.0.0.1:{i + 1}", "m", region=r)
               for i, (r, p) in enumerate([("us-east", "decode"), ("us-east", "prefill"), ("eu-west", "decode")])]

    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        traffic = Traffic(redis_url, "us-east", "m", "router-1", rng=random.Random(3))
        dispatcher = Dispatcher(RouterConfig(model=str(model_dir), served_model_name="m"), _Registry(workers),
                                RouterMetrics(), traffic=traffic)
        before = [w.region for w in dispatcher._in_region(workers)]
        await client.hset(spillover_key("m"), "us-east", json.dumps({"eu-west": 0.25}))
        await traffic.refresh_spill()
        regions = [dispatcher._in_region(workers)[0].region for _ in range(2000)]
        await client.delete(spillover_key("m"))
        await traffic.refresh_spill()
        after = {w.region for w in dispatcher._in_region(workers)}
        await traffic.stop()
        await client.aclose()
        return before, regions, after

    before, regions, after = asyncio.run(scenario())
    assert set(before) == {"us-east"}  # own region only, though eu-west has workers
    assert 0.2 < regions.count("eu-west") / len(regions) < 0.3
    assert after == {"us-east"}  # drained back once the control plane removed the share
