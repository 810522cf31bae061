"""Local backend: replicas are worker processes on this machine, started from an argv template."""
from __future__ import annotations

import itertools
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from baton.contracts.keys import WORKER_KEY_PREFIX, worker_key
from baton.contracts.worker_registry import WorkerRecord
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


class WorkerProcess:
    """A worker on this machine that another process started (the control plane, a Ray actor), known by the pid
    in its registry record: the part of `subprocess.Popen` that `stop_processes` uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return 0
        except PermissionError:
            return None
        try:  # a zombie has exited; only its parent's wait() is missing
            state = pathlib.Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None
        return 0 if state == "Z" else None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.05)
        return 0

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


@dataclass
class LocalWorker:
    worker_id: str
    proc: subprocess.Popen | WorkerProcess


class LocalBackend:
    """Starts and stops processes so that each (model, pool) has the asked-for number alive.

    Dead processes are reaped and replaced on the next `set_replicas`, so retrying is always safe. With
    `redis_url` set a worker counts as ready once it has registered there.

    With `keep_workers` the workers outlive this backend (`close()` leaves them; whoever launched the control
    plane stops them), and the backend adopts the live workers of its region on this machine that it finds in
    the worker registry, so a restarted control plane counts them as its replicas instead of starting more.
    """

    def __init__(self, argv: tuple[str, ...] | list[str] = WORKER_ARGV, *, region: str = "local",
                 redis_url: str = "", model_dirs: dict[str, str] | None = None,
                 log_dir: str | None = None, stop_timeout_s: float = 10.0, env: dict[str, str] | None = None,
                 keep_workers: bool = False) -> None:
        self.argv = list(argv)
        self.region = region
        self.redis_url = redis_url
        self.model_dirs = model_dirs or {}
        self.log_dir = pathlib.Path(log_dir) if log_dir else None
        self.stop_timeout_s = stop_timeout_s
        self.env = env
        self.keep_workers = keep_workers
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

    def _adopt(self, model: str, pool: str) -> None:
        """Tracks the pool's registered workers on this machine that this backend does not know yet: those a
        previous control plane started. A registry that cannot be read is an error, never "no workers"."""
        import redis

        known = {w.worker_id for ws in self._workers.values() for w in ws}
        prefix = f"{self.region}-{model}-{pool}-"
        client = redis.Redis.from_url(self.redis_url, socket_timeout=2)
        try:
            raw = [client.hgetall(k) for k in client.scan_iter(match=WORKER_KEY_PREFIX + "*")]
        except (redis.RedisError, OSError) as exc:
            raise BackendError(f"local cluster {self.region}: cannot read the worker registry to adopt running "
                               f"workers: {exc}") from None
        finally:
            client.close()
        host, seq = socket.gethostname(), -1
        for h in raw:
            try:
                r = WorkerRecord.from_hash(h)
            except (ValueError, TypeError):
                continue  # expired between SCAN and HGETALL
            if not r.worker_id.startswith(prefix) or r.host != host or r.pid <= 0:
                continue
            seq = max(seq, int(r.worker_id[len(prefix):]) if r.worker_id[len(prefix):].isdigit() else -1)
            if r.worker_id not in known and _runs_worker(r.pid, r.worker_id):
                self._workers.setdefault((model, pool), []).append(LocalWorker(r.worker_id, WorkerProcess(r.pid)))
        if seq >= 0:  # new workers' ids must not repeat an adopted one's
            self._seq = itertools.count(max(seq + 1, next(self._seq)))

    def _reap(self, model: str, pool: str) -> list[LocalWorker]:
        if self.keep_workers and self.redis_url:
            self._adopt(model, pool)
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
        if self.keep_workers:
            return
        stop_processes([w.proc for w in everyone], self.stop_timeout_s)


def _runs_worker(pid: int, worker_id: str) -> bool:
    """Whether `pid` is alive and still the process of `worker_id` (a pid may be reused after a worker died)."""
    if WorkerProcess(pid).poll() is not None:
        return False
    try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc here: a live pid named by a fresh registry record is trusted
    return worker_id.encode() in argv
