"""The `baton` command: one entry point; each package registers its own sub-commands."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="baton",
    help="Baton: disaggregated prefill/decode LLM serving with KV-aware routing and autoscaling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Packages whose `cli.register(app)` adds commands. Each keeps heavy imports (torch, grpc)
# inside its command functions so `baton --help` stays fast.
_COMMAND_MODULES = (
    "baton.engine_cli",
    "baton.router.cli",
    "baton.prefill_worker.cli",
    "baton.decode_worker.cli",
    "baton.embed_worker.cli",
    "baton.controlplane.cli",
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"baton {version('baton')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Baton command line."""


for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
