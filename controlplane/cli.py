"""`baton controlplane` and `baton policy check|simulate`; heavy imports stay inside the commands."""
from __future__ import annotations

import pathlib

import typer

policy_app = typer.Typer(help="Check and simulate autoscaling policies.", no_args_is_help=True)


def controlplane(
    policy: pathlib.Path = typer.Option(..., "--policy", envvar="BATON_CONTROLPLANE_POLICY", help="policy YAML"),
    redis_url: str = typer.Option("redis://127.0.0.1:6379/0", "--redis-url", envvar="BATON_CONTROLPLANE_REDIS_URL"),
    host: str = typer.Option("127.0.0.1", "--host", envvar="BATON_CONTROLPLANE_HOST"),
    http_port: int = typer.Option(8090, "--http-port", envvar="BATON_CONTROLPLANE_HTTP_PORT"),
    grpc_port: int = typer.Option(50070, "--grpc-port", envvar="BATON_CONTROLPLANE_GRPC_PORT"),
    token: str = typer.Option("", "--token", envvar="BATON_CONTROLPLANE_TOKEN",
                              help="bearer token of the admin API (prefer the environment variable)"),
    insecure: bool = typer.Option(False, "--insecure", help="serve the admin API without a token"),
    worker_log_dir: pathlib.Path = typer.Option(None, "--worker-log-dir", envvar="BATON_CONTROLPLANE_WORKER_LOG_DIR",
                                                help="where local-backend workers write their logs"),
    log_json: bool = typer.Option(False, "--log-json", help="structured JSON logs"),
) -> None:
    """Run the global control plane: signals -> policy -> replicas, with its admin API."""
    import asyncio
    import signal

    import redis.asyncio as aioredis

    from baton.controlplane.policy import PolicyError, PolicyFile
    from baton.controlplane.server import serve
    from baton.controlplane.service import ControlPlane

    if not token and not insecure:
        typer.echo("error: the admin API needs a token: set BATON_CONTROLPLANE_TOKEN (or --token), "
                   "or pass --insecure to run it open", err=True)
        raise typer.Exit(2)
    try:
        pfile = PolicyFile(policy)
    except PolicyError as exc:
        typer.echo("\n".join(exc.errors), err=True)
        raise typer.Exit(1) from None
    from baton.contracts.logs import setup_logging

    setup_logging(log_json)

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        # Local and Ray workers run the same command, so both backends get the same options.
        worker_options = {"redis_url": redis_url, "log_dir": str(worker_log_dir) if worker_log_dir else None,
                          "model_dirs": {m.name: m.model_dir for m in pfile.policy.models if m.model_dir}}
        cp = ControlPlane(pfile, client, backend_options={"local": worker_options, "ray": worker_options})
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await serve(cp, token=token or None, host=host, http_port=http_port, grpc_port=grpc_port, stop=stop)
        finally:
            await client.aclose()

    asyncio.run(main())


@policy_app.command("check")
def check(files: list[pathlib.Path] = typer.Argument(..., help="policy YAML files")) -> None:
    """Validate policies; print every error as file:line: field: message."""
    from baton.controlplane.policy import PolicyError, load_policy

    bad = False
    for f in files:
        try:
            p = load_policy(f)
        except PolicyError as exc:
            bad = True
            typer.echo("\n".join(exc.errors), err=True)
            continue
        typer.echo(f"ok: {f} ({len(p.clusters)} clusters, {len(p.pool_keys())} pools)")
    if bad:
        raise typer.Exit(1)


@policy_app.command("simulate")
def simulate(
    policy: pathlib.Path = typer.Argument(..., help="policy YAML"),
    trace: pathlib.Path = typer.Option(..., "--trace", help="CSV(.gz): timestamp,region,prompt_tokens,output_tokens"),
    capacity_json: pathlib.Path = typer.Option(None, "--capacity-json",
                                               help="measured {prefill,decode}_tokens_per_s per replica"),
    plot_path: pathlib.Path = typer.Option(pathlib.Path("simulation.png"), "--plot", help="PNG to write"),
) -> None:
    """Replay a trace through the live planner; print GPU-hours and SLO attainment against an oracle."""
    import json

    from baton.controlplane.policy import PolicyError, load_policy
    from baton.controlplane.simulator import TraceError, load_trace, plot, report
    from baton.controlplane.simulator import simulate as run

    try:
        pol = load_policy(policy)
        requests = load_trace(trace, pol.models[0].name)
        capacity = json.loads(capacity_json.read_text()) if capacity_json else None
    except PolicyError as exc:
        typer.echo("\n".join(exc.errors), err=True)
        raise typer.Exit(1) from None
    except (TraceError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    result = run(pol, requests, capacity)
    typer.echo(report(result))
    plot(result, pol, plot_path)
    typer.echo(f"plot: {plot_path}")


def register(app: typer.Typer) -> None:
    app.command("controlplane")(controlplane)
    app.add_typer(policy_app, name="policy")
