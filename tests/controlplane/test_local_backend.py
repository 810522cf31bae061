"""LocalBackend starts and stops real processes from an argv template (the real `baton` workers later)."""
from __future__ import annotations

import time

import pytest

from baton.controlplane.backends.base import BackendError
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
