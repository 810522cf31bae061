"""Local backend: replicas are worker processes on this machine, started from an argv template."""
from __future__ import annotations

import itertools
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from baton.contracts.keys import worker_key
from baton.controlplane.backends.base import BackendError, ReplicaCount
from baton.controlplane.policy import ClusterSpec

# The worker command of the local and Ray backends; `baton up` appends its options, tests hand any other command.
WORKER_ARGV = (
    sys.executable, "-m", "baton.cli", "{pool}-worker", "--model", "{model_dir}",
    "--redis-url", "{redis_url}", "--region", "{region}", "--worker-id", "{worker_id}",
    "--grpc-port", "{grpc_port}", "--http-port", "{http_port}",
)


def worker_argv(template: Sequence[str], *, worker_id: str, pool: str, model: str, model_dir: str, redis_url: str,
                region: str) -> list[str]:
    """The command of one worker of either backend. Workers get port 0 and bind a free port themselves (a port
    picked here could be taken before the child binds it); they publish the real addresses in Redis."""
    values = {"pool": pool, "model": model, "model_dir": model_dir, "redis_url": redis_url, "region": region,
              "worker_id": worker_id, "grpc_port": 0, "http_port": 0}
    try:
        return [part.format(**values) for part in template]
    except (KeyError, IndexError, ValueError) as exc:
        raise BackendError(f"worker command template {list(template)!r} is invalid: {exc!r}") from None


class Process(Protocol):
    """What `stop_processes` needs of a process: `subprocess.Popen` has it."""

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


def stop_processes(procs: Sequence[Process], timeout_s: float) -> None:
    """SIGTERM every process still running, give them `timeout_s` together to exit (workers drain), then
    SIGKILL the rest. Returns once every one has exited."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class LocalWorker:
    worker_id: str
    proc: subprocess.Popen


class LocalBackend:
    """Starts and stops processes so that each (model, pool) has the asked-for number alive.

    Dead processes are reaped and replaced on the next `set_replicas`, so retrying is always safe. With
    `redis_url` set a worker counts as ready once it has registered there.
    """

    def __init__(self, argv: tuple[str, ...] | list[str] = WORKER_ARGV, *, region: str = "local",
                 redis_url: str = "", model_dirs: dict[str, str] | None = None,
                 log_dir: str | None = None, stop_timeout_s: float = 10.0, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.region = region
        self.redis_url = redis_url
        self.model_dirs = model_dirs or {}
        self.log_dir = pathlib.Path(log_dir) if log_dir else None
        self.stop_timeout_s = stop_timeout_s
        self.env = env
        self._workers: dict[tuple[str, str], list[LocalWorker]] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()

    @classmethod
    def from_cluster(cls, cluster: ClusterSpec, **options) -> LocalBackend:
        if cluster.worker_command:
            options.setdefault("argv", cluster.worker_command)
        return cls(region=cluster.region, **options)

    def workers(self, model: str, pool: str) -> list[LocalWorker]:
        with self._lock:
            return list(self._reap(model, pool))

    def _reap(self, model: str, pool: str) -> list[LocalWorker]:
        alive = [w for w in self._workers.get((model, pool), []) if w.proc.poll() is None]
        self._workers[(model, pool)] = alive
        return alive

    def _ready(self, workers: list[LocalWorker]) -> int:
        if not self.redis_url or not workers:
            return len(workers)
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            return int(client.exists(*(worker_key(w.worker_id) for w in workers)))
        except (redis.RedisError, OSError):
            return 0  # unknown: nothing counts as ready, so no drain-back happens on a guess
        finally:
            client.close()

    def get_replicas(self, model: str, pool: str) -> ReplicaCount:
        alive = self.workers(model, pool)
        return ReplicaCount(desired=len(alive), ready=self._ready(alive))

    def _start(self, model: str, pool: str) -> LocalWorker:
        worker_id = f"{self.region}-{model}-{pool}-{next(self._seq)}"
        argv = worker_argv(self.argv, worker_id=worker_id, pool=pool, model=model,
                           model_dir=self.model_dirs.get(model, model), redis_url=self.redis_url, region=self.region)
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{worker_id}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **self.env} if self.env else None)
        except OSError as exc:
            raise BackendError(f"cannot start local worker {argv[0]!r}: {exc.strerror}") from None
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return LocalWorker(worker_id, proc)

    def set_replicas(self, model: str, pool: str, replicas: int) -> None:
        with self._lock:
            alive = self._reap(model, pool)
            while len(alive) < replicas:
                alive.append(self._start(model, pool))
            extra = alive[replicas:]
            del alive[replicas:]
        stop_processes([w.proc for w in extra], self.stop_timeout_s)

    def free_gpus(self, pools: list[tuple[str, str]]) -> int | None:
        return None  # processes on this machine: the policy's `gpus` says how many it has

    def close(self) -> None:
        with self._lock:
            everyone = [w for ws in self._workers.values() for w in ws]
            self._workers.clear()
        stop_processes([w.proc for w in everyone], self.stop_timeout_s)
