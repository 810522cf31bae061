"""Multi-cluster: region A saturates -> replicas in B and spillover weights in real Redis; A recovers -> drain.

Clusters are LocalBackends running real (sleeping) processes; signals go through a real Redis stream.
"""
from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis

from baton.contracts.signals import SignalPublisher
from baton.controlplane.backends.local import LocalBackend
from baton.controlplane.policy import parse_policy
from baton.controlplane.service import ControlPlane
from baton.controlplane.signals import SignalReader
from tests.controlplane.conftest import sleeper

POLICY = """\
tick_s: 1
signals: {{window_s: 10, stale_after_s: 10}}
clusters:
  - {{name: a1, region: a, backend: local, gpus: {gpus_a}}}
  - {{name: b1, region: b, backend: local, gpus: 8}}
models:
  - name: m
    regions:
      a: &r
        prefill: {{min_replicas: 1, capacity_tokens_per_s: 1000, target_utilization: 1.0, ttft_p90_ms: 1000,
                  startup_s: 0, scale_up: {{max_step: 10}}}}
        decode: {{min_replicas: 0, capacity_tokens_per_s: 1000, itl_p90_ms: 100, startup_s: 0}}
      b: *r
spillover:
  - {{from: a, to: [b], max_share: 0.5}}
"""


async def _publish(client, now, region, prompt_tokens):
    """Requests of 100 prompt tokens over the last 10 s: hundreds a window, so the planner's forecast band for
    sampling noise is a few percent."""
    pub = SignalPublisher(client, region, "prefill", "m", f"router-{region}", _last=now - 10)
    for _ in range(prompt_tokens // 100):
        pub.record_request(prompt_tokens=100)
    pub.record_ttft(0.2)
    await pub.flush(now=now)


def test_signal_windows_from_redis(redis_url):
    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        pub = SignalPublisher(client, "a", "decode", "m", "w1", _last=90.0)
        pub.record_request(prompt_tokens=100, output_tokens=500)
        for s in (0.01, 0.02, 0.03, 0.5):
            pub.record_itl(s)
        pub.set_kv_utilization(0.4)
        await pub.flush(now=100.0)
        reader = SignalReader(client)
        fresh = await reader.windows([("m", "a", "decode"), ("m", "b", "decode")], 105.0, 20.0, 10.0)
        stale = await reader.windows([("m", "a", "decode")], 200.0, 20.0, 10.0)
        await client.aclose()
        return fresh, stale

    fresh, stale = asyncio.run(scenario())
    w = fresh[("m", "a", "decode")]
    assert abs(w.output_tokens_per_s - 500 / 15) < 1e-6  # entries cover 90..105 s
    assert w.itl_p90_s == 0.5 and w.kv_utilization == 0.4
    assert fresh[("m", "b", "decode")] is None  # nothing published: missing, not zero
    assert stale[("m", "a", "decode")] is None
    assert w.recent is None  # not asked for


def test_the_newest_tick_of_a_window_from_redis(redis_url):
    """A router publishing every 2 s, 10 requests a flush, then 50: the window averages them, the newest 4 s
    (the planner's tick) hold only the jump."""
    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        pub = SignalPublisher(client, "a", "prefill", "m", "router-a", _last=80.0)
        for ts in range(82, 102, 2):
            for _ in range(50 if ts > 96 else 10):
                pub.record_request(prompt_tokens=100)
            await pub.flush(now=float(ts))
        windows = await SignalReader(client).windows([("m", "a", "prefill")], 100.0, 20.0, 10.0, recent_s=4.0)
        await client.aclose()
        return windows[("m", "a", "prefill")]

    w = asyncio.run(scenario())
    assert w.request_rate == (8 * 10 + 2 * 50) / 20
    assert (w.recent.seconds, w.recent.requests, w.recent.prompt_tokens) == (4.0, 100, 10_000)


def test_saturation_spills_to_b_and_drains_back(redis_url, tmp_path):
    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        backends = {n: LocalBackend(sleeper(tmp_path), region=n[0], stop_timeout_s=5) for n in ("a1", "b1")}
        now = [1000.0]
        cp = ControlPlane(parse_policy(POLICY.format(gpus_a=4)), client, backends=backends, clock=lambda: now[0])
        seen = {}
        try:
            # Region a needs 6 prefill replicas (55k tokens / 10 s / 1000, plus a band of 4%); its cluster
            # fits 4 GPUs in all.
            await _publish(client, now[0], "a", 55_000)
            await _publish(client, now[0], "b", 9_000)
            out = await cp.tick()
            seen["desired_a"] = out.desired[("m", "a", "prefill")]
            seen["a1"] = len(backends["a1"].workers("m", "prefill"))
            seen["b1"] = len(backends["b1"].workers("m", "prefill"))
            seen["spill"] = await client.hgetall("baton:spillover:m")

            # Capacity returns in a (policy applied through the admin path); first tick: a's new replicas were
            # not ready when read, so b keeps serving the spilled share.
            assert cp.apply(POLICY.format(gpus_a=16)) == []
            now[0] += 1  # the signals published at t=1000 are still the fresh window
            await cp.tick()
            seen["a1_after"] = len(backends["a1"].workers("m", "prefill"))
            seen["spill_during_drain"] = await client.hgetall("baton:spillover:m")
            now[0] += 1
            await cp.tick()
            seen["spill_after"] = await client.hgetall("baton:spillover:m")
            seen["b1_after"] = len(backends["b1"].workers("m", "prefill"))
        finally:
            cp.close()
            await client.aclose()
        return seen

    seen = asyncio.run(scenario())
    assert seen["desired_a"] == 6
    assert seen["a1"] == 4  # 4 GPUs, one each; decode has no signals and min 0, so it holds at 0
    assert seen["b1"] == 1 + 2  # b's own replica plus a's overflow
    assert json.loads(seen["spill"][b"a"]) == {"b": round(2 / 6, 4)}
    assert seen["a1_after"] == 6
    assert json.loads(seen["spill_during_drain"][b"a"]) == {"b": round(2 / 6, 4)}
    assert seen["spill_after"] == {}
    assert seen["b1_after"] == 1
