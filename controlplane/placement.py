"""Multi-cluster placement: regional demand onto clusters by the GPUs each reports free (capped by the policy's
`gpus`), overflow spilled to the nearest region.

Pure: the spill of the previous tick comes in, the new one goes out. Spilled replicas are kept while the
origin's own replacements are not ready yet, so traffic drains back only onto ready capacity.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from baton.contracts.worker_registry import EMBED_POOL
from baton.controlplane.policy import Policy

PoolKey = tuple[str, str, str]  # model, region, pool
SpillKey = tuple[str, str, str, str]  # model, pool, origin region, host region


@dataclass(frozen=True)
class ClusterState:
    """What a backend reported for one cluster this tick; `healthy=False` when it could not be read."""

    healthy: bool = True
    ready: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (model, pool) -> ready replicas
    error: str | None = None
    # GPUs Baton could hold there now, its own replicas included, as the cluster reports them (Kubernetes:
    # allocatable minus other workloads' requests on the pools' nodes; Ray: available plus ours). None: not
    # reported, so the policy's `gpus` alone bounds the cluster.
    free_gpus: int | None = None


@dataclass(frozen=True)
class Placement:
    targets: dict[tuple[str, str, str], int]  # (cluster, model, pool) -> replicas
    spill: dict[SpillKey, int]
    shares: dict[str, dict[str, dict[str, float]]]  # model -> origin -> host -> share of traffic
    unplaced: dict[PoolKey, int]
    own: dict[PoolKey, dict[str, int]]  # each pool's replicas in its own region, per cluster


def _fill(n: int, gpus: int, candidates: list[str], free: dict[str, float]) -> dict[str, int]:
    """Places up to n replicas one at a time on the candidate with most free GPUs."""
    placed: dict[str, int] = defaultdict(int)
    for _ in range(n):
        fits = [c for c in candidates if free[c] >= gpus]
        if not fits:
            break
        best = max(fits, key=lambda c: (free[c], -candidates.index(c)))
        free[best] -= gpus
        placed[best] += 1
    return dict(placed)


def _keep(n: int, gpus: int, prev: Mapping[str, int], free: dict[str, float]) -> dict[str, int]:
    """Up to n replicas where they already run (a replica moved is one that starts again): the clusters with the
    most of them first, as far as each cluster's free GPUs allow."""
    kept: dict[str, int] = {}
    for c in sorted(prev, key=lambda c: -prev[c]):
        k = min(prev[c], n, int(free[c] // gpus) if gpus > 0 else n)
        if k > 0:
            kept[c] = k
            free[c] -= k * gpus
            n -= k
    return kept


def _spilled(spill: Mapping[SpillKey, int], model: str, pool: str, origin: str) -> int:
    return sum(n for (m, p, o, _h), n in spill.items() if (m, p, o) == (model, pool, origin))


def place(policy: Policy, desired: Mapping[PoolKey, int], clusters: Mapping[str, ClusterState],
          prev_spill: Mapping[SpillKey, int], prev_own: Mapping[PoolKey, Mapping[str, int]] | None = None,
          ) -> Placement:
    """`prev_own`: the last placement's `own`; without it (a fresh control plane), where replicas are ready now."""
    # A cluster we cannot read gets no new replicas: its region spills until it answers again. A full one
    # (other workloads took its GPUs) likewise, and it takes replicas back as soon as it reports them free.
    free: dict[str, float] = {}
    for c in policy.clusters:
        state = clusters.get(c.name, ClusterState())
        free[c.name] = 0 if not state.healthy else (
            c.gpus if state.free_gpus is None else min(c.gpus, max(0, state.free_gpus)))
    by_region: dict[str, list[str]] = defaultdict(list)
    for c in policy.clusters:
        by_region[c.region].append(c.name)
    targets: dict[tuple[str, str, str], int] = {
        (c.name, m, p): 0 for c in policy.clusters for m, _r, p in policy.pool_keys()}

    own: dict[PoolKey, int] = {}
    own_by_cluster: dict[PoolKey, dict[str, int]] = {}
    for key in sorted(desired):
        model, region, pool = key
        gpus = policy.pool(model, region, pool).gpus_per_replica
        prev = (prev_own or {}).get(key)
        if prev is None:
            prev = {c: clusters.get(c, ClusterState()).ready.get((model, pool), 0) for c in by_region[region]}
        placed = _keep(desired[key], gpus, {c: n for c, n in prev.items() if c in free}, free)
        for cname, n in _fill(desired[key] - sum(placed.values()), gpus, by_region[region], free).items():
            placed[cname] = placed.get(cname, 0) + n
        for cname, n in placed.items():
            targets[(cname, model, pool)] += n
        own[key] = sum(placed.values())
        own_by_cluster[key] = placed

    spill: dict[SpillKey, int] = {}
    unplaced: dict[PoolKey, int] = {}
    for key in sorted(desired):
        model, region, pool = key
        overflow = desired[key] - own[key]
        ready = sum(clusters.get(c, ClusterState()).ready.get((model, pool), 0) for c in by_region[region])
        still_starting = max(0, own[key] - ready)
        need = overflow + min(_spilled(prev_spill, model, pool, region), still_starting)
        rule = policy.spill_rule(region)
        if need and rule is not None:
            budget = int(rule.max_share * desired[key] + 1e-9)
            gpus = policy.pool(model, region, pool).gpus_per_replica
            for host in rule.to:
                placed = _fill(min(need, budget), gpus, by_region[host], free)
                n = sum(placed.values())
                for cname, k in placed.items():
                    targets[(cname, model, pool)] += k
                if n:
                    spill[(model, pool, region, host)] = n
                need -= n
                budget -= n
        # Replicas kept for drain-back are extra; only overflow nobody could take is unplaced.
        if overflow > _spilled(spill, model, pool, region):
            unplaced[key] = overflow - _spilled(spill, model, pool, region)

    shares: dict[str, dict[str, dict[str, float]]] = {}
    for (model, pool, origin, host), n in spill.items():
        if pool == EMBED_POOL:  # routers send embeddings to any embed worker: its spill moves no generation traffic
            continue
        share = n / max(1, desired[(model, origin, pool)])
        # Routers spill whole requests, so a region spills the larger of its pools' shares.
        per_origin = shares.setdefault(model, {}).setdefault(origin, {})
        per_origin[host] = round(max(per_origin.get(host, 0.0), share), 4)
    return Placement(targets=targets, spill=spill, shares=shares, unplaced=unplaced, own=own_by_cluster)
