"""The `baton prefill-worker` / `baton decode-worker` commands: one set of flags, two pools."""
from __future__ import annotations

import importlib
from collections.abc import Callable

from baton.process_settings import settings_command
from baton.worker.settings import WorkerSettings


def worker_command(pool: str, service_module: str) -> Callable[..., None]:
    def run(settings: WorkerSettings) -> None:
        import asyncio

        from baton.contracts.logs import setup_logging
        from baton.worker.server import serve

        setup_logging(settings.log_json, level=settings.logging_level)
        add_service = importlib.import_module(service_module).add_service
        asyncio.run(serve(settings, add_service))

    return settings_command(
        WorkerSettings, run, f"Run a {pool} worker: serves the {pool.capitalize()}Worker gRPC service, registers in "
        f"Redis, publishes KV events.", fixed={"pool": pool})
