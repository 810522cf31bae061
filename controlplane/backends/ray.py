"""Ray backend: each replica is a named detached actor that owns one worker process on its node."""
from __future__ import annotations

import os
import re
import subprocess

# Ray's C++ failure-signal handler takes SIGTERM over from the process that calls ray.init and aborts it 3 s
# later (absl's alarm), which cut the control plane's graceful stop short and left its workers running after it.
# The control plane handles SIGTERM itself; this must be set before Ray is imported.
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

import ray

from baton.controlplane.backends.base import BackendError, ReplicaCount
from baton.controlplane.backends.local import WORKER_ARGV, stop_processes, worker_argv
from baton.controlplane.policy import ClusterSpec


@ray.remote
class WorkerActor:
    """Runs the worker command where Ray placed it; Ray's resources (num_gpus) pin it to a device."""

    def __init__(self, argv: list[str], log_path: str | None = None) -> None:
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        if log_path:
            out.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_processes([self.proc], timeout_s)


class RayBackend:
    """Names actors `baton-<cluster>-<model>-<pool>-<i>`, so the count survives a control-plane restart."""

    def __init__(self, *, cluster: str, address: str | None = None, argv: list[str] | tuple[str, ...] = WORKER_ARGV,
                 region: str = "local", redis_url: str = "", model_dirs: dict[str, str] | None = None,
                 namespace: str = "baton", actor_options: dict | None = None, call_timeout_s: float = 30.0,
                 log_dir: str | None = None) -> None:
        self.cluster = cluster
        self.argv = list(argv)
        self.region = region
        self.redis_url = redis_url
        self.model_dirs = model_dirs or {}
        self.namespace = namespace
        self.actor_options = actor_options or {"num_cpus": 0}
        self.call_timeout_s = call_timeout_s
        self.log_dir = log_dir
        # A Ray instance this process starts dies with it; its actors' worker processes must not outlive it.
        self._owns_cluster = address in (None, "local") and not ray.is_initialized()
        if not ray.is_initialized():
            try:
                ray.init(address=None if address in (None, "local") else address, namespace=namespace,
                         include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError) as exc:
                raise BackendError(f"cluster {cluster}: cannot reach Ray at {address!r}: {exc}") from None

    @classmethod
    def from_cluster(cls, cluster: ClusterSpec, **options) -> RayBackend:
        if cluster.worker_command:
            options.setdefault("argv", cluster.worker_command)
        return cls(cluster=cluster.name, address=cluster.ray_address, region=cluster.region, **options)

    def _prefix(self, model: str, pool: str) -> str:
        return f"baton-{self.cluster}-{model}-{pool}-"

    def _indices(self, model: str, pool: str) -> list[int]:
        pattern = re.compile(re.escape(self._prefix(model, pool)) + r"(\d+)$")
        names = ray.util.list_named_actors(all_namespaces=False)
        return sorted(int(m.group(1)) for n in names if (m := pattern.match(n)))

    def actor(self, model: str, pool: str, index: int):
        return ray.get_actor(f"{self._prefix(model, pool)}{index}", namespace=self.namespace)

    def _live_actors(self, model: str, pool: str) -> list:
        """Handles of the pool's actors. A killed actor's name can still be listed for a moment after
        ray.kill() but no longer looked up: it is gone, not an error."""
        handles = []
        for i in self._indices(model, pool):
            try:
                handles.append(self.actor(model, pool, i))
            except ValueError:
                continue
        return handles

    def get_replicas(self, model: str, pool: str) -> ReplicaCount:
        handles = self._live_actors(model, pool)
        refs = [h.alive.remote() for h in handles]
        try:
            ready = sum(ray.get(refs, timeout=self.call_timeout_s))
        except (ray.exceptions.RayError, TimeoutError) as exc:
            raise BackendError(f"cluster {self.cluster}: cannot query {model}/{pool} actors: {exc}") from None
        return ReplicaCount(desired=len(handles), ready=ready)

    def set_replicas(self, model: str, pool: str, replicas: int) -> None:
        have = set(self._indices(model, pool))
        for i in range(replicas):
            if i in have:
                continue
            worker_id = f"{self.region}-{model}-{pool}-{i}"
            argv = worker_argv(self.argv, worker_id=worker_id, pool=pool, model=model,
                               model_dir=self.model_dirs.get(model, model), redis_url=self.redis_url,
                               region=self.region)
            WorkerActor.options(name=f"{self._prefix(model, pool)}{i}", lifetime="detached",
                                get_if_exists=True, **self.actor_options).remote(
                argv, f"{self.log_dir}/{worker_id}.log" if self.log_dir else None)
        # Stop the extra replicas together; each stop returns once its worker process has exited.
        handles = [self.actor(model, pool, i) for i in sorted(have - set(range(replicas)), reverse=True)]
        try:
            ray.get([h.stop.remote() for h in handles], timeout=self.call_timeout_s)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # the actors are going away either way; kill below makes it certain
        for handle in handles:
            ray.kill(handle)

    def free_gpus(self, pools: list[tuple[str, str]]) -> int | None:
        """Ray's available GPUs plus those our replicas hold; None when our actors ask for no GPUs."""
        per_replica = float(self.actor_options.get("num_gpus", 0) or 0)
        if per_replica <= 0:
            return None
        ours = sum(len(self._indices(m, p)) for m, p in pools) * per_replica
        return int(ray.available_resources().get("GPU", 0.0) + ours)

    def close(self) -> None:
        """Leaves detached actors running on a shared Ray cluster: they are its replicas, not this process's.
        On a Ray instance this process started, which ends with it, stops them so no worker is orphaned."""
        if not self._owns_cluster or not ray.is_initialized():
            return
        prefix = re.compile(re.escape(f"baton-{self.cluster}-") + r"(.+)-(prefill|decode)-\d+$")
        for name in ray.util.list_named_actors(all_namespaces=False):
            m = prefix.match(name)
            if m:
                self.set_replicas(m.group(1), m.group(2), 0)
