"""The `CapacityBackend` seam: read and set the replica count of one pool of one model in one cluster, and
read how many GPUs the cluster has for them."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from baton.controlplane.policy import ClusterSpec


@dataclass(frozen=True)
class ReplicaCount:
    desired: int  # what the cluster has been asked for
    ready: int  # what is serving now


class BackendError(Exception):
    """A cluster could not be read or changed; the message names the cluster and what failed."""


@runtime_checkable
class CapacityBackend(Protocol):
    """Implementations are idempotent: `set_replicas(n)` twice is the same as once, so callers may retry."""

    def get_replicas(self, model: str, pool: str) -> ReplicaCount: ...

    def set_replicas(self, model: str, pool: str, replicas: int) -> None: ...

    def free_gpus(self, pools: list[tuple[str, str]]) -> int | None:
        """GPUs these (model, pool)s could hold in the cluster now, their own replicas included; None when the
        cluster does not say (the policy's `gpus` then bounds it)."""
        ...

    def close(self) -> None: ...


_BACKENDS = {
    "kubernetes": "baton.controlplane.backends.kubernetes:KubernetesBackend",
    "ray": "baton.controlplane.backends.ray:RayBackend",
    "local": "baton.controlplane.backends.local:LocalBackend",
}


def backend_for(cluster: ClusterSpec, **options) -> CapacityBackend:
    """Builds the backend a cluster names, importing its client library only when used."""
    module, _, name = _BACKENDS[cluster.backend].partition(":")
    return getattr(importlib.import_module(module), name).from_cluster(cluster, **options)
