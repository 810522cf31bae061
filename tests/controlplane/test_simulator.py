"""What-if simulator on the shipped spike trace: drives the live Planner, meets the SLO, reports the oracle."""
from __future__ import annotations

import pathlib

from typer.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parents[2]
POLICY = ROOT / "deploy" / "policies" / "spike.yaml"
SPIKE = ROOT / "deploy" / "policies" / "traces" / "spike_5x.csv.gz"


def test_spike_trace_meets_slo_and_reports_gpu_hours_vs_oracle(tmp_path):
    from baton.controlplane.policy import load_policy
    from baton.controlplane.simulator import load_trace, simulate

    policy = load_policy(POLICY)
    trace = load_trace(SPIKE, policy.models[0].name)
    us = [r for r in trace if r.region == "us-east"]
    base = sum(1 for r in us if r.t < 1200) / 1200
    peak = sum(1 for r in us if 1200 <= r.t < 2100) / 900
    assert 4.5 < peak / base < 5.5  # the trace really is a sudden 5x spike

    result = simulate(policy, trace)
    for key, pool in result.pools.items():
        assert pool.total > 0
        assert pool.attainment >= 0.99, (key, pool.attainment)
    total = result.total()
    assert total.oracle_gpu_hours > 0
    assert 1.0 <= total.gpu_hours / total.oracle_gpu_hours < 4.0
    # Replicas follow the spike: more us-east prefill replicas during it than before it.
    t, reps = result.series["t"], result.series["us-east/prefill"]
    before = max(n for x, n in zip(t, reps) if 300 <= x < 1100)
    during = max(n for x, n in zip(t, reps) if 1300 <= x < 2100)
    assert during >= 2 * before, (before, during)


def test_simulate_cli_prints_table_ratio_and_writes_png(tmp_path):
    from baton.cli import app

    png = tmp_path / "spike.png"
    result = CliRunner().invoke(app, ["policy", "simulate", str(POLICY), "--trace", str(SPIKE), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "GPU-h/oracle" in result.output and "ratio" in result.output
    print(result.output)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,region,prompt_tokens,output_tokens\n1.0,us-east,ten,5\n")
    result = CliRunner().invoke(app, ["policy", "simulate", str(POLICY), "--trace", str(bad)])
    assert result.exit_code == 1 and f"{bad}:2: bad row" in result.output
