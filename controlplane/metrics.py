"""Prometheus metrics of the control plane (names fixed in docs/architecture.md)."""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

from prometheus_client import Counter, Gauge

DESIRED = Gauge("baton_controlplane_desired_replicas", "Replicas the planner wants per region and pool",
                ["region", "pool"])
ACTUAL = Gauge("baton_controlplane_actual_replicas", "Ready replicas in the region's own clusters",
               ["region", "pool"])
DECISIONS = Counter("baton_controlplane_decisions_total", "Planner decisions by direction",
                    ["region", "pool", "direction"])


def observe(policy, out, clusters: Mapping) -> None:
    desired: dict[tuple[str, str], int] = defaultdict(int)
    for (_m, region, pool), n in out.desired.items():
        desired[(region, pool)] += n
    actual: dict[tuple[str, str], int] = defaultdict(int)
    region_of = {c.name: c.region for c in policy.clusters}
    for name, state in clusters.items():
        for (_m, pool), n in state.ready.items():
            actual[(region_of.get(name, "?"), pool)] += n
    for (region, pool), n in desired.items():
        DESIRED.labels(region, pool).set(n)
        ACTUAL.labels(region, pool).set(actual.get((region, pool), 0))
    for d in out.decisions:
        DECISIONS.labels(d.region, d.pool, d.direction).inc()
