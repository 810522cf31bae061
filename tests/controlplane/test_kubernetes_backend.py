"""KubernetesBackend against a loopback HTTP fake of the apps/v1 Deployment and Deployment scale endpoints, and
of the core/v1 node and pod lists it reads free GPUs from.

No kube-apiserver can run on this machine, so the fake is the edge: the real `kubernetes` client loads a real
kubeconfig (two contexts) and makes its real HTTP calls; the fake answers them like the API server would.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import redis.asyncio as aioredis
import yaml

from baton.contracts.signals import SignalPublisher
from baton.controlplane.backends.base import BackendError
from baton.controlplane.backends.kubernetes import KubernetesBackend
from baton.controlplane.policy import parse_policy
from baton.controlplane.service import ControlPlane

PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)(?:/(scale))?$")


def _node(name: str, labels: dict, gpus: int, ready: bool = True, unschedulable: bool = False) -> dict:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"unschedulable": unschedulable},
            "status": {"allocatable": {"cpu": "64", "nvidia.com/gpu": str(gpus)},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def _pod(name: str, namespace: str, node: str, gpus: int, labels: dict | None = None, phase: str = "Running") -> dict:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x", "resources": resources}]},
            "status": {"phase": phase}}


class FakeApiServer:
    """Deployments as {(namespace, name): {"replicas", "ready", ...}}, nodes and pods as the API's JSON;
    `fail_next` answers 503 that many times."""

    def __init__(self, token: str) -> None:
        self.deployments: dict[tuple[str, str], dict] = {}
        self.nodes: list[dict] = []
        self.pods: list[dict] = []
        self.requests: list[tuple[str, str, str]] = []  # method, path, content-type
        self.fail_next = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((self.command, self.path.split("?")[0], self.headers.get("Content-Type", "")))
                if self.headers.get("Authorization") != f"Bearer {token}":
                    return self._send(401, {"kind": "Status", "code": 401, "reason": "Unauthorized"})
                if fake.fail_next:
                    fake.fail_next -= 1
                    return self._send(503, {"kind": "Status", "code": 503, "reason": "ServiceUnavailable"})
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/api/v1/nodes":
                    wanted = dict(kv.split("=") for kv in query.get("labelSelector", "").split(",") if kv)
                    items = [n for n in fake.nodes if all(n["metadata"]["labels"].get(k) == v
                                                          for k, v in wanted.items())]
                    return self._send(200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": items})
                if url.path == "/api/v1/pods":
                    excluded = [kv.split("!=")[1] for kv in query.get("fieldSelector", "").split(",") if "!=" in kv]
                    items = [p for p in fake.pods if p["status"]["phase"] not in excluded]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                m = PATH.match(self.path.split("?")[0])
                dep = fake.deployments.get((m.group(1), m.group(2))) if m else None
                if dep is None:
                    return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                ns, name, sub = m.groups()
                if self.command == "PATCH" and sub == "scale":
                    dep["replicas"] = int(body["spec"]["replicas"])
                meta = {"name": name, "namespace": ns}
                if sub == "scale":
                    return self._send(200, {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": meta,
                                            "spec": {"replicas": dep["replicas"]},
                                            "status": {"replicas": dep["replicas"]}})
                labels = {"app": name}
                gpus = dep.get("gpus", 0)
                container = {"name": "worker", "image": "baton",
                             "resources": {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}}
                pod_spec = {"containers": [container], "nodeSelector": dep.get("node_selector")}
                return self._send(200, {
                    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                    "spec": {"replicas": dep["replicas"], "selector": {"matchLabels": labels},
                             "template": {"metadata": {"labels": labels}, "spec": pod_spec}},
                    "status": {"replicas": dep["replicas"], "readyReplicas": dep["ready"]}})

            do_GET = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def clusters(tmp_path):
    servers = {"east": FakeApiServer("t-east"), "west": FakeApiServer("t-west")}
    kubeconfig = {
        "apiVersion": "v1", "kind": "Config", "current-context": "east",
        "clusters": [{"name": n, "cluster": {"server": s.url}} for n, s in servers.items()],
        "users": [{"name": n, "user": {"token": f"t-{n}"}} for n in servers],
        "contexts": [{"name": n, "context": {"cluster": n, "user": n}} for n in servers],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    for s in servers.values():
        for pool in ("prefill", "decode"):
            s.deployments[("baton", f"baton-m-{pool}")] = {"replicas": 1, "ready": 1}
    yield servers, str(path)
    for s in servers.values():
        s.stop()


def test_read_patch_idempotent_and_retry(clusters):
    servers, kubeconfig = clusters
    east = servers["east"]
    backend = KubernetesBackend(cluster="east", kube_context="east", kubeconfig=kubeconfig, backoff_s=0.01)
    east.deployments[("baton", "baton-m-decode")] = {"replicas": 3, "ready": 2}
    count = backend.get_replicas("m", "decode")
    assert (count.desired, count.ready) == (3, 2)

    backend.set_replicas("m", "decode", 5)
    assert east.deployments[("baton", "baton-m-decode")]["replicas"] == 5
    patches = [r for r in east.requests if r[0] == "PATCH"]
    assert patches == [("PATCH", "/apis/apps/v1/namespaces/baton/deployments/baton-m-decode/scale",
                        patches[0][2])]
    assert "patch" in patches[0][2]  # a patch content type (merge / strategic-merge), as kubectl scale sends

    backend.set_replicas("m", "decode", 5)  # already 5: reads, does not patch again
    assert len([r for r in east.requests if r[0] == "PATCH"]) == 1

    east.fail_next = 2  # transient 503s are retried
    backend.set_replicas("m", "decode", 2)
    assert east.deployments[("baton", "baton-m-decode")]["replicas"] == 2
    assert servers["west"].requests == []  # the context chose the cluster

    with pytest.raises(BackendError, match="deployment baton-m-nope.*not found in namespace 'baton'"):
        backend.get_replicas("m", "nope")
    east.fail_next = 10
    with pytest.raises(BackendError, match="failed after 3 attempts"):
        backend.set_replicas("m", "decode", 4)
    backend.close()


POLICY = """\
tick_s: 1
signals: {{window_s: 10, stale_after_s: 10}}
clusters:
  - {{name: east, region: east, backend: kubernetes, gpus: 16, kube_context: east, kubeconfig: {kc}}}
  - {{name: west, region: west, backend: kubernetes, gpus: 16, kube_context: west, kubeconfig: {kc}}}
models:
  - name: m
    regions:
      east: &r
        prefill: {{capacity_tokens_per_s: 1000, target_utilization: 1.0, ttft_p90_ms: 1000, startup_s: 0}}
        decode: {{capacity_tokens_per_s: 1000, target_utilization: 1.0, itl_p90_ms: 100, startup_s: 0}}
      west: *r
"""


def test_one_cluster_down_does_not_stop_the_other(clusters, redis_url):
    servers, kubeconfig = clusters
    servers["west"].stop()

    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        cp = ControlPlane(parse_policy(POLICY.format(kc=kubeconfig)), client, clock=lambda: 1000.0,
                          backend_options={"kubernetes": {"attempts": 1, "timeout_s": 1.0}})
        pub = SignalPublisher(client, "east", "prefill", "m", "router-1", _last=990.0)
        for _ in range(30):
            pub.record_request(prompt_tokens=1000)
        await pub.flush(now=1000.0)
        await cp.tick()
        status = cp.status()
        cp.close()
        await client.aclose()
        return status

    status = asyncio.run(scenario())
    # 30k prompt tokens over 10 s at 1000 tokens/s per replica -> 3 replicas, and a fourth for the forecast band
    # of a window of only 30 requests (sampling noise of 26%, smoothed to 9%, times 2).
    assert servers["east"].deployments[("baton", "baton-m-prefill")]["replicas"] == 4
    health = {c["name"]: c for c in status["clusters"]}
    assert health["east"]["healthy"] and not health["west"]["healthy"]
    assert "west" in health["west"]["error"]


def test_free_gpus_are_allocatable_minus_other_pods_on_the_pools_nodes(clusters):
    servers, kubeconfig = clusters
    east = servers["east"]
    for pool in ("prefill", "decode"):
        east.deployments[("baton", f"baton-m-{pool}")].update(gpus=1, node_selector={"gpu": "h200"})
    east.nodes = [_node("g1", {"gpu": "h200"}, 8), _node("g2", {"gpu": "h200"}, 8),
                  _node("g3", {"gpu": "h200"}, 8, ready=False), _node("g4", {"gpu": "h200"}, 8, unschedulable=True),
                  _node("a1", {"gpu": "a100"}, 8)]
    east.pods = [
        _pod("baton-m-prefill-x", "baton", "g1", 1, {"app": "baton-m-prefill"}),  # ours: counts as ours to use
        _pod("baton-m-decode-x", "baton", "g2", 1, {"app": "baton-m-decode"}),
        _pod("train-0", "ml", "g1", 4), _pod("train-1", "ml", "g2", 2),  # another team's
        _pod("done", "ml", "g2", 2, phase="Succeeded"),  # finished: holds nothing
        _pod("elsewhere", "ml", "a1", 8), _pod("notebook", "ml", "g2", 0),
    ]
    backend = KubernetesBackend(cluster="east", kube_context="east", kubeconfig=kubeconfig, backoff_s=0.01)
    # g1 + g2 (the ready, schedulable nodes the pools select) = 16, minus the 6 other pods hold there.
    assert backend.free_gpus([("m", "prefill"), ("m", "decode")]) == 10
    listed = [r[1] for r in east.requests if r[1].startswith("/api/v1/")]
    assert listed == ["/api/v1/nodes", "/api/v1/pods"]  # one node list per distinct selector, one pod list

    for pool in ("prefill", "decode"):
        east.deployments[("baton", f"baton-m-{pool}")]["gpus"] = 0
    assert backend.free_gpus([("m", "prefill"), ("m", "decode")]) is None  # CPU pools: the policy decides
    backend.close()


def test_a_full_cluster_spills_and_takes_replicas_back_when_it_frees(clusters, redis_url):
    servers, kubeconfig = clusters
    east = servers["east"]
    for pool in ("prefill", "decode"):
        east.deployments[("baton", f"baton-m-{pool}")].update(gpus=1, node_selector={"gpu": "h200"})
    east.nodes = [_node("g1", {"gpu": "h200"}, 8)]
    east.pods = [_pod("train-0", "ml", "g1", 5)]  # the policy allows 16, the cluster has 3 left for us
    policy = POLICY.format(kc=kubeconfig) + "spillover:\n  - {from: east, to: [west]}\n"

    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        now = [1000.0]
        cp = ControlPlane(parse_policy(policy), client, clock=lambda: now[0],
                          backend_options={"kubernetes": {"attempts": 1, "timeout_s": 1.0}})
        seen = {}
        try:
            pub = SignalPublisher(client, "east", "prefill", "m", "router-1", _last=990.0)
            for _ in range(450):
                pub.record_request(prompt_tokens=100)
            await pub.flush(now=1000.0)
            out = await cp.tick()
            seen["state"] = cp.last_clusters["east"].free_gpus
            seen["targets"] = dict(out.placement.targets)
            seen["spill"] = dict(out.placement.spill)
            east.pods = []  # the other team's job finished
            for dep in east.deployments.values():
                dep["ready"] = dep["replicas"]
            now[0] += 1
            out = await cp.tick()
            seen["targets_after"] = dict(out.placement.targets)
            seen["spill_while_starting"] = dict(out.placement.spill)
            for dep in east.deployments.values():
                dep["ready"] = dep["replicas"]
            now[0] += 1
            out = await cp.tick()
            seen["spill_after"] = dict(out.placement.spill)
        finally:
            cp.close()
            await client.aclose()
        return seen

    seen = asyncio.run(scenario())
    # 45k prompt tokens over 10 s -> 5 prefill replicas; east's free GPUs take 3 (1 decode + 2 prefill), west
    # takes the other 3 besides its own one...
    assert seen["state"] == 3
    assert seen["targets"][("east", "m", "prefill")] == 2 and seen["targets"][("west", "m", "prefill")] == 1 + 3
    assert seen["spill"] == {("m", "prefill", "east", "west"): 3}
    # ...and once they are free again, east holds all 5; west keeps serving the spilled share until east's
    # new replicas are ready, then the spill drains back.
    assert seen["targets_after"][("east", "m", "prefill")] == 5
    assert seen["spill_while_starting"] == {("m", "prefill", "east", "west"): 3}
    assert seen["spill_after"] == {}
