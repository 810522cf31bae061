"""A rendered release of the chart as parsed documents, with look-ups the wiring tests share."""
from __future__ import annotations

import dataclasses

import chart_check


@dataclasses.dataclass
class Release:
    docs: list[dict]
    name: str

    @classmethod
    def render(cls, values: dict, name: str = "baton", namespace: str = "baton") -> Release:
        rendered = chart_check.render(values, name=name, namespace=namespace)
        return cls([doc for _, doc in chart_check.manifests(rendered)], name)

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {[d['metadata']['name'] for d in self.all(kind)]}"
        return found[0]

    def workload(self, component: str) -> dict:
        """The Deployment or StatefulSet of one component (router, prefill, decode, controlplane, redis)."""
        found = [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet")
                 and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component]
        assert len(found) == 1, f"expected one workload for {component}, found {len(found)}"
        return found[0]

    def container(self, component: str) -> dict:
        containers = self.workload(component)["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1
        return containers[0]

    def has(self, component: str) -> bool:
        return any(d["kind"] in ("Deployment", "StatefulSet")
                   and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component
                   for d in self.docs)


def flag(args: list[str], name: str) -> str:
    """The value following `name` in an argv list."""
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def env_value(container: dict, name: str) -> dict:
    found = [e for e in container.get("env", []) if e["name"] == name]
    assert len(found) == 1, f"env {name} defined {len(found)} times in {container['name']}"
    return found[0]
