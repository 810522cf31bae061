"""Starts real `baton` worker processes for tests and waits until they report ready."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from tests.conftest import free_port


@dataclass
class WorkerProc:
    pool: str
    worker_id: str
    grpc_port: int
    http_port: int
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_worker(pool: str, model_dir: str, redis_url: str, worker_id: str, *extra: str,
                 timeout_s: float = 90.0) -> WorkerProc:
    grpc_port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "baton.cli", f"{pool}-worker", "--model", model_dir, "--redis-url", redis_url,
           "--worker-id", worker_id, "--grpc-port", str(grpc_port), "--http-port", str(http_port),
           "--num-kv-blocks", "256", "--torch-threads", "1", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    worker = WorkerProc(pool, worker_id, grpc_port, http_port, proc)
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            worker.lines.append(line)
            if "ready: grpc=" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            worker.stop(kill=True)
            raise RuntimeError(f"{pool} worker did not start:\n" + "".join(worker.lines[-40:]))
    return worker
