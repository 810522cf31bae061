"""CI's soak: bench/soak.py with 8 clients for 30 s of load (the default is 100 clients x 600 s; 30 s keeps the
suite's budget on 2 cores, and still kills and replaces a decode worker halfway). Every request ends complete,
with an explicit error or by the client's own disconnect; none is lost, no KV block is left."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_short_soak_loses_nothing_and_leaks_nothing(tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--clients", "8", "--duration", "30",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT soak ")
    result = json.loads(out.read_text())["result"]
    assert result["lost"] == 0 and result["leaked_blocks"] == 0 and result["requests_left_running"] == 0, result
    assert result["complete"] > 50 and result["disconnected"] > 0, result
    assert result["requests"] == sum(result[k] for k in ("complete", "error", "disconnected", "lost"))
    assert result["decode_replaced_after_s"] > 0, "the killed decode worker was not replaced"
    doc = json.loads(out.read_text())
    assert doc["rss_kb_start"]["router"] > 0 and doc["rss_kb_end"]["router"] > 0
