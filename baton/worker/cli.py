"""The `baton prefill-worker` / `baton decode-worker` commands: one set of flags, two pools."""
from __future__ import annotations

import importlib
import pathlib
from typing import Optional

import typer


def worker_command(pool: str, service_module: str, default_grpc_port: int, default_http_port: int):
    def command(
        model: Optional[str] = typer.Option(None, "--model", envvar="BATON_WORKER_MODEL",
                                            help="Hugging Face-format model directory."),
        redis_url: Optional[str] = typer.Option(None, "--redis-url", envvar="BATON_WORKER_REDIS_URL",
                                                help="Redis for registration and KV events."),
        worker_id: Optional[str] = typer.Option(None, "--worker-id", help="Unique id (default: host-pid)."),
        region: Optional[str] = typer.Option(None, "--region", help="Region label for routing and autoscaling."),
        host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
        advertise_host: Optional[str] = typer.Option(None, "--advertise-host",
                                                     help="Address others reach this worker at (default: --host)."),
        grpc_port: int = typer.Option(default_grpc_port, "--grpc-port", help="gRPC port (0 = any free port)."),
        http_port: int = typer.Option(default_http_port, "--http-port",
                                      help="HTTP port for /health, /ready, /metrics (0 = any)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda | cuda:N"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16"),
        num_kv_blocks: Optional[int] = typer.Option(None, "--num-kv-blocks", help="KV pool size in blocks."),
        kv_cache_memory_gb: Optional[float] = typer.Option(None, "--kv-cache-memory-gb",
                                                           help="KV pool size when --num-kv-blocks is unset."),
        max_num_seqs: Optional[int] = typer.Option(None, "--max-num-seqs", help="Max requests in a batch."),
        max_num_batched_tokens: Optional[int] = typer.Option(None, "--max-num-batched-tokens",
                                                             help="Token budget per step (chunked prefill)."),
        kv_transport: Optional[str] = typer.Option(None, "--kv-transport", help="tcp | nixl"),
        torch_threads: Optional[int] = typer.Option(None, "--torch-threads", help="CPU threads for torch."),
        log_json: bool = typer.Option(False, "--log-json", help="Structured JSON logs."),
        config: Optional[pathlib.Path] = typer.Option(None, "--config", help="YAML file of the same settings."),
    ) -> None:
        import asyncio

        from pydantic import ValidationError

        from baton.contracts.logs import setup_logging
        from baton.worker.server import serve
        from baton.worker.settings import WorkerSettings

        try:
            settings = WorkerSettings.load(
                config, pool=pool, model=model, redis_url=redis_url, worker_id=worker_id, region=region,
                host=host, advertise_host=advertise_host, grpc_port=grpc_port, http_port=http_port,
                device=device, dtype=dtype, num_kv_blocks=num_kv_blocks, kv_cache_memory_gb=kv_cache_memory_gb,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                kv_transport=kv_transport, torch_threads=torch_threads, log_json=log_json or None)
        except (ValidationError, ValueError, OSError) as exc:
            typer.echo(f"error: invalid {pool} worker settings:\n{exc}", err=True)
            raise typer.Exit(2)
        setup_logging(settings.log_json)
        add_service = importlib.import_module(service_module).add_service
        asyncio.run(serve(settings, add_service))

    command.__doc__ = (f"Run a {pool} worker: serves the {pool.capitalize()}Worker gRPC service, registers in Redis, "
                       f"publishes KV events.")
    return command
