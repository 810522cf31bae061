"""The control plane scales the embed pool of a `baton up` cluster with real embed-worker processes: from one to two
under a load of /v1/embeddings requests, and the router sends inputs to the new worker. (Scaling back down goes through
the same planner code as the generation pools; tests/controlplane/test_planner_embed.py covers it without the
minute a cluster's forecast takes to forget the load.)"""
from __future__ import annotations

import itertools
import threading

import httpx
import pytest

from tests.e2e.conftest import start_cluster
from tests.e2e.test_autoscale import wait_for
from tests.e2e.test_openai_e2e import worker_stats

pytestmark = pytest.mark.slow


def test_embed_pool_follows_a_load_step(e2e_model_dir, tmp_path):
    quick = {"stabilization_s": 0, "cooldown_s": 0, "max_step": 1}
    cluster = start_cluster(e2e_model_dir, tmp_path, prefill=0, decode=0, embed=1, max_embed=2, policy_overrides={
        "tick_s": 1, "signals": {"window_s": 4, "stale_after_s": 10},
        "embed": {"capacity_inputs_per_s": 20, "queue_time_p90_ms": 200, "startup_s": 1, "scale_up": quick}})
    stop = threading.Event()
    statuses: list[int] = []

    def load(n):
        with httpx.Client(timeout=60) as http:
            for i in itertools.count():
                if stop.is_set():
                    return
                r = http.post(f"{cluster.url}/v1/embeddings", json={
                    "model": cluster.model_name, "input": [f"load {n}.{i}.{k} of the embed pool" for k in range(16)]})
                statuses.append(r.status_code)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(3)]
    embeds = lambda: {w: s for w, s in worker_stats(cluster).items() if s["pool"] == "embed"}  # noqa: E731
    try:
        assert cluster.registered()["embed"] == 1
        for t in threads:
            t.start()
        wait_for(lambda: len(embeds()) == 2, 45, "a second embed worker")
        wait_for(lambda: all(s["inputs"] > 0 for s in embeds().values()), 20, "the router to use the new worker")
        stop.set()
        for t in threads:
            t.join()
        assert statuses and set(statuses) == {200}
        log = (cluster.run_dir / "controlplane.log").read_text()
        assert "embed 0 -> 1" in log and "embed 1 -> 2" in log  # the control plane started both
        assert "prefill 0 -> 1" not in log and "decode 0 -> 1" not in log  # an embedding-only cluster
    finally:
        stop.set()
        cluster.stop()
