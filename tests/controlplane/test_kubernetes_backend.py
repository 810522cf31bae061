"""KubernetesBackend against a loopback HTTP fake of the apps/v1 Deployment and Deployment scale endpoints.

No kube-apiserver can run on this machine, so the fake is the edge: the real `kubernetes` client loads a real
kubeconfig (two contexts) and makes its real HTTP calls; the fake answers them like the API server would.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis.asyncio as aioredis
import yaml

from baton.contracts.signals import SignalPublisher
from baton.controlplane.backends.base import BackendError
from baton.controlplane.backends.kubernetes import KubernetesBackend
from baton.controlplane.policy import parse_policy
from baton.controlplane.service import ControlPlane

PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)(?:/(scale))?$")


class FakeApiServer:
    """Deployments as {(namespace, name): {"replicas", "ready"}}; `fail_next` answers 503 that many times."""

    def __init__(self, token: str) -> None:
        self.deployments: dict[tuple[str, str], dict[str, int]] = {}
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
                return self._send(200, {
                    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                    "spec": {"replicas": dep["replicas"], "selector": {"matchLabels": labels},
                             "template": {"metadata": {"labels": labels}}},
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
    # 30k prompt tokens over 10 s at 1000 tokens/s per replica -> 3 replicas, step-limited from 1 to 3 is fine.
    assert servers["east"].deployments[("baton", "baton-m-prefill")]["replicas"] == 3
    health = {c["name"]: c for c in status["clusters"]}
    assert health["east"]["healthy"] and not health["west"]["healthy"]
    assert "west" in health["west"]["error"]
