"""The chart lints clean, renders with defaults and the multi-region example, validates against the
Kubernetes 1.30 schemas (offline, strict), and rejects bad values with a message naming the field."""
from __future__ import annotations

import base64
import copy
import json

import chart_check
import helm_python
import pytest
import yaml
from chart_release import Release

CASES = chart_check.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_lint_render_and_schema_validation_are_clean(case):
    result = chart_check.check_case(case)
    assert result.findings == []
    assert result.manifests >= 10
    # The rendered policy went through the control plane's own parser, not a skip.
    if case.values.get("controlPlane", {}).get("enabled", True):
        assert result.notes == ["policy: valid"]


def test_examples_include_two_regions_sharing_one_control_plane():
    names = {c.name.rsplit("/", 1)[-1] for c in CASES}
    assert {"us-east.yaml", "eu-west.yaml"} <= names
    regions = {c.values["region"] for c in CASES if c.name != "default"}
    assert regions == {"us-east", "eu-west"}
    control_planes = [c for c in CASES if c.name != "default" and c.values["controlPlane"]["enabled"]]
    assert len(control_planes) == 1


def test_validator_reports_broken_manifests(default_release):
    deployment = copy.deepcopy(default_release.workload("router"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    [finding] = chart_check.validate([("router.yaml", deployment)])
    assert "containers.0.ports.0.containerPort" in finding and "integer" in finding

    unknown = copy.deepcopy(default_release.workload("router"))
    unknown["spec"]["replicaz"] = 2
    [finding] = chart_check.validate([("router.yaml", unknown)])
    assert "replicaz" in finding

    typo = {"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}}
    assert "no Kubernetes 1.30.0 schema" in chart_check.validate([("t.yaml", typo)])[0]


def test_service_monitor_renders_when_enabled_and_only_it_skips_schema_validation():
    values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    docs = chart_check.manifests(chart_check.render(values))
    monitors = [d for _, d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    assert monitors[0]["metadata"]["labels"]["release"] == "prom"
    assert monitors[0]["spec"]["endpoints"][0]["path"] == "/metrics"
    assert chart_check.validate(docs) == []


BAD_VALUES = [
    ({"prefill": {"replicas": -1}}, "/prefill/replicas", "minimum"),
    ({"decode": {"replicaz": 2}}, "/decode", "'replicaz' not allowed"),
    ({"routr": {}}, "at ''", "'routr' not allowed"),
    ({"router": {"httpPort": 70000}}, "/router/httpPort", "maximum"),
    ({"region": "US East"}, "/region", "does not match pattern"),
    ({"images": {"worker": {"pullPolicy": "Sometimes"}}}, "/images/worker/pullPolicy", "must be one of"),
    ({"redis": {"enabled": False}}, "/redis/externalUrl", "minLength"),
    ({"controlPlane": {"adminToken": {"value": "short"}}}, "/controlPlane/adminToken/value", "minLength"),
    ({"controlPlane": {"policy": {"tick_secs": 5}}}, "/controlPlane/policy", "'tick_secs' not allowed"),
    ({"controlPlane": {"policy": {"clusters": [{"name": "c", "region": "local", "backend": "kubernetes", "gpus": -4}]}}},
     "/controlPlane/policy/clusters/0/gpus", "minimum"),
    ({"model": {"dir": "/data/model"}}, "model.dir", "must lie under model.mountPath"),
    ({"decode": {"grpcPort": 8082}}, "decode.httpPort and decode.grpcPort", "must differ"),
    ({"region": "us-east"}, "controlPlane.policy.clusters", 'region "us-east"'),
]


@pytest.mark.parametrize("values,field,problem", BAD_VALUES, ids=[b[1] + ":" + b[2] for b in BAD_VALUES])
def test_bad_values_fail_naming_the_field(values, field, problem):
    with pytest.raises(helm_python.HelmError) as info:
        chart_check.render(values)
    message = str(info.value)
    assert field in message and problem in message, message
    assert "Traceback" not in message


def test_chart_check_cli_exit_status_and_output(tmp_path, capsys):
    assert chart_check.main([]) == 0
    assert "0 failed" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"prefill": {"replicas": -2}}))
    assert chart_check.main([str(bad)]) == 1
    assert "/prefill/replicas" in capsys.readouterr().out

    broken = tmp_path / "broken.yaml"
    broken.write_text("prefill: [unclosed\n")
    assert chart_check.main([str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_values_schema_embeds_the_current_policy_model():
    current = json.loads(chart_check.VALUES_SCHEMA.read_text())
    assert chart_check.with_policy_schema(current) == current, (
        "controlplane/policy.py changed: run `python scripts/chart_check.py --write-policy-schema`")


def test_admin_token_is_generated_given_or_taken_from_an_existing_secret():
    generated = Release.render({}).get("Secret", "baton-admin")
    token = base64.b64decode(generated["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()

    given = Release.render({"controlPlane": {"adminToken": {"value": "s3cret-token-0123456789"}}})
    assert base64.b64decode(given.get("Secret", "baton-admin")["data"]["token"]) == b"s3cret-token-0123456789"

    existing = Release.render({"controlPlane": {"adminToken": {"existingSecret": "ops-admin"}}})
    assert existing.all("Secret") == []
    env = existing.container("controlplane")["env"]
    assert {"name": "BATON_CONTROLPLANE_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "ops-admin", "key": "token"}}} in env


def test_external_redis_replaces_the_bundled_statefulset():
    release = Release.render({"redis": {"enabled": False, "externalUrlSecret": {"name": "redis-creds"}}})
    assert not release.has("redis")
    for component in ("router", "prefill", "decode", "controlplane"):
        env = [e for e in release.container(component)["env"] if e["name"] == "REDIS_URL"]
        assert env == [{"name": "REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "redis-creds", "key": "url"}}}]


# Kubernetes objects passed through as-is: their inner keys are the API's, documented upstream.
PASS_THROUGH = {"podSecurityContext", "securityContext", "resources", "volume", "policy", "affinity", "tolerations"}


def test_values_yaml_documents_every_key():
    """Each key in values.yaml has a comment on the line above (or inline), except inside pass-through objects."""
    lines = (chart_check.CHART / "values.yaml").read_text().splitlines()
    undocumented, ancestors = [], []  # ancestors: (indent, key) of the enclosing keys
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip(" -"))
        key = stripped.lstrip("- ").split(":", 1)[0]
        ancestors = [(n, k) for n, k in ancestors if n < indent]
        inside = any(k in PASS_THROUGH for _, k in ancestors)
        ancestors.append((indent, key))
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        if not inside and not stripped.startswith("-") and "#" not in line and not above.startswith("#"):
            undocumented.append(f"values.yaml:{i + 1}: {stripped}")
    assert undocumented == [], "\n".join(undocumented)
