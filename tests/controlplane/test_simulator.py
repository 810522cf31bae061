"""What-if simulator on the shipped examples: the live Planner against the oracle and static peak provisioning in
one run; traces that do not fit the policy stop with one line naming the file and the row."""
from __future__ import annotations

import gzip
import json
import math
import pathlib
import random
import tempfile

import numpy as np
import pytest
from typer.testing import CliRunner

from baton.controlplane import planner as planner_module
from baton.controlplane.policy import load_policy
from baton.controlplane.replay_pools import RegionQueues
from baton.controlplane.simulator import simulate
from baton.controlplane.trace import TraceError, load_trace

ROOT = pathlib.Path(__file__).resolve().parents[2]
POLICIES = ROOT / "deploy" / "policies"
SPIKE = POLICIES / "traces" / "spike_5x.csv.gz"
DIURNAL = POLICIES / "traces" / "diurnal_day.csv.gz"


def test_spike_example_against_oracle_and_static_peak(monkeypatch):
    policy = load_policy(POLICIES / "spike.yaml")
    trace = load_trace(SPIKE, policy)
    us = trace.t[trace.region == trace.regions.index("us-east")]
    base, peak = np.count_nonzero(us < 1200) / 1200, np.count_nonzero((us >= 1200) & (us < 2100)) / 900
    assert 4.5 < peak / base < 5.5  # the trace really is a sudden 5x spike

    ticks, spilled = [], []
    real_tick = planner_module.Planner.tick

    def tick(self, inp):
        ticks.append(inp.now)
        out = real_tick(self, inp)
        share = out.placement.shares.get("llama-3-8b", {}).get("us-east", {}).get("eu-west")
        if share is not None:
            spilled.append((round(inp.now - float(trace.t[0])), share))
        return out

    monkeypatch.setattr(planner_module.Planner, "tick", tick)
    result = simulate(policy, trace)
    assert len(ticks) == math.ceil(3600 / policy.tick_s)  # the live planner decided every tick

    total = result.total()
    # The oracle, sized by the same capacity model, meets the SLO in the simulated world: model and world agree.
    # (Its decode pools are sized on each tick's arrivals, which decode gets a prefill later: at eu-west's
    # one-replica boundary that shift alone misses 1.1% of the oracle's ITL checks.)
    assert total.attainment("oracle") >= 0.995 and total.attainment("static") >= 0.999
    # This run (README, bench/autoscale.py): 1.149x the oracle, 0.415x static peak; 99.12% of request checks
    # within their SLO, the misses being mostly the TTFTs of the spike's first ~25 s, until replicas asked for at
    # the first tick after it serve (they take 20 s to start): 98.5% of requests meet both targets. Meanwhile
    # about 14% of us-east's requests go to eu-west's spare ready replicas (80 ms further away).
    assert total.ratio("static") <= 0.45
    assert total.ratio("oracle") <= 1.15
    assert total.attainment() >= 0.99
    assert 0.98 <= result.request_attainment() < total.attainment()
    assert [x for x, share in spilled if share > 0] == [1205, 1210, 1215, 1220]  # the start-up gap, no longer
    assert all(share <= 0.5 for _x, share in spilled)  # the rule's max_share
    assert result.pools[("llama-3-8b", "eu-west", "prefill")].attainment() >= 0.99  # the host keeps its SLO
    for key, pool in result.pools.items():
        assert pool.total > 0, key
    for pool in ("prefill", "decode"):
        assert result.pools[("llama-3-8b", "us-east", pool)].events["planner"] > 0  # the spike moves us-east
        # eu-west's steady 2 requests/s: no flapping (its prefill pool now holds its 2 replicas all hour)
        assert result.pools[("llama-3-8b", "eu-west", pool)].events["planner"] <= 5
    t, reps = result.series["t"], result.series["us-east/prefill"]
    before = max(n for x, n in zip(t, reps) if 300 <= x < 1100)
    first_tick = next(n for x, n in zip(t, reps) if x > 1205)  # what the tick at 1205 s asked for
    after = [n for x, n in zip(t, reps) if x >= 2115]
    assert first_tick >= 3 * before  # the step sized from the newest tick, not from a window still catching up
    assert max(after) <= before + 1  # back down 15 s after the spike's end: its second quiet tick confirms it
    doc = result.to_dict()
    assert doc["total"]["over_oracle"] == pytest.approx(total.ratio("oracle"))
    assert set(doc["pools"]) == {"llama-3-8b/us-east/prefill", "llama-3-8b/us-east/decode",
                                 "llama-3-8b/eu-west/prefill", "llama-3-8b/eu-west/decode"}


@pytest.mark.slow
def test_diurnal_example_meets_the_goal():
    """A day with a 10x peak-to-trough swing: close to the oracle, far below static peak, a few events an hour."""
    policy = load_policy(POLICIES / "multi-region.yaml")
    trace = load_trace(DIURNAL, policy)
    result = simulate(policy, trace)
    total = result.total()
    assert result.pools[("llama-3-8b", "us-east", "prefill")].peak >= 10
    assert total.ratio("oracle") <= 1.15
    assert total.ratio("static") <= 0.6
    assert total.attainment() >= 0.99
    for key, pool in result.pools.items():
        assert pool.events["planner"] / result.hours <= 2.0, key


def test_prefill_queue_matches_a_request_by_request_fifo():
    """Four 10 s ticks at different rates (none at all in the second): each request starts its prefill when the
    work ahead of it is done at the rates of the ticks it waits through, whichever tick that is."""
    rng = random.Random(4)
    rates = [8000.0, 0.0, 3000.0, 16000.0]
    region = RegionQueues(prefill_backlog=5000.0)
    t = np.sort(np.asarray([rng.uniform(0, 40) for _ in range(200)])) + 100
    prompt = np.asarray([float(rng.randint(100, 3000)) for _ in range(200)])
    own = prompt / 8000
    got = {}
    for k, rate in enumerate(rates):
        sel = (t >= 100 + 10 * k) & (t < 110 + 10 * k)
        index, ttft = region.prefill(np.flatnonzero(sel), t[sel], prompt[sel], own[sel], rate, 100 + 10 * k, 10.0,
                                     last=k == len(rates) - 1)
        got.update(zip(index.tolist(), ttft.tolist()))

    def finish(start, tokens):
        """When `tokens` of work starting at `start` are done at the ticks' rates (the last one's from then on)."""
        k = min(len(rates) - 1, int((start - 100) // 10))
        while k < len(rates) - 1 and tokens > rates[k] * (110 + 10 * k - start):
            tokens -= rates[k] * (110 + 10 * k - start)
            k, start = k + 1, 110 + 10 * k
        return start + tokens / rates[k]

    free = finish(100.0, 5000.0)  # the backlog ahead of every arrival
    assert len(got) == 200
    for i, (ti, p, o) in enumerate(zip(t, prompt, own)):
        begin = max(ti, free)
        assert got[i] == pytest.approx(begin - ti + o)
        free = finish(begin, p)
    assert free > 140  # still busy at the end, so the backlog is the last rate's work beyond it
    assert region.prefill_backlog == pytest.approx((free - 140) * rates[-1])


def test_decode_gets_a_request_when_its_prefill_ends():
    """40 requests/s for 10 s: one prefill replica (1,000 tokens/s) works off their 50-token prompts at 20 a
    second, so the decode replica (50 tokens/s) gets 40 output tokens/s of them, within what it serves, never
    the 80 of their arrival; every ITL is met, most TTFTs are late."""
    from baton.controlplane.policy import parse_policy

    policy = parse_policy("""\
tick_s: 5
signals: {window_s: 30}
clusters:
  - {name: a, region: r1, backend: local, gpus: 4}
models:
  - name: m
    regions:
      r1:
        prefill: {capacity_tokens_per_s: 1000, ttft_p90_ms: 1000, min_replicas: 1, max_replicas: 1}
        decode: {capacity_tokens_per_s: 50, itl_p90_ms: 50, min_replicas: 1, max_replicas: 1}
""")
    rows = [f"{i * 0.025:.3f},r1,50,2" for i in range(400)] + [f"{30 + i},r1,50,2" for i in range(20)]
    result = simulate(policy, load_trace(_write(pathlib.Path(tempfile.mkdtemp()), rows), policy))
    assert result.pools[("m", "r1", "decode")].attainment() == 1.0
    assert result.pools[("m", "r1", "prefill")].attainment() < 0.5
    assert result.request_attainment() == pytest.approx(result.pools[("m", "r1", "prefill")].attainment())


def _write(tmp_path, rows, name="t.csv"):
    path = tmp_path / name
    path.write_text("timestamp,region,prompt_tokens,output_tokens\n" + "".join(r + "\n" for r in rows))
    return path


@pytest.mark.parametrize("row,message", [
    ("1.0,us-east,ten,5", ":3: prompt_tokens 'ten' is not an integer"),
    ("1.0,ap-south,100,5", (":3: region 'ap-south' is not a region of model 'llama-3-8b' in the policy "
                            "(regions: eu-west, us-east)")),
    ("-1,us-east,100,5", ":3: timestamp '-1' is not a finite time >= 0"),
    ("1.0,us-east,100", ":3: 3 fields, the header has 4"),
    ("1.0,us-east,0,5", ":3: token counts must be >= 1 (prompt 0, output 5)"),
])
def test_bad_rows_are_one_line_naming_file_and_row(tmp_path, row, message):
    policy = load_policy(POLICIES / "spike.yaml")
    path = _write(tmp_path, ["0.5,eu-west,100,5", row])
    with pytest.raises(TraceError) as exc:
        load_trace(path, policy)
    assert str(exc.value) == f"{path}{message}"


def test_bad_files_are_one_line_too(tmp_path):
    policy = load_policy(POLICIES / "spike.yaml")
    path = tmp_path / "t.csv"
    path.write_text("time,region,prompt_tokens,output_tokens,model\n")
    with pytest.raises(TraceError, match=r"t.csv:1: header lacks timestamp \(has time,region"):
        load_trace(path, policy)
    path.write_text("timestamp,region,prompt_tokens,output_tokens,model\n1,us-east,5,5,llama-3-70b\n")
    with pytest.raises(TraceError, match=r"t.csv:2: model 'llama-3-70b' is not in the policy \(models: llama-3-8b\)"):
        load_trace(path, policy)
    fake = tmp_path / "t.csv.gz"
    fake.write_text("timestamp,region\n")
    with pytest.raises(TraceError, match=r"t.csv.gz: cannot read: Not a gzipped file"):
        load_trace(fake, policy)
    empty = tmp_path / "e.csv.gz"
    with gzip.open(empty, "wt") as f:
        f.write("timestamp,region,prompt_tokens,output_tokens\n")
    with pytest.raises(TraceError, match=r"e.csv.gz: no requests"):
        load_trace(empty, policy)


def test_simulate_cli_prints_the_comparison_and_writes_png_and_json(tmp_path):
    from baton.cli import app

    png, out = tmp_path / "spike.png", tmp_path / "spike.json"
    result = CliRunner().invoke(app, ["policy", "simulate", str(POLICIES / "spike.yaml"), "--trace", str(SPIKE),
                                      "--plot", str(png), "--json", str(out)])
    assert result.exit_code == 0, result.output
    for words in ("/oracle", "/static", "events", "x oracle", "x static peak", "SLO attainment"):
        assert words in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text())["total"]["events"]["planner"] > 0

    bad = _write(tmp_path, ["1.0,us-east,ten,5"])
    result = CliRunner().invoke(app, ["policy", "simulate", str(POLICIES / "spike.yaml"), "--trace", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {bad}:2: prompt_tokens 'ten' is not an integer"
    profile = tmp_path / "p.json"
    profile.write_text('{"version": 1}')
    result = CliRunner().invoke(app, ["policy", "simulate", str(POLICIES / "spike.yaml"), "--trace", str(SPIKE),
                                      "--capacity-json", str(profile)])
    assert result.exit_code == 2 and result.output.startswith(f"error: {profile}: model: Field required")
    assert "Traceback" not in result.output
    broken = tmp_path / "broken.yaml"
    broken.write_text((POLICIES / "spike.yaml").read_text().replace("ttft_p90_ms: 3000", "ttft_p90_ms: soon"))
    broken.with_name("profiles").symlink_to(POLICIES / "profiles")
    result = CliRunner().invoke(app, ["policy", "simulate", str(broken), "--trace", str(SPIKE)])
    line = next(i for i, t in enumerate(broken.read_text().splitlines(), 1) if "ttft_p90_ms: soon" in t)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[0].startswith(
        f"{broken}:{line}: models[0].regions.us-east.prefill.ttft_p90_ms: Input should be a valid number")


SPILL_POLICY = """\
tick_s: 5
signals: {{window_s: 30}}
clusters:
  - {{name: a, region: r1, backend: local, gpus: 0}}
  - {{name: b, region: r2, backend: local, gpus: 20}}
models:
  - name: m
    regions:
      r1: &dep
        prefill: {{capacity_tokens_per_s: 1000, ttft_p90_ms: {ttft_ms}, startup_s: 0}}
        decode: {{capacity_tokens_per_s: 1000, itl_p90_ms: 50, startup_s: 0}}
      r2: *dep
spillover:
  - {{from: r1, to: [r2]}}
"""


@pytest.mark.parametrize("ttft_ms,r1_met", [(100, False), (200, True)])
def test_a_request_served_in_another_region_pays_the_round_trip(tmp_path, ttft_ms, r1_met):
    # r1 has no GPUs: its replicas and all its requests go to r2, whose own requests see TTFT ~50 ms (a 50-token
    # prompt at 1000 tokens/s, no queue at 1 request/s); r1's see that plus CROSS_REGION_RTT_S (80 ms).
    from baton.controlplane.policy import parse_policy
    from baton.controlplane.startup_spill import CROSS_REGION_RTT_S

    assert CROSS_REGION_RTT_S == pytest.approx(0.08)
    policy = parse_policy(SPILL_POLICY.format(ttft_ms=ttft_ms))
    rows = [f"{i + 0.5 * k:.2f},{r},50,5" for i in range(120) for k, r in enumerate(("r1", "r2"))]
    result = simulate(policy, load_trace(_write(tmp_path, rows), policy))
    assert result.pools[("m", "r2", "prefill")].attainment() == 1.0
    r1 = result.pools[("m", "r1", "prefill")].attainment()
    assert r1 > 0.9 if r1_met else r1 < 0.1  # the first tick's r1 requests precede the spill in either case
