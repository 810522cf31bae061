"""`baton controlplane` and `baton policy check|simulate`; heavy imports stay inside the commands."""
from __future__ import annotations

import pathlib

import typer

from baton.controlplane.settings import ControlPlaneSettings
from baton.process_settings import settings_command

policy_app = typer.Typer(help="Check and simulate autoscaling policies.", no_args_is_help=True)


def run(settings: ControlPlaneSettings) -> None:
    import asyncio
    import signal

    import redis.asyncio as aioredis

    from baton.contracts.logs import setup_logging
    from baton.controlplane.policy import PolicyError, PolicyFile
    from baton.controlplane.server import serve
    from baton.controlplane.service import ControlPlane

    try:
        pfile = PolicyFile(settings.policy)
    except PolicyError as exc:  # bad input, like a bad option: exit 2
        typer.echo("\n".join(exc.errors), err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_json, level=settings.logging_level)

    async def main() -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        # Local and Ray workers run the same command, so both backends get the same options.
        log_dir = settings.worker_log_dir
        worker_options = {"redis_url": settings.redis_url, "log_dir": str(log_dir) if log_dir else None,
                          "model_dirs": {m.name: m.model_dir for m in pfile.policy.models if m.model_dir}}
        local_options = {**worker_options, "keep_workers": settings.keep_workers}
        cp = ControlPlane(pfile, client, backend_options={"local": local_options, "ray": worker_options})
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await serve(cp, token=settings.admin_token, host=settings.host, http_port=settings.http_port,
                        grpc_port=settings.grpc_port, stop=stop)
        finally:
            await client.aclose()

    asyncio.run(main())


@policy_app.command("check")
def check(files: list[pathlib.Path] = typer.Argument(..., help="policy YAML files")) -> None:
    """Validate policies; print every error as file:line: field: message (exit 2 if any)."""
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
        raise typer.Exit(2)


@policy_app.command("simulate")
def simulate(
    policy: pathlib.Path = typer.Argument(..., help="policy YAML"),
    trace: pathlib.Path = typer.Option(..., "--trace", help="CSV(.gz): timestamp,region,prompt_tokens,output_tokens"),
    capacity_json: pathlib.Path = typer.Option(
        None, "--capacity-json", help="a capacity profile (bench/capacity_profile.py) to plan every model on"),
    plot_path: pathlib.Path = typer.Option(pathlib.Path("simulation.png"), "--plot", help="PNG to write"),
    json_path: pathlib.Path = typer.Option(None, "--json", help="also write the results as JSON"),
) -> None:
    """Replay a trace through the live planner; GPU-hours, SLO attainment and scale events against the oracle
    and static peak provisioning."""
    import json

    from baton.controlplane.capacity import ProfileError, read_profile
    from baton.controlplane.policy import PolicyError, load_policy, with_profile
    from baton.controlplane.simulator import plot, report
    from baton.controlplane.simulator import simulate as run
    from baton.controlplane.trace import TraceError, load_trace

    try:
        pol = load_policy(policy)
        if capacity_json is not None:
            pol = with_profile(pol, read_profile(capacity_json), str(capacity_json))
        requests = load_trace(trace, pol)
    except PolicyError as exc:  # bad input, like a bad option: exit 2
        typer.echo("\n".join(exc.errors), err=True)
        raise typer.Exit(2) from None
    except (TraceError, ProfileError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    result = run(pol, requests)
    typer.echo(report(result))
    plot(result, pol, plot_path)
    typer.echo(f"plot: {plot_path}")
    if json_path is not None:
        json_path.write_text(json.dumps(result.to_dict(), indent=1) + "\n")


def register(app: typer.Typer) -> None:
    app.command("controlplane")(settings_command(
        ControlPlaneSettings, run, "Run the global control plane: signals -> policy -> replicas, with its admin API."))
    app.add_typer(policy_app, name="policy")
