"""Registers `baton embed-worker`."""
from baton.worker.cli import worker_command


def register(app) -> None:
    app.command("embed-worker")(worker_command("embed", "baton.embed_worker.service"))
