"""A control plane restarted under a running `baton up` cluster (gracefully, then SIGKILLed) adopts the worker
processes it finds in the worker registry: the same pids keep serving, none is started or stopped over several
ticks, and `LocalCluster.stop()` still stops every worker."""
from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from baton.devtools.local_cluster import WorkerProcess
from tests.e2e.conftest import start_cluster

pytestmark = pytest.mark.slow
TICK_S = 1


def _pids(cluster) -> dict[str, int]:
    return {r.worker_id: r.pid for r in cluster.workers()}


def _started_workers(cluster) -> set[str]:
    """Every worker the local backend ever started leaves a log named for its id in the run directory."""
    return {p.stem for p in cluster.run_dir.glob("local-*.log")}


def _status(cluster) -> dict:
    r = httpx.get(f"http://127.0.0.1:{cluster.opts.controlplane_port}/v1/status", timeout=5,
                  headers={"Authorization": f"Bearer {cluster.admin_token}"})
    r.raise_for_status()
    return r.json()


def _wait_ticks(cluster, ticks: int) -> dict:
    """Waits for the restarted control plane to answer, then for `ticks` more ticks; returns its status."""
    deadline = time.monotonic() + 30
    while True:
        try:
            _status(cluster)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the restarted control plane's admin API did not answer"
            time.sleep(0.2)
    time.sleep(ticks * TICK_S + 0.5)
    return _status(cluster)


def _complete(cluster) -> httpx.Response:
    return httpx.post(f"{cluster.url}/v1/completions", timeout=60,
                      json={"model": cluster.model_name, "prompt": "after the restart " * 8, "max_tokens": 6})


def test_restarted_control_plane_adopts_its_workers(e2e_model_dir, tmp_path):
    cluster = start_cluster(e2e_model_dir, tmp_path, prefill=1, decode=1, policy_overrides={"tick_s": TICK_S})
    try:
        before, started = _pids(cluster), _started_workers(cluster)
        assert len(before) == 2 and set(before) == started

        # A graceful restart (SIGTERM) leaves the workers running.
        cluster.restart("controlplane")
        status = _wait_ticks(cluster, 3)
        assert _pids(cluster) == before and _started_workers(cluster) == started
        assert {(p["pool"], p["ready"], p["desired"]) for p in status["pools"]} == {("prefill", 1, 1),
                                                                                     ("decode", 1, 1)}

        # A crash: the workers are in their own sessions, so SIGKILL to the control plane does not reach them.
        cp = dict(cluster.procs)["controlplane"]
        os.kill(cp.pid, signal.SIGKILL)
        cp.wait(timeout=10)
        time.sleep(1.0)
        assert all(WorkerProcess(pid).poll() is None for pid in before.values())
        cluster.restart("controlplane")
        status = _wait_ticks(cluster, 4)
        assert _pids(cluster) == before, "the restarted control plane replaced or stopped workers"
        assert _started_workers(cluster) == started, "the restarted control plane started new workers"
        assert {(p["pool"], p["ready"], p["desired"]) for p in status["pools"]} == {("prefill", 1, 1),
                                                                                     ("decode", 1, 1)}
        r = _complete(cluster)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
    finally:
        cluster.stop()
    # `baton up`'s shutdown, not the control plane, stops the adopted workers.
    assert all(WorkerProcess(pid).poll() is not None for pid in before.values())
