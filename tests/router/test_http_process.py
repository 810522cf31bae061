"""`baton router` as a real process: flags/env/YAML configuration, discovery of a worker through
real Redis, a request over HTTP, and a clean exit on SIGTERM. The decode worker is the gRPC test
double from test_grpc_decode_double.py (the real end-to-end test comes when the workers land)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest
from test_grpc_decode_double import MODEL, DecodeDouble, model_dir  # noqa: F401 - fixture

from baton.contracts.worker_registry import WorkerRecord, WorkerRegistration
from baton.router.config import ConfigError, RouterConfig
from tests.conftest import free_port

pytestmark = pytest.mark.anyio


async def test_router_process_serves_and_stops_on_sigterm(redis_url, model_dir, tmp_path) -> None:
    http_port = free_port()
    cfg = tmp_path / "router.yaml"
    cfg.write_text(f"http_port: 1\ngrpc_port: {free_port()}\nhost: 127.0.0.1\nregistry_poll_interval_s: 0.05\n")
    env = {**os.environ, "BATON_ROUTER_REDIS_URL": redis_url, "BATON_ROUTER_POLICY": "round_robin"}
    proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "router", "--model", str(model_dir),
                             "--config", str(cfg), "--http-port", str(http_port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    double = DecodeDouble("d0", [5, 6, 7], model_dir=model_dir)
    await double.start()
    reg = WorkerRegistration(redis_url, WorkerRecord(worker_id="d0", pool="decode", grpc_address=double.address,
                                                     model=MODEL), interval_s=1.0, ttl_s=5.0)
    await reg.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as http:
            for _ in range(200):  # flag --http-port beat the YAML's http_port: 1
                try:
                    if (await http.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.communicate()[1]
                await asyncio.sleep(0.05)
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            assert "round_robin" in (await http.get("/metrics")).text, "env BATON_ROUTER_POLICY applies"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await reg.stop()
        await double.server.stop(None)


def test_bad_config_is_reported_without_traceback(model_dir, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("http_port: lots\n")
    out = subprocess.run([sys.executable, "-m", "baton.cli", "router", "--model", str(model_dir),
                          "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "http_port" in out.stderr and str(bad) in out.stderr and "Traceback" not in out.stderr


def test_config_precedence_flags_env_yaml(model_dir, tmp_path, monkeypatch) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("http_port: 1111\ngrpc_port: 2222\npolicy: least_load\n")
    monkeypatch.setenv("BATON_ROUTER_GRPC_PORT", "3333")
    cfg = RouterConfig.load(config=path, model=str(model_dir), policy="round_robin")
    assert (cfg.http_port, cfg.grpc_port, cfg.policy) == (1111, 3333, "round_robin")
    assert cfg.model_name == MODEL and cfg.context_length() == 256
    monkeypatch.setenv("BATON_ROUTER_CONFIG", str(path))  # the file itself may come from the environment
    assert RouterConfig.load(model=str(model_dir)).policy == "least_load"
    with pytest.raises(ConfigError, match="policy.*env BATON_ROUTER_POLICY"):
        monkeypatch.setenv("BATON_ROUTER_POLICY", "fastest")
        RouterConfig.load(config=path, model=str(model_dir))
    monkeypatch.delenv("BATON_ROUTER_POLICY")
    monkeypatch.delenv("BATON_ROUTER_CONFIG")
    with pytest.raises(ConfigError, match="unknown_field"):
        RouterConfig.load(model=str(model_dir), unknown_field=1)
    with pytest.raises(ConfigError, match="'model' .not given: pass --model, env BATON_ROUTER_MODEL"):
        RouterConfig.load()
    with pytest.raises(ConfigError, match=f"{tmp_path / 'none.yaml'}: config file not found"):
        RouterConfig.load(config=tmp_path / "none.yaml", model=str(model_dir))
