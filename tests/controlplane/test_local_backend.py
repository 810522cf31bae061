"""LocalBackend starts and stops real processes from an argv template (the real `baton` workers later)."""
from __future__ import annotations

import time

import pytest

from baton.controlplane.backends.base import BackendError, ReplicaCount
from baton.controlplane.backends.local import LocalBackend
from tests.controlplane.conftest import sleeper


def _wait_files(path, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(path.glob("*.argv"))
        if len(files) >= n:
            return files
        time.sleep(0.05)
    raise AssertionError(f"only {len(list(path.glob('*.argv')))} of {n} workers wrote their argv")


def test_scale_real_processes_up_and_down(tmp_path, redis_url):
    import redis

    backend = LocalBackend(sleeper(tmp_path), region="r1", redis_url=redis_url,
                           model_dirs={"m": "/models/m"}, stop_timeout_s=5)
    try:
        backend.set_replicas("m", "decode", 3)
        backend.set_replicas("m", "decode", 3)  # idempotent: no extra process
        workers = backend.workers("m", "decode")
        assert len(workers) == 3 and len({w.proc.pid for w in workers}) == 3
        # Ready means registered in Redis, as a real worker does once it serves.
        assert backend.get_replicas("m", "decode").ready == 0
        client = redis.Redis.from_url(redis_url)
        for w in workers[:2]:
            client.hset(f"baton:worker:{w.worker_id}", "pool", "decode")
        assert backend.get_replicas("m", "decode").ready == 2
        args = _wait_files(tmp_path, 3)[0].read_text().split()
        assert args[args.index("--model") + 1] == "/models/m"
        assert args[args.index("--region") + 1] == "r1"
        assert args[args.index("--pool") + 1] == "decode"
        assert args[args.index("--grpc-port") + 1] == "0"  # the worker binds a free port itself

        oldest = workers[0].proc
        backend.set_replicas("m", "decode", 1)
        assert [w.proc for w in backend.workers("m", "decode")] == [oldest]
        assert all(w.proc.poll() is not None for w in workers[1:])  # stopped, not just forgotten

        oldest.kill()  # a crashed worker is replaced on the next (retried) call
        oldest.wait()
        assert backend.get_replicas("m", "decode").desired == 0
        backend.set_replicas("m", "decode", 1)
        assert backend.get_replicas("m", "decode").desired == 1
    finally:
        backend.close()
    assert backend.get_replicas("m", "decode").desired == 0


def test_bad_template_and_missing_binary_are_clear_errors(tmp_path):
    with pytest.raises(BackendError, match="template"):
        LocalBackend(["echo", "{nope}"]).set_replicas("m", "prefill", 1)
    with pytest.raises(BackendError, match="cannot start local worker"):
        LocalBackend([str(tmp_path / "no-such-binary")]).set_replicas("m", "prefill", 1)


def test_stop_processes_terminates_then_kills_what_ignores_sigterm():
    import subprocess
    import sys

    from baton.controlplane.backends.local import stop_processes

    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    ignore_sigterm = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "print('up', flush=True); time.sleep(600)")
    stubborn = subprocess.Popen([sys.executable, "-c", ignore_sigterm], stdout=subprocess.PIPE)
    assert stubborn.stdout.readline() == b"up\n"  # its SIGTERM handler is in place
    started = time.monotonic()
    stop_processes([polite, stubborn], timeout_s=1.0)
    assert polite.returncode == -15 and stubborn.returncode == -9
    assert time.monotonic() - started < 5  # one shared deadline, not one per process


def test_a_new_backend_adopts_the_registered_workers_a_previous_one_left_running(tmp_path, redis_url):
    """What a restarted control plane does under `baton up`: the old backend leaves its workers on close, the new
    one counts them as its replicas (no new process), and can still stop them, though they are not its children."""
    import os
    import socket

    import redis

    from baton.contracts.worker_registry import WorkerRecord

    old = LocalBackend(sleeper(tmp_path), region="r2", redis_url=redis_url, stop_timeout_s=5, keep_workers=True)
    old.set_replicas("m", "decode", 2)
    workers = old.workers("m", "decode")
    pids = {w.worker_id: w.proc.pid for w in workers}
    client = redis.Redis.from_url(redis_url)
    for worker_id, pid in pids.items():  # what each worker registers once it serves
        client.hset(f"baton:worker:{worker_id}", mapping=WorkerRecord(
            worker_id=worker_id, pool="decode", grpc_address="127.0.0.1:1", model="m", region="r2",
            host=socket.gethostname(), pid=pid).to_hash())
    # A record whose pid is now another program's is not adopted.
    client.hset("baton:worker:r2-m-decode-9", mapping=WorkerRecord(
        worker_id="r2-m-decode-9", pool="decode", grpc_address="127.0.0.1:1", model="m", region="r2",
        host=socket.gethostname(), pid=os.getpid()).to_hash())
    old.close()
    assert all(w.proc.poll() is None for w in workers), "keep_workers: close() must leave the workers running"

    new = LocalBackend(sleeper(tmp_path), region="r2", redis_url=redis_url, stop_timeout_s=5, keep_workers=True)
    try:
        assert new.get_replicas("m", "decode") == ReplicaCount(desired=2, ready=2)
        new.set_replicas("m", "decode", 2)
        assert {w.worker_id: w.proc.pid for w in new.workers("m", "decode")} == pids
        new.set_replicas("m", "decode", 3)  # a new worker's id follows the highest one registered
        started = [w.worker_id for w in new.workers("m", "decode") if w.worker_id not in pids]
        assert started == ["r2-m-decode-10"]
        new.set_replicas("m", "decode", 0)
        assert all(w.proc.poll() is not None for w in workers), "adopted workers are stopped like own ones"
    finally:
        new.set_replicas("m", "decode", 0)
        client.delete(*(f"baton:worker:{w}" for w in [*pids, "r2-m-decode-9"]))
        client.close()
