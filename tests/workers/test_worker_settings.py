"""Worker settings without starting a worker: flags > env (BATON_WORKER_*) > --config YAML > defaults, through
the settings model and through the real `baton decode-worker` command line."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from baton.cli import app
from baton.process_settings import ConfigError
from baton.worker.settings import WorkerSettings


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_precedence_flags_env_yaml_defaults(model_dir, tmp_path, monkeypatch) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(f"model: {model_dir}\ngrpc_port: 1111\nhttp_port: 2222\nregion: from-yaml\n"
                    "block_size: 32\nlog_json: true\n")
    monkeypatch.setenv("BATON_WORKER_HTTP_PORT", "3333")
    monkeypatch.setenv("BATON_WORKER_REGION", "from-env")
    s = WorkerSettings.load(config=path, pool="decode", region="from-flag", log_json=False)
    assert (s.grpc_port, s.http_port, s.region) == (1111, 3333, "from-flag")  # yaml, env, flag
    assert (s.block_size, s.log_json, s.kv_transport) == (32, False, "ipc,tcp")  # yaml, flag over yaml, default (auto)
    assert s.served_model_name == "m"
    monkeypatch.delenv("BATON_WORKER_HTTP_PORT")
    defaults = WorkerSettings.load(pool="prefill", model=str(model_dir))
    assert (defaults.grpc_port, defaults.http_port, defaults.block_size) == (50061, 8081, 16)  # the pool's ports
    assert WorkerSettings.load(pool="decode", model=str(model_dir), grpc_port=0).grpc_port == 0


def test_errors_name_the_field_and_where_it_came_from(model_dir, tmp_path, monkeypatch) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("max_num_seqs: 0\nblok_size: 16\n")
    with pytest.raises(ConfigError) as info:
        WorkerSettings.load(config=path, pool="decode", model=str(model_dir))
    assert f"baton worker setting 'max_num_seqs' ({path})" in str(info.value)
    assert f"baton worker setting 'blok_size' ({path}): Extra inputs are not permitted" in str(info.value)
    monkeypatch.setenv("BATON_WORKER_MODEL", str(tmp_path))
    with pytest.raises(ConfigError, match="'model' .env BATON_WORKER_MODEL.*no config.json"):
        WorkerSettings.load(pool="decode")
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        WorkerSettings.load(config=path, pool="decode", model=str(model_dir))


def test_command_line_flags_reach_the_settings(model_dir, tmp_path, monkeypatch) -> None:
    # Each run stops at a bad setting, before a worker starts: the message shows which source won.
    monkeypatch.setenv("BATON_WORKER_MAX_NUM_SEQS", "-1")
    result = CliRunner().invoke(app, ["decode-worker", "--model", str(model_dir)])
    assert result.exit_code == 2 and "'max_num_seqs' (env BATON_WORKER_MAX_NUM_SEQS)" in result.output
    result = CliRunner().invoke(app, ["decode-worker", "--model", str(model_dir), "--max-num-seqs", "0"])
    assert result.exit_code == 2 and "'max_num_seqs' (flag --max-num-seqs)" in result.output
    assert "Traceback" not in result.output
    missing = tmp_path / "absent.yaml"
    result = CliRunner().invoke(app, ["prefill-worker", "--config", str(missing)])
    assert result.exit_code == 2 and f"{missing}: config file not found" in result.output
