"""Control plane settings without starting it: flags > env (BATON_CONTROLPLANE_*) > --config YAML > defaults,
through the settings model and through the real `baton controlplane` command line."""
from __future__ import annotations

import pathlib

import pytest
from typer.testing import CliRunner

from baton.cli import app
from baton.controlplane.settings import ControlPlaneSettings
from baton.process_settings import ConfigError

POLICY = pathlib.Path(__file__).resolve().parents[2] / "deploy" / "policies" / "local.yaml"


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv("BATON_CONTROLPLANE_TOKEN", raising=False)


def test_precedence_flags_env_yaml_defaults(tmp_path, monkeypatch) -> None:
    path = tmp_path / "cp.yaml"
    path.write_text(f"policy: {POLICY}\nhttp_port: 1111\ngrpc_port: 2222\nredis_url: redis://from-yaml:1/0\n"
                    "token: from-yaml\n")
    monkeypatch.setenv("BATON_CONTROLPLANE_GRPC_PORT", "3333")
    monkeypatch.setenv("BATON_CONTROLPLANE_TOKEN", "from-env")
    s = ControlPlaneSettings.load(config=path, http_port=4444)
    assert (s.http_port, s.grpc_port, s.redis_url) == (4444, 3333, "redis://from-yaml:1/0")  # flag, env, yaml
    assert (s.admin_token, s.host, s.insecure) == ("from-env", "127.0.0.1", False)  # env, defaults
    assert "from-env" not in repr(s), "the token stays out of logs and reprs"
    assert ControlPlaneSettings.load(config=path, token="from-flag").admin_token == "from-flag"


def test_a_token_or_insecure_is_required(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="needs a token.*--insecure"):
        ControlPlaneSettings.load(policy=POLICY)
    monkeypatch.setenv("BATON_CONTROLPLANE_TOKEN", "")  # empty is no token
    with pytest.raises(ConfigError, match="needs a token"):
        ControlPlaneSettings.load(policy=POLICY)
    assert ControlPlaneSettings.load(policy=POLICY, insecure=True).admin_token is None


def test_command_line_errors_name_the_field_and_the_file(tmp_path) -> None:
    path = tmp_path / "cp.yaml"
    path.write_text(f"policy: {tmp_path / 'missing.yaml'}\nhttp_port: lots\n")
    result = CliRunner().invoke(app, ["controlplane", "--config", str(path), "--insecure"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"baton controlplane setting 'policy' ({path}): Path does not point to a file" in result.output
    assert f"baton controlplane setting 'http_port' ({path})" in result.output
    result = CliRunner().invoke(app, ["controlplane", "--config", str(path), "--policy", str(POLICY),
                                      "--http-port", "-5", "--insecure"])
    assert result.exit_code == 2 and "'policy'" not in result.output  # the flag replaced the file's policy
    assert "'http_port' (flag --http-port): Input should be greater than or equal to 0" in result.output
