"""`baton up --ray`: the same workers as Ray actors on a local Ray cluster give the same answers."""
from __future__ import annotations

import os

import httpx
import pytest

from tests.e2e.conftest import start_cluster
from tests.e2e.test_openai_e2e import LONG, greedy, worker_stats

pytestmark = pytest.mark.slow


def test_ray_cluster_serves_and_stops_its_workers(e2e_model_dir, tmp_path):
    pytest.importorskip("ray")
    from baton.engine.config import EngineConfig
    from baton.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(str(e2e_model_dir), num_kv_blocks=128, show_progress=False))
    cluster = start_cluster(e2e_model_dir, tmp_path, prefill=1, decode=1, local_prefill_threshold=24, ray=True)
    try:
        for prompt in ("Hi", LONG):  # local prefill, then remote prefill + KV hand-off between Ray actors
            r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
                "model": cluster.model_name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == greedy(engine, engine.tokenizer.encode(prompt), 12)["text"]
        stats = worker_stats(cluster)
        pids = [s["pid"] for s in stats.values()]
        assert sorted(s["pool"] for s in stats.values()) == ["decode", "prefill"]
    finally:
        cluster.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the Ray actors' worker processes are gone with the cluster
