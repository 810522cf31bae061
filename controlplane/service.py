"""The live control plane: each tick reads signals and clusters, runs the planner, acts, publishes spillover."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import asdict
from typing import Callable

from baton.contracts.keys import spillover_key
from baton.controlplane import metrics
from baton.controlplane.backends.base import BackendError, CapacityBackend, backend_for
from baton.controlplane.placement import ClusterState
from baton.controlplane.planner import Decision, Planner, TickInput, TickOutput
from baton.controlplane.policy import Policy, PolicyError, PolicyFile, parse_policy
from baton.controlplane.signals import SignalReader, SignalWindow

log = logging.getLogger("baton.controlplane")


def decision_dict(d: Decision) -> dict:
    return {**asdict(d), "limits": list(d.limits), "direction": d.direction}


class ControlPlane:
    """One global control plane over every cluster of a policy. `redis` is a redis.asyncio client.

    `backends` maps cluster name to a ready backend (tests, `baton up`); clusters not in it get one built
    from the policy with `backend_options`. A cluster whose backend fails is reported unhealthy and the
    others are still planned and acted on.
    """

    def __init__(self, policy: Policy | PolicyFile, redis, *, backends: dict[str, CapacityBackend] | None = None,
                 backend_options: dict | None = None, clock: Callable[[], float] = time.time,
                 keep_decisions: int = 1000) -> None:
        self.policy_file = policy if isinstance(policy, PolicyFile) else None
        self.policy: Policy = policy.policy if isinstance(policy, PolicyFile) else policy
        self.policy_source = str(self.policy_file.path) if self.policy_file else "<memory>"
        self.redis = redis
        self.reader = SignalReader(redis)
        self.backends: dict[str, CapacityBackend] = dict(backends or {})
        self.backend_options = backend_options or {}
        self.clock = clock
        self.planner = Planner()
        self.decisions: deque[Decision] = deque(maxlen=keep_decisions)
        self.last: TickOutput | None = None
        self.last_signals: dict[tuple[str, str, str], SignalWindow | None] = {}
        self.last_clusters: dict[str, ClusterState] = {}
        self._published: set[str] = set()
        self._free_gpus_errors: dict[str, str] = {}

    # --- policy -------------------------------------------------------------------------------------
    def _maybe_reload(self) -> None:
        if self.policy_file is not None and self.policy_file.reload_if_changed():
            self.policy = self.policy_file.policy
            self.policy_source = str(self.policy_file.path)
            log.info("reloaded policy %s", self.policy_file.path)
        elif self.policy_file is not None and self.policy_file.last_error is not None:
            log.warning("policy file invalid, keeping the last good one:\n%s", self.policy_file.last_error)

    @property
    def policy_error(self) -> str:
        err = self.policy_file.last_error if self.policy_file else None
        return str(err) if err else ""

    def dry_run(self, text: str, source: str = "<dry-run>") -> tuple[list[str], list[Decision]]:
        """What `text` would decide on the latest signals and cluster states; changes nothing."""
        try:
            policy = parse_policy(text, source)
        except PolicyError as exc:
            return exc.errors, []
        out = Planner().tick(TickInput(now=self.clock(), policy=policy, signals=self.last_signals,
                                       clusters=self.last_clusters))
        return [], out.decisions

    def apply(self, text: str, source: str = "<api>") -> list[str]:
        """Makes `text` the running policy (until the policy file changes again); returns errors if any."""
        try:
            self.policy = parse_policy(text, source)
        except PolicyError as exc:
            return exc.errors
        self.policy_source = source
        return []

    # --- one tick -----------------------------------------------------------------------------------
    def _backend(self, name: str) -> CapacityBackend:
        if name not in self.backends:
            cluster = next(c for c in self.policy.clusters if c.name == name)
            self.backends[name] = backend_for(cluster, **self.backend_options.get(cluster.backend, {}))
        return self.backends[name]

    def _read_cluster(self, name: str, pairs: list[tuple[str, str]]) -> ClusterState:
        try:
            backend = self._backend(name)
            ready = {pair: backend.get_replicas(*pair).ready for pair in pairs}
        except (BackendError, OSError) as exc:
            return ClusterState(healthy=False, error=str(exc))
        try:
            free = backend.free_gpus(pairs)
            self._free_gpus_errors.pop(name, None)
        except (BackendError, OSError) as exc:
            # Replicas are readable, so the cluster is up; plan on the policy's `gpus` until free GPUs are too
            # (e.g. a Role that may not list nodes). Said once per cluster and error, not every tick.
            if self._free_gpus_errors.get(name) != str(exc):
                log.warning("cluster %s: free GPUs unknown, using the policy's gpus: %s", name, exc)
            self._free_gpus_errors[name] = str(exc)
            free = None
        return ClusterState(ready=ready, free_gpus=free)

    def _act(self, name: str, targets: dict[tuple[str, str], int]) -> str | None:
        try:
            backend = self._backend(name)
            for (model, pool), n in sorted(targets.items()):
                backend.set_replicas(model, pool, n)
        except (BackendError, OSError) as exc:
            return str(exc)
        return None

    async def tick(self) -> TickOutput:
        self._maybe_reload()
        policy, now = self.policy, self.clock()
        keys = policy.pool_keys()
        self.last_signals = await self.reader.windows(keys, now, policy.signals.window_s,
                                                      policy.signals.stale_after_s, recent_s=policy.tick_s)
        pairs = sorted({(m, p) for m, _r, p in keys})
        names = [c.name for c in policy.clusters]
        states = await asyncio.gather(*(asyncio.to_thread(self._read_cluster, n, pairs) for n in names))
        self.last_clusters = dict(zip(names, states))
        out = self.planner.tick(TickInput(now=now, policy=policy, signals=self.last_signals,
                                          clusters=self.last_clusters))
        per_cluster: dict[str, dict[tuple[str, str], int]] = {n: {} for n in names}
        for (cname, model, pool), n in out.placement.targets.items():
            per_cluster[cname][(model, pool)] = n
        # Unreachable clusters keep what they run; we neither read nor change them this tick.
        healthy = [n for n in names if self.last_clusters[n].healthy]
        errors = await asyncio.gather(*(asyncio.to_thread(self._act, n, per_cluster[n]) for n in healthy))
        for name, err in zip(healthy, errors):
            if err:
                self.last_clusters[name] = ClusterState(healthy=False, error=err)
                log.warning("cluster %s: %s", name, err)
        await self._publish_spillover(out)
        self.decisions.extend(out.decisions)
        self.last = out
        metrics.observe(policy, out, self.last_clusters)
        for d in out.decisions:
            if d.direction != "hold":
                log.info("%s/%s/%s %d -> %d: %s", d.model, d.region, d.pool, d.current, d.desired, d.reason)
        return out

    async def _publish_spillover(self, out: TickOutput) -> None:
        pipe = self.redis.pipeline(transaction=True)
        models = {m.name for m in self.policy.models} | self._published
        for model in sorted(models):
            pipe.delete(spillover_key(model))
            shares = out.placement.shares.get(model, {})
            if shares:
                pipe.hset(spillover_key(model), mapping={o: json.dumps(h, sort_keys=True) for o, h in shares.items()})
        await pipe.execute()
        self._published = set(out.placement.shares)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - a bad tick (e.g. Redis down) must not end the service
                log.exception("control-plane tick failed; retrying next tick")
            wait = max(0.0, self.policy.tick_s - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    # --- views for the admin API ---------------------------------------------------------------------
    def status(self) -> dict:
        pools = []
        reasons = {(d.model, d.region, d.pool): d.reason for d in self.last.decisions} if self.last else {}
        for m, r, p in self.policy.pool_keys():
            ready = sum(self.last_clusters.get(c.name, ClusterState()).ready.get((m, p), 0)
                        for c in self.policy.clusters if c.region == r)
            pools.append({"model": m, "region": r, "pool": p, "ready": ready,
                          "desired": self.last.desired.get((m, r, p), 0) if self.last else 0,
                          "last_reason": reasons.get((m, r, p), "")})
        clusters = [{"name": c.name, "region": c.region,
                     "healthy": self.last_clusters.get(c.name, ClusterState()).healthy,
                     "error": self.last_clusters.get(c.name, ClusterState()).error or ""}
                    for c in self.policy.clusters]
        return {"pools": pools, "clusters": clusters, "policy_source": self.policy_source,
                "policy_error": self.policy_error,
                "spillover": self.last.placement.shares if self.last else {}}

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
