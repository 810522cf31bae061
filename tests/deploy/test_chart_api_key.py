"""The router's OpenAI API key comes from a Secret (never argv): a value makes the chart's own Secret, an existing
Secret is referenced as is, and with neither the router serves without a key."""
from __future__ import annotations

import base64

import pytest
from chart_release import Release


def api_key_env(release: Release) -> list[dict]:
    return [e for e in release.container("router").get("env", []) if e["name"] == "BATON_API_KEY"]


def test_no_key_by_default(default_release):
    assert api_key_env(default_release) == []
    assert not [d for d in default_release.docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("api-key")]


def test_a_value_is_kept_in_the_charts_secret_and_read_from_there():
    release = Release.render({"router": {"apiKey": {"value": "sk-test-123"}}})
    [env] = api_key_env(release)
    ref = env["valueFrom"]["secretKeyRef"]
    [secret] = [d for d in release.docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]]
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == "sk-test-123"
    assert "sk-test-123" not in " ".join(release.container("router")["args"])


def test_an_existing_secret_is_referenced_and_none_is_made():
    release = Release.render({"router": {"apiKey": {"existingSecret": "team-keys", "value": "ignored"}}})
    [env] = api_key_env(release)
    assert env["valueFrom"]["secretKeyRef"] == {"name": "team-keys", "key": "api-key"}
    assert not [d for d in release.docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("api-key")]


def test_unknown_api_key_fields_are_refused():
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match="apiKey"):
        Release.render({"router": {"apiKey": {"key": "x"}}})
