"""Reads the rendered chart and checks its wiring: Services reach the right container ports, probes hit
/health and /ready on the HTTP port, the policy ConfigMap is mounted where --policy points, the control
plane's Role is exactly what its Kubernetes backend calls, and commands/flags are documented CLI ones."""
from __future__ import annotations

import ast
import pathlib
import posixpath
import re

import chart_check
import pytest
import yaml
from chart_release import Release, env_value, flag

ROOT = chart_check.ROOT
# The Role contract in docs/architecture.md: (apiGroup, resource, verb).
CONTRACT_RULES = {("", "pods", v) for v in ("get", "list", "watch")} | {
    ("apps", "deployments", v) for v in ("get", "list", "watch")} | {
    ("apps", "deployments/scale", v) for v in ("get", "patch")}
BATON_COMPONENTS = ("router", "prefill", "decode", "controlplane")


def releases(default_release, us_east, eu_west):
    return {"default": default_release, "us-east": us_east, "eu-west": eu_west}


@pytest.fixture
def all_releases(default_release, us_east, eu_west):
    return releases(default_release, us_east, eu_west)


def test_services_select_one_workload_and_target_its_container_ports(all_releases):
    for label, release in all_releases.items():
        services = release.all("Service")
        assert len(services) >= 3, label
        for svc in services:
            selector = svc["spec"]["selector"]
            pods = [w for w in release.docs if w["kind"] in ("Deployment", "StatefulSet")
                    and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
            assert len(pods) == 1, f"{label}: service {svc['metadata']['name']} selects {len(pods)} workloads"
            ports = {p["name"]: p["containerPort"] for c in pods[0]["spec"]["template"]["spec"]["containers"]
                     for p in c["ports"]}
            for port in svc["spec"]["ports"]:
                assert port["targetPort"] in ports, f"{label}: {svc['metadata']['name']} targets {port['targetPort']}"
                assert port["port"] == ports[port["targetPort"]], f"{label}: {svc['metadata']['name']}:{port['name']}"


def test_component_ports_match_flags_and_documented_defaults(default_release):
    documented = {"router": (8000, 50051), "prefill": (8081, 50061), "decode": (8082, 50062),
                  "controlplane": (8090, 50070)}
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for component, (http, grpc) in documented.items():
        assert f"HTTP {http}" in doc and f"{grpc}" in doc
        container = default_release.container(component)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": http, "grpc": grpc}
        assert flag(container["args"], "--http-port") == str(http)
        assert flag(container["args"], "--grpc-port") == str(grpc)


def test_probes_hit_health_and_ready_on_the_http_port(all_releases):
    for label, release in all_releases.items():
        for component in BATON_COMPONENTS:
            if not release.has(component):
                continue
            container = release.container(component)
            http_port = int(flag(container["args"], "--http-port"))
            named = {p["name"]: p["containerPort"] for p in container["ports"]}
            ready = "/health" if component == "controlplane" else "/ready"  # the control plane documents /health only
            for probe, path in (("livenessProbe", "/health"), ("readinessProbe", ready)):
                get = container[probe]["httpGet"]
                assert get["path"] == path, f"{label} {component} {probe}"
                assert named.get(get["port"], get["port"]) == http_port, f"{label} {component} {probe}"
            if "startupProbe" in container:
                assert container["startupProbe"]["httpGet"]["path"] == "/health"


def test_policy_configmap_and_admin_token_reach_the_control_plane(default_release, us_east):
    for release in (default_release, us_east):
        pod = release.workload("controlplane")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        policy_path = flag(container["args"], "--policy")
        assert policy_path == "/etc/baton/policy/policy.yaml"
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == posixpath.dirname(policy_path))
        # A subPath mount would never see ConfigMap updates, and hot reload would silently stop working.
        assert "subPath" not in mount
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        configmap = release.get("ConfigMap", volume["configMap"]["name"])
        policy = yaml.safe_load(configmap["data"][posixpath.basename(policy_path)])
        assert policy["models"] and policy["clusters"]

        # The admin API refuses to start without a token: it comes from the chart's (never empty) Secret.
        token = env_value(container, "BATON_CONTROLPLANE_TOKEN")["valueFrom"]["secretKeyRef"]
        assert release.get("Secret", token["name"])["data"][token["key"]]


def test_policy_names_the_deployments_the_chart_creates(default_release, us_east):
    from baton.controlplane.policy import parse_policy

    for release, region in ((default_release, "local"), (us_east, "us-east")):
        text = release.get("ConfigMap", "baton-controlplane-policy")["data"]["policy.yaml"]
        policy = parse_policy(text, "rendered policy")
        (local,) = [c for c in policy.clusters if c.region == region]
        assert local.namespace == "baton"  # the release namespace
        for pool in ("prefill", "decode"):
            name = local.deployment_name.format(model=policy.models[0].name, pool=pool)
            deployment = release.get("Deployment", name)
            assert deployment["metadata"]["labels"]["baton.io/pool"] == pool


def rules(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_control_plane_role_is_the_documented_contract_and_bound_to_its_pod(default_release, eu_west):
    assert "get/list/watch on pods and\ndeployments and get/patch on deployments/scale" in (
        ROOT / "docs" / "architecture.md").read_text()
    assert rules(default_release.get("Role", "baton-controlplane")) == CONTRACT_RULES
    binding = default_release.get("RoleBinding", "baton-controlplane")
    assert binding["roleRef"]["name"] == "baton-controlplane"
    pod = default_release.workload("controlplane")["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "baton"}]
    # The remote region grants the global control plane the very same rules, through a token Secret.
    assert rules(eu_west.get("Role", "baton-remote-controlplane")) == CONTRACT_RULES
    token = eu_west.get("Secret", "baton-remote-controlplane-token")
    assert token["type"] == "kubernetes.io/service-account-token"
    assert token["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "baton-remote-controlplane"


# Official client methods -> (apiGroup, resource, verb), for the calls a capacity backend can make.
CLIENT_CALLS = {
    "read_namespaced_pod": ("", "pods", "get"), "list_namespaced_pod": ("", "pods", "list"),
    "read_namespaced_deployment": ("apps", "deployments", "get"),
    "list_namespaced_deployment": ("apps", "deployments", "list"),
    "patch_namespaced_deployment": ("apps", "deployments", "patch"),
    "replace_namespaced_deployment": ("apps", "deployments", "update"),
    "read_namespaced_deployment_status": ("apps", "deployments/status", "get"),
    "read_namespaced_deployment_scale": ("apps", "deployments/scale", "get"),
    "patch_namespaced_deployment_scale": ("apps", "deployments/scale", "patch"),
    "replace_namespaced_deployment_scale": ("apps", "deployments/scale", "update"),
    "list_node": ("", "nodes", "list"), "list_pod_for_all_namespaces": ("", "pods", "list"),
}


def backend_permissions() -> tuple[list[pathlib.Path], set[tuple[str, str, str]]]:
    """Files under controlplane/ that import the kubernetes client, and the permissions their calls need."""
    files, needed = [], set()
    for path in sorted((ROOT / "controlplane").rglob("*.py")):
        tree = ast.parse(path.read_text())
        imports = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if not any(m == "kubernetes" or m.startswith("kubernetes.") for m in imports):
            continue
        files.append(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in CLIENT_CALLS:
                needed.add(CLIENT_CALLS[node.attr])
            # watch.Watch().stream(api.list_namespaced_x, ...) needs `watch` on what it lists.
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stream"
                    and node.args and isinstance(node.args[0], ast.Attribute) and node.args[0].attr in CLIENT_CALLS):
                group, resource, _ = CLIENT_CALLS[node.args[0].attr]
                needed.add((group, resource, "watch"))
    return files, needed


def test_role_allows_every_call_of_the_kubernetes_backend(default_release):
    files, needed = backend_permissions()
    if not files:
        pytest.skip("no module under controlplane/ imports the kubernetes client yet")
    granted = rules(default_release.get("Role", "baton-controlplane")) | \
        rules(default_release.get("ClusterRole", "baton-controlplane-baton-capacity"))
    missing = needed - granted
    assert not missing, f"{[str(f.relative_to(ROOT)) for f in files]} call the API with {sorted(missing)}, " \
                        "which the chart's Role does not grant (403 in a cluster)"


def documented_commands() -> dict[str, set[str]]:
    """`baton` sub-command -> flags docs/architecture.md documents for it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Processes, ports and commands", 1)[1].split("\n## ", 1)[0]
    commands = {}
    for cmd in re.findall(r"^\|[^|]+\|\s*`baton ([^`]+)`", section, flags=re.M):
        name, *rest = cmd.split()
        commands[name] = set(re.findall(r"--[a-z][a-z-]*", " ".join(rest)))
    prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
    shared = set(re.findall(r"`(--[a-z][a-z-]*)", prose))
    return {name: flags | shared for name, flags in commands.items()}


def test_containers_run_documented_baton_commands_with_documented_flags(all_releases):
    commands = documented_commands()
    assert {"router", "prefill-worker", "decode-worker", "controlplane"} <= commands.keys()
    for label, release in all_releases.items():
        for component in BATON_COMPONENTS:
            if not release.has(component):
                continue
            container = release.container(component)
            assert container["command"] == ["baton"]
            sub, *args = container["args"]
            assert sub in commands, f"{label} {component}: `baton {sub}` is not in docs/architecture.md"
            used = {a for a in args if a.startswith("--")}
            assert used <= commands[sub], f"{label} {component}: undocumented flags {used - commands[sub]}"
            assert flag(args, "--host") == "0.0.0.0", f"{label} {component} would not be reachable from other pods"
            # Every $(VAR) the kubelet expands must be defined, or the literal text reaches the CLI.
            for var in re.findall(r"\$\((\w+)\)", " ".join(args)):
                env_value(container, var)


def test_flags_exist_in_the_registered_cli(default_release):
    """Against the real `baton` CLI for every sub-command that is registered in this build."""
    import typer.main

    from baton.cli import app

    group = typer.main.get_command(app)
    checked = 0
    for component in BATON_COMPONENTS:
        sub, *args = default_release.container(component)["args"]
        command = group.commands.get(sub)
        if command is None:
            continue
        options = {opt for p in command.params for opt in p.opts}
        used = {a for a in args if a.startswith("--")}
        assert used <= options, f"`baton {sub}` has no option {sorted(used - options)}"
        checked += 1
    if checked == 0:
        pytest.skip("none of router/prefill-worker/decode-worker/controlplane is registered in engine.cli yet")


def test_gpu_pools_request_gpus_shm_model_and_drain(default_release):
    for pool in ("prefill", "decode"):
        pod = default_release.workload(pool)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        resources = container["resources"]
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        model_dir = flag(container["args"], "--model")
        model_mount = next(p for p in mounts if model_dir.startswith(p.rstrip("/") + "/"))
        assert "persistentVolumeClaim" in volumes[mounts[model_mount]]
        sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert 0 < sleep < pod["terminationGracePeriodSeconds"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])

    cpu = Release.render({"decode": {"gpus": 0}}).container("decode")
    assert "nvidia.com/gpu" not in cpu["resources"]["requests"]


def test_scheduling_values_reach_the_pod_spec():
    values = {"decode": {"nodeSelector": {"pool": "h100"}, "affinity": {"nodeAffinity": {}},
                         "tolerations": [{"key": "x", "operator": "Exists"}]}}
    pod = Release.render(values).workload("decode")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["tolerations"] == [{"key": "x", "operator": "Exists"}]


def test_multi_region_shares_one_control_plane_and_one_redis(us_east, eu_west):
    assert us_east.has("controlplane") and us_east.has("redis")
    assert not eu_west.has("controlplane") and not eu_west.has("redis")
    assert us_east.get("Service", "baton-redis")["spec"]["type"] == "LoadBalancer"
    east_values = chart_check.load_values(chart_check.EXAMPLES / "multi-region" / "eu-west.yaml")
    for component in ("router", "prefill", "decode"):
        assert env_value(eu_west.container(component), "REDIS_URL")["value"] == east_values["redis"]["externalUrl"]
        assert flag(eu_west.container(component)["args"], "--region") == "eu-west"
        assert flag(us_east.container(component)["args"], "--region") == "us-east"

    # The global control plane reaches eu-west through the mounted kubeconfig, and names its Deployments.
    container = us_east.container("controlplane")
    kubeconfig = env_value(container, "KUBECONFIG")["value"]
    assert posixpath.dirname(kubeconfig) in {m["mountPath"] for m in container["volumeMounts"]}
    from baton.controlplane.policy import parse_policy

    policy = parse_policy(us_east.get("ConfigMap", "baton-controlplane-policy")["data"]["policy.yaml"])
    (remote,) = [c for c in policy.clusters if c.region == "eu-west"]
    assert remote.kubeconfig == kubeconfig and remote.kube_context
    for pool in ("prefill", "decode"):
        eu_west.get("Deployment", remote.deployment_name.format(model=policy.models[0].name, pool=pool))
