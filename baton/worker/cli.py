"""The `baton prefill-worker` / `baton decode-worker` commands: one set of flags, two pools."""
from __future__ import annotations

import importlib
from collections.abc import Callable

import typer

from baton.process_settings import settings_command
from baton.worker.settings import WorkerSettings


def worker_command(pool: str, service_module: str) -> Callable[..., None]:
    def run(settings: WorkerSettings) -> None:
        import asyncio
        import logging

        from baton.contracts.logs import setup_logging
        from baton.engine.errors import ModelFilesError
        from baton.engine.model_files import check_model_dir
        from baton.worker.server import serve

        setup_logging(settings.log_json, level=settings.logging_level)
        try:
            model_dir = settings.model_dir  # a Hub id is downloaded here, before anything starts
            check_model_dir(model_dir)
        except ModelFilesError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        logging.getLogger(__name__).info("serving %s from %s", settings.served_model_name, model_dir)
        add_service = importlib.import_module(service_module).add_service
        asyncio.run(serve(settings, add_service))

    return settings_command(
        WorkerSettings, run, f"Run {'an' if pool == 'embed' else 'a'} {pool} worker: serves the "
        f"{pool.capitalize()}Worker gRPC service, registers in Redis"
        f"{'' if pool == 'embed' else ', publishes KV events'}.", fixed={"pool": pool},
        aliases={"model_name": ("--served-model-name",)})
