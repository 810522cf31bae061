"""bench/engine_cpu.py runs end to end (tiny model, --quick) and its RESULT line agrees with its JSON."""
from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quick_run_prints_result_and_writes_json(tmp_path):
    out = tmp_path / "engine_cpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "engine_cpu.py"), "--quick", "--batch-sizes", "1,3",
                           "--out", str(out)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT engine_cpu "), proc.stdout[-2000:]
    fields = dict(kv.split("=", 1) for kv in last.split()[2:])

    data = json.loads(out.read_text())
    assert data["quick"] is True and data["threads"] >= 1
    assert [r["batch"] for r in data["rows"]] == [1, 3, 1]
    for key in ("baton_b1_tok_s", "hf_b1_tok_s", "ratio_b1", "baton_b3_tok_s", "hf_b3_tok_s", "ratio_b3",
                "baton_ttft32_ms", "hf_ttft32_ms", "ttft32_ratio"):
        value = float(fields[key])
        assert math.isfinite(value) and value > 0, key
        assert value == data["result"][key]
    b3 = data["rows"][1]
    assert math.isclose(float(fields["ratio_b3"]), b3["baton"]["decode_tok_s"] / b3["hf"]["decode_tok_s"],
                        rel_tol=1e-2)
    # Same weights, greedy, float32: the engine must produce transformers' tokens, so the speeds compare like
    # for like.
    assert fields["same_tokens"] == "true"


def test_bad_arguments_are_clear_errors():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "engine_cpu.py"), "--batch-sizes", "1,x"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "--batch-sizes must be comma-separated integers" in proc.stderr
    assert "Traceback" not in proc.stderr
