"""Planner on synthetic signal series: the pure core, ticked with a virtual clock."""
from __future__ import annotations

from baton.controlplane.placement import ClusterState
from baton.controlplane.planner import Planner, TickInput
from baton.controlplane.policy import parse_policy
from baton.controlplane.signals import SignalWindow

POLICY = """\
tick_s: 10
clusters:
  - {{name: a, region: r1, backend: local, gpus: 100}}
models:
  - name: m
    regions:
      r1:
        prefill:
          min_replicas: {min}
          max_replicas: 10
          capacity_tokens_per_s: 1000
          target_utilization: 1.0
          ttft_p90_ms: 1000
          startup_s: 0
          idle_timeout_s: 60
          scale_up: {{stabilization_s: 0, max_step: {up_step}, cooldown_s: 0}}
          scale_down: {{stabilization_s: 60, max_step: 2, cooldown_s: 0}}
        decode: {{capacity_tokens_per_s: 100, itl_p90_ms: 50, min_replicas: 1}}
"""
KEY = ("m", "r1", "prefill")


def policy(min_replicas=1, up_step=4):
    return parse_policy(POLICY.format(min=min_replicas, up_step=up_step))


def window(tokens_per_s, ttft=0.2, queue=0.0):
    return SignalWindow(request_rate=tokens_per_s / 100, prompt_tokens_per_s=tokens_per_s,
                        output_tokens_per_s=tokens_per_s / 10, queue_depth=queue, ttft_p90_s=ttft)


def run(pol, series, ready_follows=True, start=None):
    """Ticks every 10 s; `series` items are SignalWindows or None (stale); returns (desired, decisions)."""
    planner = Planner()
    ready = start if start is not None else pol.pool(*KEY).min_replicas
    out_desired, decisions = [], []
    for i, sig in enumerate(series):
        clusters = {"a": ClusterState(ready={("m", "prefill"): ready, ("m", "decode"): 1})}
        out = planner.tick(TickInput(now=i * 10.0, policy=pol, signals={KEY: sig}, clusters=clusters))
        d = next(d for d in out.decisions if (d.model, d.region, d.pool) == KEY)
        out_desired.append(d.desired)
        decisions.append(d)
        if ready_follows:
            ready = d.desired
    return out_desired, decisions


def test_step_up_is_proportional_and_step_limited():
    desired, decisions = run(policy(), [window(1000)] * 2 + [window(9000)] * 4)
    assert desired[:2] == [1, 1]
    assert desired[2:] == [5, 9, 9, 9]  # 1 -> 5 (max_step 4) -> 9 = ceil(9000 / 1000)
    assert "step" in decisions[2].limits and decisions[2].proposals["sla"] == 9


def test_spike_then_slow_scale_down_through_stabilisation():
    series = [window(2000)] * 2 + [window(8000)] * 3 + [window(2000)] * 12
    desired, decisions = run(policy(up_step=10), series)
    assert max(desired) == 8 and desired[2] == 8
    # Down only after the 60 s window has no high recommendation, then at most 2 per tick.
    drop = next(i for i in range(5, len(desired)) if desired[i] < 8)
    assert drop >= 5 + 5
    assert all(desired[i] - desired[i + 1] <= 2 for i in range(len(desired) - 1))
    assert desired[-1] == 2
    assert "stabilization" in decisions[6].limits


def test_slow_decline_follows_down_without_undershoot():
    series = [window(8000 - 400 * i) for i in range(18)]
    desired, _ = run(policy(), series, start=8)
    for i, d in enumerate(desired):
        assert d * 1000 >= series[i].prompt_tokens_per_s * 0.9  # never below load beyond the tolerance
    assert desired[-1] < desired[0]
    assert all(b <= a for a, b in zip(desired, desired[1:]))  # monotone: no bounce on a smooth decline


def test_flapping_load_does_not_oscillate():
    series = [window(6000 if i % 2 else 2000) for i in range(30)]
    desired, _ = run(policy(up_step=10), series, start=2)
    changes = sum(1 for a, b in zip(desired, desired[1:]) if a != b)
    assert changes <= 1, desired
    assert desired[-1] == 6  # held at what the peaks need


def test_stale_metrics_hold_and_never_scale_to_zero():
    pol = policy(min_replicas=0)
    desired, decisions = run(pol, [window(5000)] * 3 + [None] * 20)
    assert desired[2] == 5
    assert set(desired[3:]) == {5}
    assert "stale" in decisions[-1].limits and "holding" in decisions[-1].reason


def test_min_and_max_clamp():
    desired, decisions = run(policy(up_step=20), [window(50_000)] * 3)
    assert desired == [10, 10, 10] and "max" in decisions[0].limits
    desired, _ = run(policy(min_replicas=3), [window(10)] * 10)
    assert set(desired) == {3}


def test_queue_and_latency_guards_push_up():
    _, decisions = run(policy(), [window(1000, queue=20)])
    assert decisions[0].proposals["queue"] == 5 and decisions[0].desired == 5
    _, decisions = run(policy(), [window(1000, ttft=3.0)], start=2)
    assert decisions[0].proposals["latency"] == 6


def test_scale_to_zero_after_idle_and_back():
    pol = policy(min_replicas=0)
    series = [window(3000)] * 2 + [window(0)] * 12 + [window(4000)] * 2
    desired, decisions = run(pol, series, start=3)
    zero_at = desired.index(0)
    # Idle from tick 2; timeout 60 s -> zero at tick 8, not earlier.
    assert zero_at == 8 and "idle" in decisions[zero_at].limits
    assert desired[2:zero_at] and min(desired[2:zero_at]) >= 1
    assert desired[zero_at:14] == [0] * (14 - zero_at)
    assert desired[14] == 4 and "cold-start" in decisions[14].limits  # straight back, no stabilisation
