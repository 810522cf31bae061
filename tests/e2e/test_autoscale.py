"""The control plane scales the decode pool of a `baton up` cluster with real worker processes: up under a
load step (and the router sends traffic to the new worker), back down when the load goes away."""
from __future__ import annotations

import itertools
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import start_cluster
from tests.e2e.test_openai_e2e import LONG, worker_stats

pytestmark = pytest.mark.slow


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_decode_pool_follows_a_load_step(e2e_model_dir, tmp_path):
    quick = {"stabilization_s": 0, "cooldown_s": 0, "max_step": 1}
    cluster = start_cluster(e2e_model_dir, tmp_path, prefill=0, decode=1, max_decode=2,
                            local_prefill_threshold=10_000, policy_overrides={
                                "tick_s": 1, "signals": {"window_s": 4, "stale_after_s": 10},
                                "decode": {"capacity_tokens_per_s": 20, "startup_s": 1, "scale_up": quick,
                                           "scale_down": {**quick, "stabilization_s": 3}}})
    stop = threading.Event()

    def load(n):
        with httpx.Client(timeout=60) as http:
            for i in itertools.count():
                if stop.is_set():
                    return
                # Distinct prompts, so no worker is preferred for a cached prefix.
                http.post(f"{cluster.url}/v1/completions", json={
                    "model": cluster.model_name, "prompt": f"{n}.{i} {LONG[:60]}", "max_tokens": 24,
                    "ignore_eos": True})

    threads = [threading.Thread(target=load, args=(n,)) for n in range(3)]
    try:
        for t in threads:
            t.start()
        decodes = lambda: [w for w, s in worker_stats(cluster).items() if s["pool"] == "decode"]  # noqa: E731
        wait_for(lambda: len(decodes()) == 2, 90, "a second decode worker")
        wait_for(lambda: all(int(s["generation_tokens_total"]) > 0 for s in worker_stats(cluster).values()),
                 30, "the router to use the new decode worker")
        stop.set()
        for t in threads:
            t.join()
        wait_for(lambda: cluster.registered()["decode"] == 1, 90, "scale-down back to one decode worker")
        r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
            "model": cluster.model_name, "prompt": "still serving", "max_tokens": 4})
        assert r.status_code == 200, r.text
        # The decision is logged once the backend has acted, which can be just after the worker left.
        log = wait_for(lambda: "decode 2 -> 1" in (text := (cluster.run_dir / "controlplane.log").read_text())
                       and text, 10, "the scale-down decision in the log")
        assert "decode 1 -> 2" in log
        assert "prefill 0 -> 1" not in log  # max_replicas 0 keeps the prefill pool empty under load
    finally:
        stop.set()
        cluster.stop()
