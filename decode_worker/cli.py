"""Registers `baton decode-worker`."""
from engine.worker_cli import worker_command


def register(app) -> None:
    app.command("decode-worker")(worker_command("decode", "decode_worker.service", 50062, 8082))
