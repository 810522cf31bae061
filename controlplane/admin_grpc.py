"""Admin gRPC API (`baton.v1.ControlPlane`): the same views as the HTTP API, bearer token in metadata."""
from __future__ import annotations

import json

import grpc

from baton.controlplane.admin_http import token_ok
from baton.controlplane.planner import Decision
from baton.controlplane.service import ControlPlane
from baton.proto.v1 import controlplane_pb2 as pb
from baton.proto.v1 import controlplane_pb2_grpc as pb_grpc


def _decision(d: Decision) -> pb.Decision:
    return pb.Decision(ts=d.ts, model=d.model, region=d.region, pool=d.pool, current=d.current, desired=d.desired,
                       direction=d.direction, reason=d.reason, proposals=d.proposals, limits=list(d.limits),
                       inputs_json=json.dumps(d.inputs, sort_keys=True))


class ControlPlaneServicer(pb_grpc.ControlPlaneServicer):
    def __init__(self, cp: ControlPlane, token: str | None) -> None:
        self.cp = cp
        self.token = token

    async def _auth(self, context: grpc.aio.ServicerContext) -> None:
        header = dict(context.invocation_metadata() or ()).get("authorization")
        if not token_ok(header, self.token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    async def GetStatus(self, request, context):  # noqa: N802 - gRPC method names
        await self._auth(context)
        s = self.cp.status()
        return pb.GetStatusResponse(
            pools=[pb.PoolStatus(**p) for p in s["pools"]], clusters=[pb.ClusterStatus(**c) for c in s["clusters"]],
            policy_source=s["policy_source"], policy_error=s["policy_error"],
            spillover_json=json.dumps(s["spillover"], sort_keys=True))

    async def ListDecisions(self, request, context):  # noqa: N802
        await self._auth(context)
        limit = request.limit or 100
        return pb.ListDecisionsResponse(decisions=[_decision(d) for d in list(self.cp.decisions)[-limit:]])

    async def DryRunPolicy(self, request, context):  # noqa: N802
        await self._auth(context)
        errors, out = self.cp.dry_run(request.yaml)
        return pb.PolicyResponse(ok=not errors, errors=errors, decisions=[_decision(d) for d in out])

    async def ApplyPolicy(self, request, context):  # noqa: N802
        await self._auth(context)
        errors = self.cp.apply(request.yaml)
        return pb.PolicyResponse(ok=not errors, errors=errors)


async def start_grpc(cp: ControlPlane, token: str | None, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_ControlPlaneServicer_to_server(ControlPlaneServicer(cp, token), server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port}")
    await server.start()
    return server
