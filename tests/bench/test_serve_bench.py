"""Smoke run of bench/serve.py --quick: aiperf against two real `baton up` clusters (1 prefill + 1 decode,
and one colocated worker); checks the RESULT line and the JSON, not the performance (8 requests judge nothing)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
AIPERF = ROOT / ".venv-bench" / "bin" / "aiperf"


@pytest.mark.skipif(not AIPERF.is_file(), reason=f"aiperf not installed: run `python bench/serve.py --quick` "
                                                 f"once (it makes {AIPERF.parent.parent.name})")
def test_quick_run_writes_result_and_json(tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--no-install",
                           "--out", str(out), "--work-dir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT serve ")
    fields = {k: float(v) for k, v in (kv.split("=", 1) for kv in last.split()[2:])}
    for setup in ("1p1d", "coloc"):
        assert fields[f"ttft_p50_ms_{setup}_c2"] > 0 and fields[f"tok_s_{setup}_c2"] > 0
    assert fields["ttft_ratio_c2"] == pytest.approx(fields["ttft_p50_ms_1p1d_c2"] / fields["ttft_p50_ms_coloc_c2"],
                                                    rel=0.01)

    doc = json.loads(out.read_text())
    assert doc["loadgen"].startswith("aiperf ")
    assert doc["workload"] == {"isl": 96, "osl": 16, "concurrency": [2], "seed": 0, "quick": True}
    by = {r["setup"]: r for r in doc["results"]}
    assert set(by) == {"1p1d", "colocated"}
    # Every request disaggregated in 1p1d and none in the colocated setup: that is what is being compared.
    assert by["1p1d"]["remote_prefill_share"] == 1.0 and by["colocated"]["remote_prefill_share"] == 0.0
    for r in by.values():
        assert r["requests"] == 8
        assert r["completion_tokens"] == 16  # server-reported usage, ignore_eos honoured
        assert abs(r["prompt_tokens"] - 96) <= 4  # aiperf sizes the prompt with the model's chat template
        assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p90"] <= r["ttft_ms_p99"]
        assert 0 < r["e2e_ms_p50"] and r["req_s"] > 0
        assert r["tok_s"] == pytest.approx(r["req_s"] * 16, rel=0.05)
    ratios = doc["ratios_1p1d_over_colocated"]["2"]
    assert ratios["tok_s"] == pytest.approx(by["1p1d"]["tok_s"] / by["colocated"]["tok_s"])
