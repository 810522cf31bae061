"""The capacity model (profile + queueing) and the load forecaster the planner sizes with."""
from __future__ import annotations

import json
import math
import pathlib
import random

import pytest

from baton.controlplane.capacity import DecodeModel, FlatCapacity, Load, PrefillModel, ProfileError, read_profile
from baton.controlplane.forecast import HoltSeries, LoadForecaster, shifted
from baton.controlplane.signals import Interval, SignalWindow

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROFILE = ROOT / "deploy" / "policies" / "profiles" / "llama-3-8b_h200.json"


def test_profile_reads_and_interpolates_the_measured_points():
    profile = read_profile(PROFILE)
    d = profile.decode
    assert profile.gpus_per_replica == 1 and profile.prefill.busy_throughput > 40_000
    for x, row in zip(d.context, d.itl_ms):
        for c, v in zip(d.concurrency, row):
            if v is not None:
                assert d.itl_s(c, x) == pytest.approx(v / 1e3)
    # Between points: between their values; beyond the last context: linear in context (the KV read).
    assert d.itl_ms[0][1] / 1e3 < d.itl_s(16, 2048) < d.itl_ms[1][1] / 1e3
    step = (d.itl_ms[1][1] - d.itl_ms[0][1]) / (d.context[1] - d.context[0]) / 1e3
    assert d.itl_s(16, 8192) == pytest.approx(d.itl_ms[1][1] / 1e3 + step * (8192 - d.context[1]))


@pytest.mark.parametrize("edit,words", [
    (lambda p: p["decode"].update(itl_ms=[[5.0, None, 8.0, 9.0], [5.0, 6.0, 7.0, None]]),
     "decode: Value error, itl_ms[0] must start with positive values"),
    (lambda p: p["prefill"].update(batch_tokens=[4096, 1024], tokens_per_s=[1.0, 2.0]),
     "prefill: Value error, batch_tokens must be positive and increasing"),
    (lambda p: p.pop("decode"), "decode: Field required"),
])
def test_bad_profiles_are_one_line_naming_the_file_and_field(tmp_path, edit, words):
    data = json.loads(PROFILE.read_text())
    edit(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as exc:
        read_profile(path)
    assert str(exc.value).startswith(f"{path}: {words}")
    assert "\n" not in str(exc.value)
    path.write_text("{")
    with pytest.raises(ProfileError, match=f"{path}:1: invalid JSON"):
        read_profile(path)


def test_prefill_replicas_are_the_fewest_that_meet_the_ttft_target():
    model = PrefillModel(read_profile(PROFILE).prefill)
    rng = random.Random(1)
    for _ in range(50):
        rate, prompt, slo = rng.uniform(0.5, 40), rng.uniform(500, 20_000), rng.uniform(1.5, 5)
        load = Load(rate, rate * prompt, rate * 300)
        n = model.replicas(load, slo)
        assert model.ttft_p90_s(load, n * 1.001) <= slo + 1e-6
        assert model.ttft_p90_s(load, n * 0.98) > slo or n * 0.98 * model.busy <= load.prompt_tokens_per_s * 1.02
    # Bigger pools run hotter at the same TTFT target (the wait shrinks with the pool's service time).
    small, big = Load(1, 10_000, 300), Load(30, 300_000, 9_000)
    util = [load.prompt_tokens_per_s / (model.replicas(load, 3.0) * model.busy) for load in (small, big)]
    assert util[0] < util[1] < 0.99
    # A target the prompts' own prefill cannot meet is unreachable at any size, and says so.
    assert math.isinf(model.replicas(Load(1, 200_000, 10), 3.0))
    assert model.replicas(Load(0, 0, 0), 3.0) == 0


def test_decode_replicas_scale_with_output_and_respect_kv_and_itl():
    model = DecodeModel(read_profile(PROFILE).decode)
    load = Load(2, 2 * 24_000, 2 * 400)
    one = model.replicas(load, 0.04)
    assert model.replicas(load.scaled(5), 0.04) == pytest.approx(5 * one, rel=1e-6)  # linear in load
    ctx = DecodeModel.context(load)
    c = model.best_concurrency(ctx, 0.04)
    assert c + 1.28 * math.sqrt(c) <= model.kv_concurrency(ctx) + 1e-6
    # Short contexts are ITL-bound instead: a tighter target allows fewer requests per replica.
    short = Load(10, 10 * 1000, 10 * 200)
    assert model.best_concurrency(1100, 0.010) < model.best_concurrency(1100, 0.020)
    assert model.replicas(short, 0.010) > model.replicas(short, 0.020)
    assert math.isinf(model.replicas(short, 0.001))  # below one request's own ITL


def test_flat_capacity_is_tokens_over_capacity():
    assert FlatCapacity("decode", 100.0).replicas(Load(1, 5000, 250), 0.05) == 2.5
    assert FlatCapacity("prefill", 1000.0).replicas(Load(1, 5000, 250), 1.0) == 5.0


def test_holt_follows_a_ramp_and_jumps_only_on_two_far_windows():
    s = HoltSeries()
    for i in range(200):
        s.update(i * 10.0, 1000 + 5.0 * i)
    assert s.forecast(60) == pytest.approx(1000 + 5.0 * 199 + 0.5 * 60, rel=0.01)  # trend 0.5/s learnt

    s = HoltSeries()
    rng = random.Random(2)
    for i in range(50):
        s.update(i * 10.0, 1000 * (1 + rng.gauss(0, 0.05)))
    level = s.level
    s.update(500.0, 3000)  # one far window: a fifth of the way, not a jump
    assert level < s.level < level + 0.25 * (3000 - level)
    s.update(510.0, 1000)
    s.update(520.0, 1000)
    assert s.level < 1300
    s.update(530.0, 3000)
    s.update(540.0, 3000)  # two in a row: the new level, at once
    assert s.level == 3000


def test_forecast_band_is_never_narrower_than_the_windows_sampling_noise():
    f = LoadForecaster()
    for i in range(30):  # identical windows: no residuals at all
        f.update(i * 15.0, SignalWindow(request_rate=2.0, prompt_tokens_per_s=40_000, output_tokens_per_s=800), 60)
    fc = f.forecast(75, 2.0, 60)
    # 120 requests a window: sqrt(2/120) = 13% sampling noise, smoothed (alpha 0.2) to a third of it, times z 2.
    assert fc.expected.prompt_tokens_per_s == pytest.approx(40_000)
    assert fc.noise == pytest.approx(2 * math.sqrt(0.2 / 1.8) * math.sqrt(2 / 120), rel=1e-3)


def test_a_shift_needs_five_poisson_sigmas_and_half_again():
    iv = lambda n: Interval(5.0, n, 1000 * n, 100 * n)  # noqa: E731 - 5 s ticks
    assert shifted(3.0, iv(15 + 5 * 4 + 1)) == 1  # 15 expected: beyond 5 sqrt(15) = 19.4 and 1.5x
    assert shifted(3.0, iv(34)) == 0  # 19 above: 4.9 sigma
    assert shifted(100.0, iv(700)) == 0  # 500 expected, 9 sigma above, but only 1.4x: a drift, not a step
    assert shifted(15.0, iv(15)) == -1 and shifted(15.0, iv(50)) == 0  # 75 expected: 15 is a drop, 50 is not


def test_a_shift_measures_its_level_from_its_start_until_the_window_holds_only_it():
    f = LoadForecaster()
    for i in range(24):  # 3 requests/s of 1,000 tokens, 5 s ticks, a 60 s window
        f.update(i * 5.0, SignalWindow(3.0, 3000.0, 300.0, recent=Interval(5.0, 15, 15_000, 1500)), 60)
    assert f.shift is None
    for k, n in enumerate((75, 80, 70)):  # 15 requests/s now; the 60 s window still mostly the old level
        window = SignalWindow(4.0, 4000.0, 400.0, recent=Interval(5.0, n, 1000 * n, 100 * n))
        f.update(120.0 + 5 * k, window, 60)
    assert f.shift is not None and f.shift.direction == 1
    fc = f.forecast(25, 2.0, 60)
    assert fc.rising and fc.expected.prompt_tokens_per_s == pytest.approx(15_000)  # 225 requests in 15 s
    assert fc.noise == pytest.approx(2 * math.sqrt(2 / 225), rel=1e-6)  # the band of those 225 requests
    for k in range(3, 12):  # the window fills with the new level: the shift ends, Holt takes over from it
        f.update(120.0 + 5 * k, SignalWindow(15.0, 15_000.0, 1500.0, recent=Interval(5.0, 75, 75_000, 7500)), 60)
    assert f.shift is None and not f.forecast(25, 2.0, 60).rising
    assert f.series["prompt_tokens_per_s"].level == pytest.approx(15_000, rel=0.01)


def test_a_shift_band_widens_the_upper_load_but_not_the_scale_down_margin():
    f = LoadForecaster()
    for i in range(24):  # 3 requests/s of 1,000 tokens, 5 s ticks, a 60 s window
        f.update(i * 5.0, SignalWindow(3.0, 3000.0, 300.0, recent=Interval(5.0, 15, 15_000, 1500)), 60)
    for k, n in enumerate((75, 80, 70)):  # a step to 15 requests/s: 225 requests since it began
        f.update(120.0 + 5 * k, SignalWindow(4.0, 4000.0, 400.0, recent=Interval(5.0, n, 1000 * n, 100 * n)), 60)
    fc = f.forecast(25, 2.0, 60)
    shift_band = 2 * math.sqrt(2 / 225)
    assert fc.upper.prompt_tokens_per_s == pytest.approx(15_000 * (1 + shift_band))
    # The margin against flapping is the level's own wander: 2 sigma of a 60 s window at 15 requests/s, narrowed
    # by Holt's smoothing (alpha 0.2), about a sixth of the shift's band.
    wander = 2 * math.sqrt(0.2 / 1.8) * math.sqrt(2 / (15 * 60))
    assert fc.wander == pytest.approx(wander) and fc.wander < fc.noise / 5
    for k in range(3, 12):  # once the window holds only the new level, band and margin are the same again
        f.update(120.0 + 5 * k, SignalWindow(15.0, 15_000.0, 1500.0, recent=Interval(5.0, 75, 75_000, 7500)), 60)
    fc = f.forecast(25, 2.0, 60)
    assert f.shift is None and fc.wander == pytest.approx(fc.noise)
