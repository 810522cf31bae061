"""Fault injection on a real local cluster (1 prefill + 2 decode workers, its own Redis): a prefill worker killed
while a decode worker holds blocks reserved for its hand-off, a hand-off that stalls, Redis down and back, and
SIGTERM to a decode worker mid-stream. Each test asserts what the client saw and what the workers hold after.
(A sender dying or stalling mid-byte-stream is tested on the transport itself: tests/engine/test_kv_transfer.py;
a decode worker killed mid-stream: test_migration.py; router and Redis restarts rebuilding the index:
test_kv_routing.py.)"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import redis

from baton.contracts.keys import WORKER_KEY_PREFIX
from baton.devtools.local_cluster import WorkerProcess
from tests.e2e.conftest import start_cluster
from tests.e2e.test_openai_e2e import LONG

pytestmark = pytest.mark.slow
PREFILL_TIMEOUT_S, TRANSFER_TIMEOUT_S = 3.0, 2.0


@pytest.fixture(scope="module")
def cluster(e2e_model_dir, tmp_path_factory, own_redis):
    c = start_cluster(e2e_model_dir, tmp_path_factory.mktemp("faults"), prefill=1, decode=2,
                      local_prefill_threshold=16, routing="least_load", redis_url=own_redis.url,
                      worker_settings={"prefill_timeout_s": PREFILL_TIMEOUT_S,
                                       "transfer_timeout_s": TRANSFER_TIMEOUT_S})
    yield c
    c.stop()


def _by_pool(cluster, pool: str) -> dict[str, dict]:
    """/stats of the pool's registered workers that answer (a stopped or killed one does not)."""
    stats = {}
    for record in cluster.workers():
        if record.pool == pool:
            try:
                stats[record.worker_id] = httpx.get(f"http://{record.http_address}/stats", timeout=1).json()
            except httpx.HTTPError:
                continue
    return stats


def _wait(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f}s"
        time.sleep(interval_s)


def _idle(stats: dict[str, dict]) -> bool:
    return bool(stats) and all(int(s["num_requests_running"]) == 0 and int(s["kv_blocks_used"]) == 0
                               for s in stats.values())


def _a_prefill_worker(cluster, timeout_s: float = 90.0) -> tuple[str, dict]:
    """A live prefill worker the router routes to (the control plane replaces killed ones)."""
    def live():
        ready = httpx.get(f"{cluster.url}/ready", timeout=5).json()
        found = _by_pool(cluster, "prefill")
        return next(iter(found.items())) if found and ready.get("prefill_workers") == 1 else None
    return _wait(live, timeout_s, "a live prefill worker")


def _complete(cluster, prompt: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{cluster.url}/v1/completions", timeout=120, json={
        "model": cluster.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})


def _full_or_explicit_error(response: httpx.Response, max_tokens: int) -> str:
    """'ok' for a complete completion, 'error' for an OpenAI-style error; fails on anything else."""
    body = response.json()
    if response.status_code == 200:
        assert body["usage"]["completion_tokens"] == max_tokens, body
        return "ok"
    assert response.status_code >= 400 and set(body["error"]) >= {"message", "type"}, (response.status_code, body)
    return "error"


def _in_background(fn, *args) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    thread.start()
    return thread, out


def _decode_holding_blocks(cluster) -> dict[str, dict]:
    return {w: s for w, s in _by_pool(cluster, "decode").items() if int(s["kv_blocks_used"]) > 0}


def test_prefill_worker_killed_during_hand_off_frees_the_reserved_blocks(cluster):
    prefill_id, stats = _a_prefill_worker(cluster)
    assert _complete(cluster, f"warm {LONG}").status_code == 200  # decode -> prefill channels are connected
    pid = int(stats["pid"])
    os.kill(pid, signal.SIGSTOP)  # holds the hand-off open: blocks reserved on decode, nothing written yet
    try:
        thread, out = _in_background(_complete, cluster, f"killed {LONG}")
        holders = _wait(lambda: _decode_holding_blocks(cluster), 20, "a decode worker reserving blocks")
        assert _by_pool(cluster, "decode").keys() >= holders.keys()
    finally:
        os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the request hangs after its prefill worker died"
    # The router retries around the dead prefill worker (here: the decode worker prefills locally).
    assert _full_or_explicit_error(out[0], 8) == "ok"
    settled = _wait(lambda: (s := _by_pool(cluster, "decode")) and _idle(s) and s, 20, "decode workers idle")
    assert len(settled) == 2, "a decode worker died with the prefill worker"


def _kv_bytes_sent(cluster, pid: int) -> float:
    """baton_kv_transfer_bytes_total over all transports of the worker with that pid."""
    for record in cluster.workers():
        if record.pid == pid:
            text = httpx.get(f"http://{record.http_address}/metrics", timeout=5).text
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("baton_kv_transfer_bytes_total"))
    raise AssertionError(f"no registered worker has pid {pid}")


def test_stalled_hand_off_times_out_and_frees_blocks_on_both_sides(cluster):
    _, stats = _a_prefill_worker(cluster)
    for i in range(3):  # both decode workers (least_load) connect to the new prefill worker
        assert _complete(cluster, f"warm again {i} {LONG}").status_code == 200
    pid = int(stats["pid"])
    sent_before = _kv_bytes_sent(cluster, pid)
    os.kill(pid, signal.SIGSTOP)
    try:
        thread, out = _in_background(_complete, cluster, f"stalled {LONG}")
        _wait(lambda: _decode_holding_blocks(cluster), 20, "a decode worker reserving blocks")
        stalled_at = time.monotonic()
        # The decode worker gives up after prefill_timeout_s + transfer_timeout_s (3 s if its channel to the
        # prefill worker was not connected yet). A one-sided writer (ipc) might still land bytes, so it holds the
        # blocks another transfer_timeout_s + 5 s before freeing them.
        _wait(lambda: _idle(_by_pool(cluster, "decode")), PREFILL_TIMEOUT_S + 2 * TRANSFER_TIMEOUT_S + 10,
              "decode blocks freed after the stalled hand-off")
        thread.join(60)
        assert not thread.is_alive()
        assert _full_or_explicit_error(out[0], 8) == "ok"  # retried without the stalled prefill worker
        time.sleep(max(0.0, stalled_at + 1 - time.monotonic()))
    finally:
        os.kill(pid, signal.SIGCONT)
    # Woken past the decode worker's deadline, the prefill worker writes nothing and frees its side too.
    _wait(lambda: _idle({w: s for w, s in _by_pool(cluster, "prefill").items() if int(s["pid"]) == pid}), 20,
          "prefill blocks freed after the stalled hand-off")
    assert _kv_bytes_sent(cluster, pid) == sent_before, "the woken prefill worker wrote into freed blocks"
    assert _complete(cluster, f"after the stall {LONG}").status_code == 200


def _worker_pids(cluster) -> dict[str, int]:
    return {w: int(s["pid"]) for pool in ("prefill", "decode") for w, s in _by_pool(cluster, pool).items()}


def test_redis_down_and_back(cluster, own_redis):
    _a_prefill_worker(cluster)
    before = _worker_pids(cluster)
    assert len(before) == 3
    own_redis.stop()
    try:
        time.sleep(1.0)
        # Serving goes on with the workers the router already knows, with and without remote prefill.
        for i in range(4):
            for prompt in (f"{i} short", f"{i} down {LONG}"):
                r = _complete(cluster, prompt)
                assert r.status_code == 200, r.text
        ready = httpx.get(f"{cluster.url}/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["redis"] is False
    finally:
        own_redis.start()
    # Workers re-register and the router sees Redis again; the control plane keeps the same processes.
    _wait(lambda: httpx.get(f"{cluster.url}/ready", timeout=5).status_code == 200 and len(cluster.workers()) == 3,
          30, "router ready and 3 workers registered after the Redis restart")
    assert _complete(cluster, f"after redis {LONG}").status_code == 200
    time.sleep(6)  # over a control-plane tick: it must not replace or add workers after the outage
    assert _worker_pids(cluster) == before


def _migrations(cluster) -> float:
    text = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    return next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("baton_router_migrations_total"))


def test_sigterm_drains_a_decode_worker_and_deregisters_it(cluster):
    max_tokens = 400
    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    migrations = _migrations(cluster)
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{cluster.url}/v1/completions", json={
            "model": cluster.model_name, "prompt": "drain me", "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}) as response:
        lines = response.iter_lines()
        head = [next(lines)]
        busy = {w: s for w, s in _by_pool(cluster, "decode").items() if int(s["num_requests_running"])}
        assert len(busy) == 1, busy
        (victim, stats), = busy.items()
        os.kill(int(stats["pid"]), signal.SIGTERM)
        signalled = time.monotonic()
        gone = threading.Event()
        threading.Thread(target=lambda: _wait(lambda: not client.exists(WORKER_KEY_PREFIX + victim), 10,
                                              "deregistration") and gone.set(), daemon=True).start()
        events = [json.loads(line[6:]) for line in head + list(lines) if line.startswith("data: {")]
        ended = time.monotonic()
    assert all("error" not in e for e in events), [e for e in events if "error" in e]
    assert events[-1]["usage"]["completion_tokens"] == max_tokens, "the drained stream ended early"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert gone.wait(max(0.0, 10 - (time.monotonic() - signalled))), "the draining worker stayed registered"
    assert _migrations(cluster) == migrations, "the stream was migrated instead of drained"
    assert ended - signalled > 0.2, "the stream ended right at the signal: nothing was left to drain"
    _wait(lambda: WorkerProcess(int(stats["pid"])).poll() is not None, 40, "the drained worker exiting")
