"""`baton router`: the router command. Heavy imports happen inside the command, not at import."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("router")
    def router_command(
        model: Optional[str] = typer.Option(None, "--model", help="model directory [env BATON_ROUTER_MODEL]"),
        served_model_name: Optional[str] = typer.Option(None, help="model id clients send (default: dir name)"),
        host: Optional[str] = typer.Option(None, help="bind address (default 0.0.0.0)"),
        http_port: Optional[int] = typer.Option(None, "--http-port", "--port", help="HTTP port (default 8000)"),
        grpc_port: Optional[int] = typer.Option(None, help="gRPC Inference port, 0 disables (default 50051)"),
        redis_url: Optional[str] = typer.Option(None, help="Redis for worker discovery"),
        region: Optional[str] = typer.Option(None, help="this router's region (default local)"),
        policy: Optional[str] = typer.Option(None, help="round_robin / least_load / kv_aware (default kv_aware)"),
        kv_transport: Optional[str] = typer.Option(None, help="KV transport: tcp / nixl"),
        local_prefill_threshold: Optional[int] = typer.Option(
            None, help="prompts with at most this many uncached tokens prefill on the decode worker (default 64)"),
        max_model_len: Optional[int] = typer.Option(None, help="context length (default: config.json)"),
        block_size: Optional[int] = typer.Option(None, help="KV block size in tokens (default 16)"),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file with router settings"),
        log_level: str = typer.Option("info", help="logging level"),
        log_json: bool = typer.Option(False, "--log-json", help="structured JSON logs"),
    ) -> None:
        """Run the router: OpenAI HTTP API + gRPC Inference, routing to workers found in Redis."""
        import asyncio
        import logging

        from baton.contracts.logs import setup_logging
        from baton.router.config import ConfigError, RouterConfig

        setup_logging(log_json, level=getattr(logging, log_level.upper(), logging.INFO))
        try:
            cfg = RouterConfig.load(
                config, model=model, served_model_name=served_model_name, host=host, http_port=http_port,
                grpc_port=grpc_port, redis_url=redis_url, region=region, policy=policy, kv_transport=kv_transport,
                local_prefill_threshold=local_prefill_threshold, max_model_len=max_model_len,
                block_size=block_size)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

        from baton.engine.errors import ModelFilesError
        from baton.router.server import Router

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
