"""Runs a ControlPlane with its HTTP and gRPC admin APIs until stopped (`baton controlplane`, `baton up`)."""
from __future__ import annotations

import asyncio

import uvicorn

from baton.controlplane.admin_grpc import start_grpc
from baton.controlplane.admin_http import create_app
from baton.controlplane.service import ControlPlane
from baton.embedded_uvicorn import EmbeddedUvicorn


async def serve(cp: ControlPlane, *, token: str | None, host: str = "127.0.0.1", http_port: int = 8090,
                grpc_port: int = 50070, stop: asyncio.Event | None = None) -> None:
    """`token=None` means the caller chose --insecure; there is no other way to get an open admin API."""
    stop = stop or asyncio.Event()
    grpc_server = await start_grpc(cp, token, host, grpc_port)
    http = EmbeddedUvicorn(uvicorn.Config(create_app(cp, token), host=host, port=http_port, log_level="warning",
                                          lifespan="off"))
    http_task = asyncio.create_task(http.serve())
    loop_task = asyncio.create_task(cp.run(stop))
    try:
        await stop.wait()
    finally:
        stop.set()
        http.should_exit = True
        await asyncio.gather(http_task, loop_task, return_exceptions=True)
        await grpc_server.stop(grace=1)
        await asyncio.to_thread(cp.close)
