"""Kubernetes backend: each pool is a Deployment; replicas are read and patched through apps/v1 `scale`."""
from __future__ import annotations

import os
import time

from baton.controlplane.backends.base import BackendError, ReplicaCount
from baton.controlplane.policy import ClusterSpec

_RETRYABLE = {429, 500, 502, 503, 504}


class KubernetesBackend:
    """One cluster context. Setting the count it already has is a no-op, so every call is safe to retry."""

    def __init__(self, *, cluster: str, namespace: str = "baton", deployment_name: str = "baton-{model}-{pool}",
                 kube_context: str | None = None, kubeconfig: str | None = None, attempts: int = 3,
                 backoff_s: float = 0.2, timeout_s: float = 5.0) -> None:
        from kubernetes import client, config

        self.cluster = cluster
        self.namespace = namespace
        self.deployment_name = deployment_name
        self.context = kube_context
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        try:
            if kubeconfig is None and kube_context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                # Inside a pod with no kubeconfig: the control plane manages its own cluster.
                in_cluster = client.Configuration()
                config.load_incluster_config(client_configuration=in_cluster)
                self._api_client = client.ApiClient(in_cluster)
            else:
                self._api_client = config.new_client_from_config(config_file=kubeconfig, context=kube_context,
                                                                 persist_config=False)
        except (config.ConfigException, OSError) as exc:
            raise BackendError(f"cluster {cluster}: cannot load kubeconfig (context {kube_context!r}): {exc}") from None
        self._api = client.AppsV1Api(self._api_client)

    @classmethod
    def from_cluster(cls, cluster: ClusterSpec, **options) -> KubernetesBackend:
        return cls(cluster=cluster.name, namespace=cluster.namespace, deployment_name=cluster.deployment_name,
                   kube_context=cluster.kube_context, kubeconfig=cluster.kubeconfig, **options)

    def _name(self, model: str, pool: str) -> str:
        return self.deployment_name.format(model=model, pool=pool)

    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        last = ""
        for attempt in range(self.attempts):
            try:
                return fn(*args, _request_timeout=self.timeout_s, **kwargs)
            except ApiException as exc:
                if exc.status == 404:
                    raise BackendError(f"cluster {self.cluster}: {what}: not found in namespace "
                                       f"{self.namespace!r}") from None
                if exc.status not in _RETRYABLE:
                    raise BackendError(f"cluster {self.cluster}: {what}: HTTP {exc.status} {exc.reason}") from None
                last = f"HTTP {exc.status} {exc.reason}"
            except HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self.attempts:
                time.sleep(self.backoff_s * 2**attempt)
        raise BackendError(f"cluster {self.cluster}: {what}: failed after {self.attempts} attempts ({last})")

    def get_replicas(self, model: str, pool: str) -> ReplicaCount:
        name = self._name(model, pool)
        scale = self._call(f"read scale of deployment {name}", self._api.read_namespaced_deployment_scale,
                           name, self.namespace)
        dep = self._call(f"read deployment {name}", self._api.read_namespaced_deployment,
                         name, self.namespace)
        return ReplicaCount(desired=scale.spec.replicas or 0, ready=dep.status.ready_replicas or 0)

    def set_replicas(self, model: str, pool: str, replicas: int) -> None:
        name = self._name(model, pool)
        scale = self._call(f"read scale of deployment {name}", self._api.read_namespaced_deployment_scale,
                           name, self.namespace)
        if (scale.spec.replicas or 0) == replicas:
            return
        self._call(f"patch scale of deployment {name}", self._api.patch_namespaced_deployment_scale,
                   name, self.namespace, {"spec": {"replicas": replicas}})

    def close(self) -> None:
        self._api_client.close()
