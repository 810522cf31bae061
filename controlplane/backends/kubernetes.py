"""Kubernetes backend: each pool is a Deployment; replicas are read and patched through apps/v1 `scale`; free
GPUs are the nodes' allocatable minus other pods' requests on the nodes the pools' nodeSelectors pick."""
from __future__ import annotations

import os
import time

from baton.controlplane.backends.base import BackendError, ReplicaCount
from baton.controlplane.policy import ClusterSpec

_RETRYABLE = {429, 500, 502, 503, 504}
GPU_RESOURCE = "nvidia.com/gpu"


def _gpus(resources) -> int:
    """GPUs one container asks for; an extended resource's request defaults to its limit."""
    if resources is None:
        return 0
    value = (resources.requests or {}).get(GPU_RESOURCE) or (resources.limits or {}).get(GPU_RESOURCE) or 0
    return int(value)


def _pod_gpus(spec) -> int:
    """A pod's effective GPU request: its containers together, or its largest init container if more."""
    running = sum(_gpus(c.resources) for c in spec.containers or [])
    return max([running] + [_gpus(c.resources) for c in spec.init_containers or []])


def _node_usable(node) -> bool:
    if node.spec is not None and node.spec.unschedulable:
        return False
    conditions = (node.status.conditions or []) if node.status is not None else []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


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
        self._core = client.CoreV1Api(self._api_client)

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

    def free_gpus(self, pools: list[tuple[str, str]]) -> int | None:
        """GPUs on the schedulable, ready nodes that the pools' nodeSelectors pick, minus what pods other than
        the pools' own request there. None when the pools' pods ask for no GPUs. Needs get/list on nodes and
        pods cluster-wide (a ClusterRole)."""
        selectors: dict[str, dict[str, str]] = {}
        ours: list[dict[str, str]] = []
        asks_gpus = False
        for model, pool in pools:
            name = self._name(model, pool)
            dep = self._call(f"read deployment {name}", self._api.read_namespaced_deployment, name, self.namespace)
            template = dep.spec.template.spec
            node_selector = (template.node_selector or {}) if template is not None else {}
            selectors[",".join(f"{k}={v}" for k, v in sorted(node_selector.items()))] = node_selector
            ours.append(dict(dep.spec.selector.match_labels or {}))
            asks_gpus |= template is not None and _pod_gpus(template) > 0
        if not asks_gpus:
            return None
        allocatable: dict[str, int] = {}
        for label_selector in selectors:
            nodes = self._call(f"list nodes ({label_selector or 'all'})", self._core.list_node,
                               label_selector=label_selector)
            for node in nodes.items:
                if _node_usable(node):
                    allocatable[node.metadata.name] = int((node.status.allocatable or {}).get(GPU_RESOURCE, 0))
        pods = self._call("list pods", self._core.list_pod_for_all_namespaces,
                          field_selector="status.phase!=Succeeded,status.phase!=Failed")
        taken = 0
        for pod in pods.items:
            if pod.spec is None or pod.spec.node_name not in allocatable:
                continue
            labels = pod.metadata.labels or {}
            mine = pod.metadata.namespace == self.namespace and any(
                sel and all(labels.get(k) == v for k, v in sel.items()) for sel in ours)
            if not mine:
                taken += _pod_gpus(pod.spec)
        return max(0, sum(allocatable.values()) - taken)

    def close(self) -> None:
        self._api_client.close()
