"""The chart's embed pool: with `embed.enabled` and an embed pool in the policy, a Deployment the control plane finds
by the policy's name template, running `baton embed-worker` (args parsed by the real command) on its own ports with
/health and /ready probes, a headless Service and a PodDisruptionBudget; values that leave the pool unscalable fail
the install naming the field."""
from __future__ import annotations

import copy

import chart_check
import helm_python
import pytest
import yaml
from chart_release import Release, env_value, flag
from test_chart_engine import parsed

from baton.controlplane.policy import parse_policy

EMBED_POOL = {"min_replicas": 1, "max_replicas": 4, "capacity_inputs_per_s": 2000, "queue_time_p90_ms": 100}


def with_embed_policy(values: dict) -> dict:
    """`values` plus the default policy with an embed pool for the release's model and region."""
    policy = copy.deepcopy(chart_check.load_values(chart_check.CHART / "values.yaml")["controlPlane"]["policy"])
    policy["models"][0]["regions"]["local"]["embed"] = dict(EMBED_POOL)
    return {**values, "controlPlane": {"policy": policy}}


VALUES = with_embed_policy({"embed": {"enabled": True, "replicas": 2, "maxBatchDelayMs": 2.5,
                                      "engine": {"maxNumSeqs": 512}}})


@pytest.fixture(scope="module")
def release() -> Release:
    return Release.render(VALUES)


def test_embed_release_lints_renders_and_validates_clean():
    result = chart_check.check_case(chart_check.Case("embed", VALUES))
    assert result.findings == [], result.findings
    assert "policy: valid" in result.notes


def test_the_control_plane_finds_and_scales_the_embed_deployment(release):
    text = release.get("ConfigMap", "baton-controlplane-policy")["data"]["policy.yaml"]
    policy = parse_policy(text, "rendered policy")
    assert ("baton-model", "local", "embed") in policy.pool_keys()
    (cluster,) = policy.clusters
    deployment = release.get("Deployment", cluster.deployment_name.format(model="baton-model", pool="embed"))
    labels = deployment["metadata"]["labels"]
    assert (labels["baton.io/pool"], labels["baton.io/region"], labels["baton.io/model"]) == (
        "embed", "local", "baton-model")
    assert deployment["spec"]["replicas"] == 2  # embed.replicas, until the control plane takes over


def test_embed_worker_args_ports_and_probes(release):
    container = release.container("embed")
    settings = parsed(container)
    assert container["args"][0] == "embed-worker" and container["name"] == "embed-worker"
    assert (settings["grpc_port"], settings["http_port"], settings["host"]) == (50063, 8083, "0.0.0.0")
    assert (settings["max_batch_delay_ms"], settings["max_num_seqs"]) == (2.5, 512)
    assert (settings["device"], settings["gpu_memory_utilization"]) == ("cuda", 0.9)
    assert settings["model_name"] == "baton-model"  # registers under the name the router serves
    assert flag(container["args"], "--worker-id") == "$(POD_NAME)"
    for var in ("POD_NAME", "POD_IP", "REDIS_URL"):
        env_value(container, var)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8083, "grpc": 50063}
    for probe, path in (("startupProbe", "/health"), ("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_embed_service_and_disruption_budget_select_only_embed_pods(release):
    pod_labels = release.workload("embed")["spec"]["template"]["metadata"]["labels"]
    service = release.get("Service", "baton-embed")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8083, "grpc": 50063}
    budget = release.get("PodDisruptionBudget", "baton-embed")
    assert budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "embed"
    for other in ("prefill", "decode"):
        labels = release.workload(other)["spec"]["template"]["metadata"]["labels"]
        assert not budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_cpu_embed_pool_and_default_release_without_one(default_release):
    cpu = Release.render(with_embed_policy({"embed": {"enabled": True, "gpus": 0}})).container("embed")
    assert parsed(cpu)["device"] == "cpu" and "nvidia.com/gpu" not in cpu["resources"]["requests"]
    assert not default_release.has("embed")
    assert not [d for d in default_release.docs if d["metadata"]["name"] == "baton-embed"]
    policy = yaml.safe_load(default_release.get("ConfigMap", "baton-controlplane-policy")["data"]["policy.yaml"])
    assert "embed" not in policy["models"][0]["regions"]["local"]


@pytest.mark.parametrize("values,needle", [
    ({"embed": {"enabled": True}}, "embed.enabled is true but controlPlane.policy has no embed pool"),
    (with_embed_policy({}), "controlPlane.policy has an embed pool"),
    (with_embed_policy({"embed": {"enabled": True, "grpcPort": 8083}}), "embed.httpPort and embed.grpcPort"),
    ({"embed": {"maxBatchDelayMs": -1}}, "/embed/maxBatchDelayMs"),
    (with_embed_policy({"embed": {"enabled": True, "replicaz": 1}}), "'replicaz' not allowed"),
], ids=["enabled-without-policy-pool", "policy-pool-without-deployment", "same-ports", "negative-delay", "typo"])
def test_embed_values_that_cannot_work_fail_naming_the_field(values, needle):
    with pytest.raises(helm_python.HelmError) as info:
        chart_check.render(values)
    assert needle in str(info.value), str(info.value)
