"""`baton router`: the router command. Heavy imports happen inside the command, not at import."""
from __future__ import annotations

import typer

from baton.process_settings import settings_command
from baton.router.config import ConfigError, RouterConfig


def run(cfg: RouterConfig) -> None:
    import asyncio

    from baton.contracts.logs import setup_logging
    from baton.engine.errors import ModelFilesError
    from baton.router.server import Router

    setup_logging(cfg.log_json, level=cfg.logging_level)
    try:
        router = Router(cfg)
    except (ModelFilesError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        asyncio.run(router.serve_forever())
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.command("router")(settings_command(
        RouterConfig, run, "Run the router: OpenAI HTTP API + gRPC Inference, routing to workers found in Redis.",
        aliases={"http_port": ("--port",)}))
