"""The pure planner on synthetic load (a step, a ramp, a spike, noise around a constant), ticked with a virtual
clock: replicas follow the load ahead of it, and noise moves nothing."""
from __future__ import annotations

import itertools
import math
import pathlib
import random

import numpy as np

from baton.controlplane.placement import ClusterState
from baton.controlplane.planner import Planner, TickInput
from baton.controlplane.policy import load_policy, parse_policy
from baton.controlplane.signals import Interval, SignalWindow

ROOT = pathlib.Path(__file__).resolve().parents[2]

POLICY = """\
tick_s: 10
signals: {{window_s: {window}}}
clusters:
  - {{name: a, region: r1, backend: local, gpus: 100}}
models:
  - name: m
    regions:
      r1:
        prefill:
          min_replicas: {min}
          max_replicas: {max}
          capacity_tokens_per_s: 1000
          target_utilization: 1.0
          tolerance: 0.1
          ttft_p90_ms: 1000
          startup_s: {startup}
          idle_timeout_s: 60
          scale_up: {{stabilization_s: 0, max_step: {up_step}, cooldown_s: 0}}
          scale_down: {{stabilization_s: 60, max_step: {down_step}, cooldown_s: 0}}
        decode: {{capacity_tokens_per_s: 100, itl_p90_ms: 50, min_replicas: 1}}
"""
KEY = ("m", "r1", "prefill")


def policy(min_replicas=1, up_step=4, startup=0, window=30, max_replicas=10, down_step=2):
    return parse_policy(POLICY.format(min=min_replicas, up_step=up_step, startup=startup, window=window,
                                      max=max_replicas, down_step=down_step))


def step_policy(startup):
    """A 60 s window over 10 s ticks, no step limits: what the newest tick changes shows on its own."""
    return policy(startup=startup, window=60, max_replicas=40, up_step=40, down_step=40)


def window(tokens_per_s, ttft=0.2, queue=0.0):
    # 10 prompt tokens a request: windows of thousands of requests, so sampling noise is negligible here.
    return SignalWindow(request_rate=tokens_per_s / 10, prompt_tokens_per_s=tokens_per_s,
                        output_tokens_per_s=tokens_per_s / 10, queue_depth=queue, ttft_p90_s=ttft)


def run(pol, series, ready_follows=True, start=None, key=KEY):
    """Ticks every tick_s; `series` items are SignalWindows or None (stale); returns (desired, decisions)."""
    planner = Planner()
    ready = start if start is not None else pol.pool(*key).min_replicas
    out_desired, decisions = [], []
    other = "decode" if key[2] == "prefill" else "prefill"
    for i, sig in enumerate(series):
        clusters = {"a": ClusterState(ready={(key[0], key[2]): ready, (key[0], other): 1})}
        out = planner.tick(TickInput(now=i * pol.tick_s, policy=pol, signals={key: sig}, clusters=clusters))
        d = next(d for d in out.decisions if (d.model, d.region, d.pool) == key)
        out_desired.append(d.desired)
        decisions.append(d)
        if ready_follows:
            ready = d.desired
    return out_desired, decisions


def changes(desired):
    return sum(1 for a, b in itertools.pairwise(desired) if a != b)


def test_step_up_within_two_windows_and_step_limited():
    desired, decisions = run(policy(), [window(900)] * 3 + [window(8600)] * 5)
    assert desired[:3] == [1, 1, 1]
    # The first high window might be an outlier: the level moves a fifth of the way (alpha 0.2) to 3 replicas'
    # worth; the second confirms the new level, which is then taken at once.
    assert desired[3] == 3
    assert decisions[4].proposals["forecast"] == 9  # ceil(8600 / 1000 plus a band of under 2%)
    assert desired[4] == desired[3] + 4 and "step" in decisions[4].limits  # max_step 4
    assert desired[5:] == [9, 9, 9]


def test_ramp_is_met_ahead_of_the_load():
    # 11x in an hour (900 -> 9,900 tokens/s, a tick every 10 s); replicas take 60 s to start, so what the
    # planner asks for now must cover the load a minute from now: the trend looks that far ahead.
    loads = [900 + 25 * i for i in range(361)]
    desired, decisions = run(policy(startup=60, up_step=10), [window(x) for x in loads])
    for i in range(36, len(loads)):  # after the first few minutes, in which the trend is learnt
        assert desired[i - 6] * 1000 >= loads[i], (i, desired[i - 6], loads[i])
        assert desired[i] <= math.ceil(loads[i] / 1000) + 1  # ahead, not far ahead
    assert decisions[-1].inputs["forecast_tokens_per_s"] > loads[-1]
    assert all(b >= a for a, b in itertools.pairwise(desired))  # a ramp only ever adds
    assert changes(desired) == 9  # one event per replica added: 1 -> 10


def test_spike_up_at_once_then_down_after_the_stabilisation_window():
    series = [window(1700)] * 3 + [window(7600)] * 4 + [window(1700)] * 40
    desired, decisions = run(policy(up_step=10), series)
    assert desired[2] == 2
    assert desired[4] == 8  # confirmed on the second spike window
    assert max(desired) <= 9  # no overshoot beyond the band
    back = next(i for i in range(7, len(desired)) if desired[i] < 8)
    assert back >= 7 + 5  # the 60 s window holds the spike's recommendation first
    assert "stabilization" in decisions[8].limits
    assert all(desired[i] - desired[i + 1] <= 2 for i in range(len(desired) - 1))  # max_step 2 down
    assert desired[20] <= 3  # within the hysteresis margin, which the step widened for a while...
    assert desired[-1] == 2  # ...and which narrows again as the windows stay quiet


def test_noise_around_a_constant_moves_nothing():
    rng = random.Random(3)
    # 4,200 tokens/s give or take 8% each window, at 420 requests/s: the band covers it, no scale event.
    series = [window(4200 * (1 + rng.gauss(0, 0.08))) for _ in range(300)]
    desired, _ = run(policy(up_step=10), series, start=5)
    assert changes(desired) == 0, desired
    assert set(desired) == {5}


def test_hovering_at_a_boundary_does_not_flap():
    # 4,950 to 5,050 tokens/s: 5 replicas' worth give or take a percent, tick after tick.
    series = [window(5050 if i % 2 else 4950) for i in range(60)]
    desired, decisions = run(policy(up_step=10), series, start=6)
    assert changes(desired) <= 1, desired
    assert desired[-1] == 6  # never shrinks to where 5,050 would not fit with the 10% margin
    assert any("hysteresis" in d.limits for d in decisions)


def test_profiled_noise_around_a_constant_moves_nothing():
    """The example profile and Poisson-like windows of long-context requests: one replica count all along."""
    pol = load_policy(ROOT / "deploy" / "policies" / "multi-region.yaml")
    key = ("llama-3-8b", "us-east", "prefill")
    rng = random.Random(5)
    series = []
    for _ in range(240):  # an hour of 15 s ticks at 10 requests/s of ~24k-token prompts
        n = max(1, round(rng.gauss(600, math.sqrt(600))))  # requests in a 60 s window
        prompt = 24_000 * (1 + rng.gauss(0, 0.6 / math.sqrt(n)))
        series.append(SignalWindow(request_rate=n / 60, prompt_tokens_per_s=n * prompt / 60,
                                   output_tokens_per_s=n * 420 / 60, ttft_p90_s=1.5))
    desired, _ = run(pol, series, start=6, key=key)
    assert changes(desired[4:]) == 0, desired  # after the first minute's window fills
    assert 6 <= desired[-1] <= 8  # the model says 5.8 at the mean load


def test_slow_decline_follows_down_without_undershoot():
    series = [window(8000 - 300 * i) for i in range(24)]
    desired, _ = run(policy(), series, start=8)
    for i, d in enumerate(desired):
        assert d * 1000 >= series[i].prompt_tokens_per_s  # never below the load
    assert desired[-1] < desired[0]
    assert all(b <= a for a, b in itertools.pairwise(desired))  # monotone: no bounce on a smooth decline


def test_stale_metrics_hold_and_never_scale_to_zero():
    pol = policy(min_replicas=0)
    desired, decisions = run(pol, [window(4600)] * 3 + [None] * 20)
    assert desired[2] == 5
    assert set(desired[3:]) == {5}
    assert "stale" in decisions[-1].limits and "holding" in decisions[-1].reason


def test_min_and_max_clamp():
    desired, decisions = run(policy(up_step=20), [window(50_000)] * 3)
    assert desired == [10, 10, 10] and "max" in decisions[0].limits
    desired, _ = run(policy(min_replicas=3), [window(10)] * 10)
    assert set(desired) == {3}


def test_a_queue_breaking_the_slo_adds_drain_replicas_that_leave_with_it():
    # 2 ready replicas, 400 requests (4,000 tokens) queued and TTFT past its 1 s target: drain them over the
    # 10 s tick on top of the 1,900 tokens/s forecast -> 1,900 + 4,000 / 10 s = 2,300 -> 3 replicas.
    series = [window(1900)] * 2 + [window(1900, ttft=3.0, queue=400)] * 2 + [window(1900, ttft=0.5)] * 2
    desired, decisions = run(policy(), series, start=2)
    assert desired[:2] == [2, 2]
    assert decisions[2].proposals["queue"] == 3 and desired[2] == 3
    assert desired[4] == 2  # queue gone: released at once, not held for the stabilisation window
    # A queue that does not break the SLO is the ordinary kind the capacity model allows for.
    _, decisions = run(policy(), [window(1900, ttft=0.5, queue=400)] * 2, start=2)
    assert "queue" not in decisions[-1].proposals


def test_scale_to_zero_after_idle_and_back():
    pol = policy(min_replicas=0)
    series = [window(2800)] * 2 + [window(0)] * 12 + [window(3600)] * 6
    desired, decisions = run(pol, series, start=3)
    zero_at = desired.index(0)
    # Idle from tick 2; timeout 60 s -> zero at tick 8, not earlier.
    assert zero_at == 8 and "idle" in decisions[zero_at].limits
    assert min(desired[2:zero_at]) >= 1
    assert desired[zero_at:14] == [0] * (14 - zero_at)
    assert desired[14] >= 1 and "cold-start" in decisions[14].limits  # straight back, no stabilisation
    assert desired[-1] == 4


def test_every_decision_records_its_reason_and_inputs():
    _, decisions = run(policy(), [window(2800)] * 2)
    d = decisions[-1]
    assert d.reason.startswith("forecast proposes 3")
    for field in ("load_tokens_per_s", "forecast_tokens_per_s", "upper_tokens_per_s", "needed_replicas", "ready"):
        assert field in d.inputs


# Traffic as the signal reader sees it: arrivals per tick, a window over the last few ticks and the newest tick
# on its own (`SignalWindow.recent`), where a sudden step shows a window's length before the average does.
def traffic(counts, tokens_per_request=100, window_ticks=6, tick_s=10.0, queue=None, ttft=0.2):
    """SignalWindows from requests per tick; `queue` gives each tick's queue depth (default none)."""
    out = []
    for i in range(len(counts)):
        last = counts[max(0, i - window_ticks + 1): i + 1]
        span = len(last) * tick_s
        n = sum(last)
        out.append(SignalWindow(
            request_rate=n / span, prompt_tokens_per_s=n * tokens_per_request / span,
            output_tokens_per_s=n * 10 / span, queue_depth=queue[i] if queue else 0.0, ttft_p90_s=ttft,
            recent=Interval(tick_s, counts[i], counts[i] * tokens_per_request, counts[i] * 10)))
    return out


def test_a_step_is_sized_at_the_first_tick_from_the_newest_interval():
    # 9 -> 86 requests/s of 100 tokens (0.9 -> 8.6 replicas' worth): the 60 s window's average is still 2.2
    # replicas' worth at the first tick after the step, the newest tick already 8.6.
    pol = step_policy(0)
    desired, decisions = run(pol, traffic([90] * 12 + [860] * 12))
    assert set(desired[:12]) == {1}
    assert decisions[12].inputs["shift"] == 1
    assert desired[12] == 9 + 1  # 8.6 plus the band of a level measured from one tick (860 requests, ~5%)
    assert decisions[12].inputs["load_tokens_per_s"] < 2500  # what the window alone would have sized for
    assert all(9 <= d <= 10 for d in desired[12:])  # held: the window catching up is no news
    assert decisions[-1].inputs["shift"] == 0  # six ticks on, the window holds only the new level


def test_poisson_noise_in_the_newest_interval_starts_no_shift():
    """An hour of Poisson arrivals at 4.2 requests/s of 1,000 tokens (42 a tick: +-15% tick to tick): no shift,
    no scale event."""
    rng = np.random.default_rng(7)
    counts = rng.poisson(42, 360).tolist()
    desired, decisions = run(step_policy(20), traffic(counts, 1000), start=5)
    assert all(d.inputs["shift"] == 0 for d in decisions)
    assert changes(desired[6:]) == 0, desired  # after the first window fills
    assert 5 <= desired[-1] <= 6


def test_a_ramp_is_trend_not_a_step():
    # 3x over half an hour in 10 s ticks: never 1.5x from one tick to the next, so the trend follows it.
    counts = [round(20 * (1 + 2 * i / 180)) for i in range(180)]
    desired, decisions = run(step_policy(30), traffic(counts, 1000))
    assert all(d.inputs["shift"] == 0 for d in decisions)
    assert all(b >= a for a, b in itertools.pairwise(desired))
    assert desired[-1] >= 6  # 6 requests/s of 1,000 tokens


def test_a_drop_releases_replicas_once_its_second_tick_confirms_it_not_after_the_windows():
    pol = step_policy(0)
    desired, decisions = run(pol, traffic([90] * 12 + [860] * 30 + [90] * 30))
    assert decisions[42].inputs["shift"] == -1
    # The 60 s signal window still averages 8.6 replicas' worth for a minute. One quiet tick may be a dip, so
    # the 60 s stabilisation window holds the replicas at the first; the second tick confirms the step (both
    # together still far below the level before), and the recommendations made for that level no longer count.
    assert desired[42] >= 9 and "stabilization" in decisions[42].limits
    assert desired[43] <= 2
    assert changes(desired[43:]) == 0


def test_a_confirmed_drop_steps_down_as_its_level_firms_up():
    # 30 -> 10 requests/s of 1,000 tokens, its second tick 45% heavier. Each recommendation in the step is sized
    # on all its arrivals so far, with their band: the newest supersedes the heavier early ones, so the pool
    # follows the band down tick by tick rather than holding the second tick's size for the 60 s window.
    desired, _ = run(step_policy(0), traffic([300] * 12 + [100, 145] + [100] * 8, 1000))
    assert desired[12] == 31 and desired[13] < 31
    assert desired[13] > desired[14] > desired[15] > desired[16]
    assert desired[16] <= 14 and changes(desired[16:]) == 0


def test_a_one_tick_dip_releases_nothing():
    # A tick at a tenth of the load, then the load again: the next tick is a step up from the dip, not a second
    # tick of a step down, and the stabilisation window holds the replicas through it.
    pol = step_policy(0)
    desired, decisions = run(pol, traffic([90] * 12 + [860] * 30 + [90] + [860] * 20))
    assert decisions[42].inputs["shift"] == -1 and decisions[43].inputs["shift"] == 1
    assert min(desired[30:]) >= 9


def test_a_drop_that_does_not_hold_up_is_not_confirmed():
    # 860 -> 500 requests a tick is a step down (1.7x fewer), but 500 + 700 over two ticks is not 1.5x below
    # 2 x 860: no step, so the stabilisation window keeps the replicas for the old level.
    pol = step_policy(0)
    desired, decisions = run(pol, traffic([90] * 12 + [860] * 30 + [500, 700] + [860] * 10))
    assert decisions[42].inputs["shift"] == -1 and decisions[43].inputs["shift"] == -1
    assert min(desired[30:]) >= 9


def test_a_queue_is_drained_with_the_replicas_already_starting():
    """A step to 5x with 30 s start-up: replicas asked for at the first tick are not cancelled while they start,
    and later ticks add only what the queue they will find needs beyond them."""
    pol = step_policy(30)
    key_ready = 1
    planner = Planner()
    counts = [90] * 12 + [450] * 12
    queue, q = [], 0.0
    desired_log, decisions = [], []
    series = traffic(counts)
    for i, c in enumerate(counts):
        # One ready replica serves 1,000 tokens/s = 10 requests/s; the rest waits.
        q = max(0.0, q + (c - 10 * key_ready * 10))
        queue.append(q)
        sig = series[i]
        sig = SignalWindow(**{**sig.__dict__, "queue_depth": q, "ttft_p90_s": 0.2 if q == 0 else 5.0})
        clusters = {"a": ClusterState(ready={("m", "prefill"): key_ready, ("m", "decode"): 1})}
        out = planner.tick(TickInput(now=i * 10.0, policy=pol, signals={KEY: sig}, clusters=clusters))
        d = next(d for d in out.decisions if d.pool == "prefill")
        desired_log.append(d.desired)
        decisions.append(d)
        if i >= 15:  # replicas asked for at the step (tick 12) are ready 30 s later
            key_ready = desired_log[12]
    first = desired_log[12]
    # 45 requests/s arrive, 10 are served: 350 more queued each tick, 1,400 (140k tokens) by the time new
    # replicas serve; drained within a tick (a quarter of the start-up, at least a tick: 10 s) on top of the
    # 4.5 replicas' worth and its band: 14 + 5 -> 20.
    assert "queue" in decisions[12].proposals and 19 <= first <= 21
    assert min(desired_log[12:16]) >= first  # none cancelled while they start
    assert max(desired_log[12:16]) <= first + 2  # the projection foresaw the growth: no chase, tick after tick
    assert desired_log[-1] <= 6  # queue gone: back to the load's 4.5 replicas plus the band


FIRM_POLICY = """\
tick_s: 10
signals: {window_s: 120}
clusters:
  - {name: a, region: r1, backend: local, gpus: 100}
models:
  - name: m
    regions:
      r1:
        prefill:
          max_replicas: 40
          capacity_tokens_per_s: 1000
          tolerance: 0.0
          ttft_p90_ms: 1000
          scale_up: {stabilization_s: 0, max_step: 40, cooldown_s: 0}
          scale_down: {stabilization_s: 0, max_step: 40, cooldown_s: 0}
        decode: {capacity_tokens_per_s: 100, itl_p90_ms: 50}
"""


def test_a_step_comes_down_as_its_level_firms_up_not_when_the_window_holds_only_it():
    """After a step the band is that of the arrivals since it began (wide at first) and shrinks as they add up;
    the scale-down margin is only how far the level wanders, so the replicas that band asked for go once it has
    narrowed, not a whole window later when the step stops being one."""
    pol = parse_policy(FIRM_POLICY)
    desired, decisions = run(pol, traffic([60] * 12 + [929] * 12, window_ticks=12))
    assert decisions[12].inputs["shift"] == 1 and desired[12] == 15  # 929 requests' band: ~9%
    assert decisions[12].inputs["noise"] > 4 * decisions[12].inputs["wander"]
    firm = next(i for i in range(13, 24) if desired[i] < desired[12])
    assert decisions[firm].inputs["shift"] == 1 and firm <= 16  # within the step's first 40 s
    assert set(desired[firm:]) == {14}  # and no lower: that is the level's need
    assert decisions[-1].inputs["shift"] == 0  # the window holds only the new level from here on


def test_a_planner_does_not_shrink_a_pool_before_it_has_watched_a_whole_window():
    # 8 ready replicas for 2,600 tokens/s (3 replicas' worth): a fresh planner (a restart, or a replay's first
    # tick) holds them until it has seen a 60 s window, then scales down at once, the margin allowing.
    desired, decisions = run(policy(window=60, down_step=10), [window(2600)] * 12, start=8)
    assert desired[:6] == [8] * 6 and all("first-window" in d.limits for d in decisions[:6])
    assert desired[6] == 3 and "first-window" not in decisions[6].limits


def test_a_prompt_queued_for_prefill_is_the_decode_pools_queue_too():
    # After a step, decode gets what prefill's new replicas work off of their queue, all at once. 10 requests/s
    # of 7 output tokens plan 2 decode replicas (100 tokens/s each, at 0.7); with the ITL target broken, 200
    # prompts queued for prefill (1,400 output tokens to come) are drained within a quarter of the 60 s
    # start-up on top: 3; 2,000 of them: 8. A prefill queue while decode meets its target is ordinary.
    pol = policy()
    decode = ("m", "r1", "decode")

    def decide(prefill_queue, itl):
        planner, out = Planner(), None
        for i in range(3):
            sigs = {KEY: window(1000, ttft=0.5 if itl <= 0.05 else 5.0, queue=prefill_queue),
                    decode: SignalWindow(request_rate=10, prompt_tokens_per_s=1000, output_tokens_per_s=70,
                                         itl_p90_s=itl)}
            clusters = {"a": ClusterState(ready={("m", "prefill"): 1, ("m", "decode"): 1})}
            out = planner.tick(TickInput(now=i * pol.tick_s, policy=pol, signals=sigs, clusters=clusters))
        return next(d for d in out.decisions if (d.model, d.region, d.pool) == decode)

    assert decide(0, itl=0.06).desired == 2
    d = decide(200, itl=0.06)
    assert d.proposals == {"forecast": 2, "queue": 3} and d.desired == 3 and d.inputs["queue_depth"] == 200
    assert decide(2000, itl=0.06).desired == 8
    assert decide(200, itl=0.03).desired == 2
