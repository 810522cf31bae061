"""Admin API over real loopback servers: HTTP (uvicorn) and gRPC, bearer token required, dry-run and apply."""
from __future__ import annotations

import asyncio
import pathlib

import grpc
import httpx
import redis.asyncio as aioredis
from typer.testing import CliRunner

from baton.controlplane.backends.local import LocalBackend
from baton.controlplane.policy import PolicyFile
from baton.controlplane.server import serve
from baton.controlplane.service import ControlPlane
from baton.proto.v1 import controlplane_pb2 as pb
from baton.proto.v1 import controlplane_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.controlplane.conftest import sleeper

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOCAL = (ROOT / "deploy" / "policies" / "local.yaml").read_text()


async def _wait_http(url: str) -> None:
    async with httpx.AsyncClient() as c:
        for _ in range(100):
            try:
                if (await c.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never came up")


def test_http_and_grpc_admin(redis_url, tmp_path):
    policy_path = tmp_path / "p.yaml"
    policy_path.write_text(LOCAL)
    http_port, grpc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    auth = {"Authorization": "Bearer s3cret"}

    async def scenario():
        client = aioredis.Redis.from_url(redis_url)
        cp = ControlPlane(PolicyFile(policy_path), client,
                          backends={"laptop": LocalBackend(sleeper(tmp_path), region="local")})
        stop = asyncio.Event()
        task = asyncio.create_task(serve(cp, token="s3cret", http_port=http_port, grpc_port=grpc_port, stop=stop))
        r = {}
        try:
            await _wait_http(f"{base}/health")
            async with httpx.AsyncClient(base_url=base) as h:
                for _ in range(100):  # first tick has run once decisions appear
                    if (await h.get("/v1/decisions", headers=auth)).json()["decisions"]:
                        break
                    await asyncio.sleep(0.05)
                r["no_token"] = (await h.get("/v1/status")).status_code
                r["bad_token"] = (await h.get("/v1/status", headers={"Authorization": "Bearer nope"})).status_code
                r["status"] = (await h.get("/v1/status", headers=auth)).json()
                r["decisions"] = (await h.get("/v1/decisions?limit=2", headers=auth)).json()["decisions"]
                r["metrics"] = (await h.get("/metrics")).text
                bad = await h.post("/v1/policy/dry-run", headers=auth, content=LOCAL.replace("gpus: 4", "gpus: -4"))
                r["dry_bad"] = (bad.status_code, bad.json())
                dry = await h.post("/v1/policy/dry-run", headers=auth,
                                   content=LOCAL.replace("min_replicas: 1\n          max_replicas: 2\n"
                                                         "          capacity_tokens_per_s: 2000",
                                                         "min_replicas: 2\n          max_replicas: 2\n"
                                                         "          capacity_tokens_per_s: 2000"))
                r["dry"] = dry.json()
                r["source_after_dry"] = (await h.get("/v1/status", headers=auth)).json()["policy_source"]
                r["apply"] = (await h.post("/v1/policy/apply", headers=auth, content=LOCAL)).json()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                stub = pb_grpc.ControlPlaneStub(ch)
                try:
                    await stub.GetStatus(pb.GetStatusRequest())
                except grpc.aio.AioRpcError as exc:
                    r["grpc_no_token"] = exc.code()
                md = (("authorization", "Bearer s3cret"),)
                r["grpc_status"] = await stub.GetStatus(pb.GetStatusRequest(), metadata=md)
                r["grpc_decisions"] = await stub.ListDecisions(pb.ListDecisionsRequest(limit=2), metadata=md)
                r["grpc_dry"] = await stub.DryRunPolicy(pb.PolicyRequest(yaml="clusters: []"), metadata=md)
        finally:
            stop.set()
            await task
            await client.aclose()
        return r

    r = asyncio.run(scenario())
    assert r["no_token"] == 401 and r["bad_token"] == 401
    pools = {(p["region"], p["pool"]): p for p in r["status"]["pools"]}
    assert pools[("local", "prefill")]["desired"] == 1  # no signals yet: hold at min
    assert "stale" in pools[("local", "prefill")]["last_reason"]
    assert len(r["decisions"]) == 2 and r["decisions"][0]["direction"] in ("up", "hold")
    assert 'baton_controlplane_desired_replicas{pool="prefill",region="local"} 1.0' in r["metrics"]
    assert r["dry_bad"][0] == 422 and "clusters[0].gpus" in r["dry_bad"][1]["errors"][0]
    prefill = next(d for d in r["dry"]["decisions"] if d["pool"] == "prefill")
    assert prefill["desired"] == 2 and r["source_after_dry"] == str(policy_path)  # dry-run changed nothing
    assert r["apply"] == {"ok": True, "errors": []}
    assert r["grpc_no_token"] == grpc.StatusCode.UNAUTHENTICATED
    assert {(p.region, p.pool) for p in r["grpc_status"].pools} == {("local", "prefill"), ("local", "decode")}
    assert r["grpc_status"].policy_source == "<api>"
    assert len(r["grpc_decisions"].decisions) == 2
    assert not r["grpc_dry"].ok and "clusters" in r["grpc_dry"].errors[0]


def test_refuses_to_start_without_token(tmp_path, monkeypatch):
    from baton.cli import app

    monkeypatch.delenv("BATON_CONTROLPLANE_TOKEN", raising=False)
    path = tmp_path / "p.yaml"
    path.write_text(LOCAL)
    result = CliRunner().invoke(app, ["controlplane", "--policy", str(path)])
    assert result.exit_code == 2
    assert "needs a token" in result.output and "--insecure" in result.output
