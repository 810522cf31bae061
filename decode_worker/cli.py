"""Registers `baton decode-worker`."""
from baton.worker.cli import worker_command


def register(app) -> None:
    app.command("decode-worker")(worker_command("decode", "baton.decode_worker.service"))
