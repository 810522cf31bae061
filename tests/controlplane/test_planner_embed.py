"""The embed pool as the planner's third pool kind: sized by inputs/s against `capacity_inputs_per_s`, with the p90
queue time as its latency target; the embed workers' signals reach it through Redis."""
from __future__ import annotations

import asyncio
import random

import redis.asyncio as aioredis

from baton.contracts.signals import SignalPublisher
from baton.controlplane.placement import ClusterState
from baton.controlplane.planner import Planner, TickInput
from baton.controlplane.policy import parse_policy
from baton.controlplane.signals import SignalReader, SignalWindow
from tests.controlplane.test_planner import changes

POLICY = """\
tick_s: 10
signals: {window_s: 30}
clusters:
  - {name: a, region: r1, backend: local, gpus: 100}
models:
  - name: m
    regions:
      r1:
        prefill: {capacity_tokens_per_s: 1000, ttft_p90_ms: 1000}
        decode: {capacity_tokens_per_s: 100, itl_p90_ms: 50}
        embed:
          min_replicas: 1
          max_replicas: 12
          capacity_inputs_per_s: 100
          queue_time_p90_ms: 200
          target_utilization: 1.0
          startup_s: 0
          scale_up: {stabilization_s: 0, max_step: 4, cooldown_s: 0}
          scale_down: {stabilization_s: 60, max_step: 2, cooldown_s: 0}
"""
KEY = ("m", "r1", "embed")
INPUTS_PER_REQUEST = 4


def window(inputs_per_s, queue_p90_s=0.05, queue=0.0):
    """Embed workers' window: requests of 4 inputs of 30 tokens each; no output tokens."""
    return SignalWindow(request_rate=inputs_per_s / INPUTS_PER_REQUEST, prompt_tokens_per_s=inputs_per_s * 30,
                        output_tokens_per_s=0.0, inputs_per_s=inputs_per_s, queue_depth=queue,
                        queue_p90_s=queue_p90_s)


def run(series, start=1):
    """Ticks every 10 s with the embed pool's window only (prefill and decode have none: they hold)."""
    pol, planner, ready = parse_policy(POLICY), Planner(), start
    desired, decisions = [], []
    for i, sig in enumerate(series):
        clusters = {"a": ClusterState(ready={("m", "embed"): ready, ("m", "prefill"): 1, ("m", "decode"): 1})}
        out = planner.tick(TickInput(now=i * pol.tick_s, policy=pol, signals={KEY: sig}, clusters=clusters))
        d = next(d for d in out.decisions if (d.model, d.region, d.pool) == KEY)
        assert out.desired[("m", "r1", "prefill")] == 1 and out.desired[("m", "r1", "decode")] == 1
        desired.append(d.desired)
        decisions.append(d)
        ready = d.desired
    return desired, decisions


def test_policy_adds_the_embed_pool_to_the_planned_pools():
    pol = parse_policy(POLICY)
    assert pol.pool_keys() == [("m", "r1", "prefill"), ("m", "r1", "decode"), KEY]
    cap = pol.capacity_model(*KEY)
    assert cap.busy_rate(None, 0.2) == 100  # capacity_inputs_per_s, not a token rate
    without = parse_policy(POLICY.split("        embed:")[0])
    assert KEY not in without.pool_keys()


def test_step_up_in_inputs_per_s_then_down_after_the_window():
    desired, decisions = run([window(90)] * 3 + [window(850)] * 5 + [window(60)] * 40)
    assert desired[:3] == [1, 1, 1]
    assert desired[3] == 3  # the first high window moves the level a fifth of the way (alpha 0.2)
    assert desired[4] == 7 and "step" in decisions[4].limits  # confirmed: 9 wanted, max_step 4
    assert desired[5:8] == [9, 9, 9]  # ceil(850 inputs/s / 100 per replica plus a small band)
    assert decisions[5].inputs["load_inputs_per_s"] == 850
    assert "load_tokens_per_s" not in decisions[5].inputs
    back = next(i for i in range(8, len(desired)) if desired[i] < 9)
    assert back >= 8 + 5  # the 60 s scale-down window holds the peak's recommendation first
    assert all(a - b <= 2 for a, b in zip(desired, desired[1:]))  # max_step 2 down
    assert desired[-1] == 1  # once the margin, widened by the step, has narrowed again


def test_noise_in_inputs_per_s_moves_nothing():
    rng = random.Random(5)
    # 420 inputs/s give or take 8% (105 requests/s): 5 replicas, and the band covers the noise.
    desired, _ = run([window(420 * (1 + rng.gauss(0, 0.08))) for _ in range(200)], start=5)
    assert changes(desired) == 0, desired
    assert set(desired) == {5}


def test_a_queue_over_the_queue_time_target_adds_replicas_to_drain_it():
    # Inputs/s alone ask for one replica, but 60 requests wait and the p90 queue time is 5x the target.
    calm, _ = run([window(90)] * 4)
    queued, decisions = run([window(90)] * 3 + [window(90, queue_p90_s=1.0, queue=60)])
    assert calm[-1] == 1
    assert decisions[-1].proposals["queue"] > 1 and queued[-1] > 1
    assert decisions[-1].inputs["latency_p90_s"] == 1.0


def test_stale_embed_signals_hold():
    desired, decisions = run([window(850)] * 3 + [None] * 20, start=1)
    top = desired[2]
    assert top > 1 and desired[3:] == [top] * 20
    assert "stale" in decisions[-1].limits


def test_embed_worker_signals_through_redis(redis_url):
    """What an embed worker publishes (requests with their inputs, queue-time samples, the waiting requests) is
    what the control plane's window reads."""
    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        pub = SignalPublisher(client, "r1", "embed", "m", "embed-0", _last=90.0)
        for n in (1, 100, 19):
            pub.record_request(prompt_tokens=10 * n, inputs=n)
        for s in (0.01, 0.02, 0.03, 0.4):
            pub.record_queue_time(s)
        pub.set_queue_depth(2)
        await pub.flush(now=100.0)
        windows = await SignalReader(client).windows([KEY, ("m", "r1", "prefill")], 100.0, 10.0, 10.0)
        await client.aclose()
        return windows

    windows = asyncio.run(scenario())
    w = windows[KEY]
    assert w.inputs_per_s == 12.0 and w.request_rate == 0.3 and w.prompt_tokens_per_s == 120.0
    assert w.load("embed") == 12.0 and w.latency_p90_s("embed") == 0.4 and w.queue_depth == 2
    assert windows[("m", "r1", "prefill")] is None  # embed workers write only the embed stream


def test_what_if_simulation_of_a_policy_with_an_embed_pool_replays_generation_only(tmp_path):
    """Traces hold generation requests: `baton policy simulate` on the example embed policy replays prefill and
    decode, and the embed pool is planned beside them without traffic."""
    from baton.controlplane.policy import load_policy
    from baton.controlplane.simulator import simulate
    from baton.controlplane.trace import load_trace
    from tests.controlplane.test_planner import ROOT

    policy = load_policy(ROOT / "deploy" / "policies" / "embeddings.yaml")
    assert ("qwen3-8b", "us-east", "embed") in policy.pool_keys()
    rng = random.Random(1)
    rows = [f"{i * 0.05:.2f},us-east,{rng.randint(200, 2000)},{rng.randint(50, 300)}" for i in range(2400)]
    (tmp_path / "t.csv").write_text("timestamp,region,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n")
    result = simulate(policy, load_trace(tmp_path / "t.csv", policy))
    assert set(result.pools) == {("qwen3-8b", "us-east", "prefill"), ("qwen3-8b", "us-east", "decode")}
    assert result.total().total > 0


PROFILED = POLICY.replace("          capacity_inputs_per_s: 100\n", """\
          profile:
            {model: e, device: cpu, input_tokens: 32, batch_inputs: [1, 16, 64], inputs_per_s: [20, 80, 100],
             max_batch_inputs: 64}
""")


def test_a_measured_embed_profile_sizes_the_pool_for_the_queue_time_target():
    from baton.controlplane.capacity import EmbedModel, Load

    pol = parse_policy(PROFILED)
    cap = pol.capacity_model(*KEY)
    assert isinstance(cap, EmbedModel) and cap.busy_rate(None, 0.2) == 100  # the busy (full-forward) rate
    for inputs_per_s in (50, 300, 850):
        load = Load(inputs_per_s / INPUTS_PER_REQUEST, inputs_per_s * 30, 0.0, inputs_per_s)
        n = cap.replicas(load, 0.2)
        # Enough replicas to keep the p90 queue time within 200 ms, more than the flat rate alone would take.
        assert inputs_per_s / 100 < n and cap.queue_p90_s(load, n) <= 0.2 + 1e-9
        assert cap.queue_p90_s(load, n * 0.9) > 0.2 or n * 0.9 * 100 <= inputs_per_s
    desired, decisions = run([window(90)] * 3 + [window(850)] * 5)  # the flat policy, for comparison
    profiled = Planner()
    clusters = {"a": ClusterState(ready={("m", "embed"): desired[-1], ("m", "prefill"): 1, ("m", "decode"): 1})}
    out = profiled.tick(TickInput(now=0, policy=pol, signals={KEY: window(850)}, clusters=clusters))
    d = next(d for d in out.decisions if d.pool == "embed")
    assert d.desired >= desired[-1] == 9  # queueing needs headroom a flat capacity does not plan for


def test_embed_pool_needs_a_capacity_or_a_valid_profile():
    import pytest

    from baton.controlplane.policy import PolicyError

    with pytest.raises(PolicyError) as info:
        parse_policy(POLICY.replace("          capacity_inputs_per_s: 100\n", ""))
    assert "models[0].regions.r1.embed: capacity_inputs_per_s is required when the pool has no profile" in str(
        info.value)
    with pytest.raises(PolicyError) as info:
        parse_policy(PROFILED.replace("[1, 16, 64]", "[1, 64, 16]"))
    assert "models[0].regions.r1.embed.profile" in str(info.value)
    assert "batch_inputs must be positive and increasing" in str(info.value)
    with pytest.raises(PolicyError) as info:
        parse_policy(POLICY.replace("          min_replicas: 1\n", "          min_replicas: 0\n"))
    assert "models[0].regions.r1.embed.min_replicas: an embed pool needs min_replicas >= 1" in str(info.value)
