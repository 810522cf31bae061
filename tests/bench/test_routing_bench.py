"""Smoke run of bench/routing.py --quick: a real cluster, three routers, both workloads; checks the RESULT
line and the JSON it writes, not the performance targets (a 2-worker smoke run is too small to judge them)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_run_writes_result_and_json(tmp_path):
    out = tmp_path / "routing.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "routing.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT routing ")
    fields = dict(kv.split("=", 1) for kv in last.split()[2:])
    for key in ("chat_ttft_p50_speedup", "shared_ttft_p50_speedup", "chat_hit_vs_oracle", "shared_hit_vs_oracle",
                "decision_p99_us"):
        assert float(fields[key]) > 0, key

    doc = json.loads(out.read_text())
    assert (tmp_path / "routing_ttft_cdf.png").stat().st_size > 10_000
    assert set(doc["workloads"]) == {"chat", "shared"}
    for name, rows in doc["workloads"].items():
        assert set(rows) == {"round_robin", "least_load", "kv_aware"}
        oracle = next(iter(rows.values()))["oracle_hit_rate"]
        assert 0 < oracle < 1
        for policy, r in rows.items():
            # The worker counters account for every prompt token the client sent, and agree with the router.
            assert r["prefill_tokens_computed"] + r["cached_tokens"] - r["counted_minus_sent_tokens"] == r["prompt_tokens"]
            assert abs(r["counted_minus_sent_tokens"]) <= 0.05 * r["prompt_tokens"], (name, policy)
            assert r["router_reported_cached"] == r["cached_tokens"], (name, policy)
            # No policy can beat a global cache of infinite capacity.
            assert r["hit_rate"] <= oracle + 1e-9, (name, policy)
            assert len(r["ttft_ms"]) == r["requests"] and 0 < r["ttft_p50_ms"] <= r["ttft_p90_ms"]
    d = doc["decision_latency"]
    assert d["index_entries"] >= 100_000
    assert 0 < d["kv_aware"]["cpu"]["p50_us"] <= d["kv_aware"]["cpu"]["p99_us"] <= d["kv_aware"]["wall"]["p99_us"] * 1.5
    assert set(doc["targets_met"]) == {"ttft_p50_2x", "hit_90pct_of_oracle", "decision_p99_le_1ms"}
