"""Security on real processes: the OpenAI API key is checked in constant time on both fronts and never reaches a
log line; every listening socket of the router and of the workers (gRPC, HTTP, the tcp KV transport) is bound
to the configured host, not to all interfaces. (The KV transport accepting writes only for announced transfers:
tests/engine/test_kv_transfer.py::test_tcp_refuses_a_transfer_the_receiver_did_not_announce.)"""
from __future__ import annotations

import asyncio
import hmac
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from baton.proto.v1 import inference_pb2, inference_pb2_grpc
from tests.cluster import start_worker
from tests.conftest import free_port

pytestmark = pytest.mark.slow
KEY = "sk-baton-" + "7f3a9c1e5b2d4f608e1a3c5b7d9f0a2c"
HOST = "127.0.0.2"  # a loopback address other than 127.0.0.1: a socket on 0.0.0.0 or 127.0.0.1 is wrong


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from baton.devtools.make_model import make_model

    return str(make_model(tmp_path_factory.mktemp("sec") / "model", arch="llama", vocab=512, seed=5))


def listening(pid: int) -> list[tuple[str, str, int]]:
    """(protocol, local address, port) of every inet socket the process listens on (TCP) or is bound to (UDP)."""
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in pathlib.Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if inode not in inodes or (proto.startswith("tcp") and state != "0A"):  # 0A: LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            if len(addr_hex) == 8:
                addr = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr_hex)[::-1])
            else:
                raw = bytes.fromhex(addr_hex)
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                addr = addr.removeprefix("::ffff:")  # an IPv4 address on a dual-stack socket (gRPC's)
            found.append((proto, addr, int(port_hex, 16)))
    return found


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.1)


def test_workers_listen_only_on_the_configured_host(model_dir, redis_url):
    p = start_worker("prefill", model_dir, redis_url, "p-host", "--host", HOST, "--kv-transport", "tcp")
    d = start_worker("decode", model_dir, redis_url, "d-host", "--host", HOST, "--kv-transport", "tcp")
    try:
        from tests.workers.test_disaggregated import decode

        # One remote prefill makes the decode worker open its tcp KV listener (it listens on first use).
        chunks, stats = asyncio.run(decode(f"{HOST}:{d.grpc_port}", "r", [5, 9, 13] * 12, prefill=type(
            "Target", (), {"worker_id": "p-host", "grpc_address": f"{HOST}:{p.grpc_port}"})))
        assert not any(c.HasField("error") for c in chunks) and chunks[0].prefill.kv_bytes > 0
        for worker in (p, d):
            sockets = listening(worker.proc.pid)
            ports = {port for _, _, port in sockets}
            assert {worker.grpc_port, worker.http_port} <= ports, sockets
            assert all(addr == HOST for _, addr, _ in sockets), f"{worker.pool} worker binds beyond {HOST}: {sockets}"
        assert len(listening(d.proc.pid)) >= 3, "the decode worker's tcp KV listener was not found"
        with pytest.raises(OSError):  # nothing of the worker answers on the other loopback address
            socket.create_connection(("127.0.0.1", d.grpc_port), timeout=1).close()
    finally:
        p.stop()
        d.stop()


def test_router_binds_its_host_and_the_api_key_is_constant_time_and_never_logged(model_dir, redis_url):
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "BATON_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "baton.cli", "router", "--model", model_dir, "--redis-url",
                             redis_url, "--host", HOST, "--http-port", str(http_port), "--grpc-port",
                             str(grpc_port), "--log-level", "debug"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://{HOST}:{http_port}"
    try:
        _wait_http(f"{url}/health", proc)
        sockets = listening(proc.pid)
        assert {http_port, grpc_port} <= {port for _, _, port in sockets}, sockets
        assert all(addr == HOST for _, addr, _ in sockets), f"the router binds beyond {HOST}: {sockets}"

        near_misses = [KEY + "x", KEY[:-1] + "0", KEY[:-1], "x" + KEY, KEY.upper(), "-"]
        for wrong in near_misses:
            r = httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {wrong}"}, timeout=5)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
            assert KEY not in r.text and KEY[:-1] not in r.text
        assert httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200
        r = httpx.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=10,
                       json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404  # past the key check: the request itself is refused
        with grpc.insecure_channel(f"{HOST}:{grpc_port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for wrong in near_misses[:3]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Models(inference_pb2.ModelsRequest(), metadata=[("authorization", f"Bearer {wrong}")],
                                timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and KEY not in err.value.details()
            assert stub.Models(inference_pb2.ModelsRequest(), metadata=[("authorization", f"Bearer {KEY}")],
                               timeout=5).models
        assert KEY not in httpx.get(f"{url}/metrics", timeout=5).text
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert "DEBUG" in out or "debug" in out.lower(), "the router logged nothing at debug: the check proves little"
    for secret in (KEY, KEY[:-1], KEY[9:]):
        assert secret not in out, "the API key (or most of it) appears in the router's log output"


def test_api_key_comparison_is_hmac_compare_digest(monkeypatch, model_dir, redis_url):
    """The key check goes through hmac.compare_digest (constant time) on HTTP and gRPC, whatever the key given."""
    from baton.contracts.worker_registry import WorkerRegistry
    from baton.engine.tokenizer import Tokenizer
    from baton.router.config import RouterConfig
    from baton.router.grpc_server import add_to_server
    from baton.router.http_server import create_app
    from baton.router.metrics import RouterMetrics
    from baton.router.service import RouterService

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    config = RouterConfig(model=model_dir, redis_url=redis_url, api_key=KEY)
    service = RouterService(config, Tokenizer.from_dir(model_dir), WorkerRegistry(redis_url), RouterMetrics("m"))

    async def main():
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            wrong = await client.get("/v1/models", headers={"authorization": f"Bearer {KEY[:-1]}0"})
            right = await client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        server = grpc.aio.server()
        add_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Models(inference_pb2.ModelsRequest(), metadata=[("authorization", "Bearer nope")])
                await stub.Models(inference_pb2.ModelsRequest(), metadata=[("authorization", f"Bearer {KEY}")])
        finally:
            await server.stop(None)
        return wrong.status_code, right.status_code

    assert asyncio.run(main()) == (401, 200)
    expected = f"Bearer {KEY}".encode()
    assert calls == [(f"Bearer {KEY[:-1]}0".encode(), expected), (expected, expected),
                     (b"Bearer nope", expected), (expected, expected)]
