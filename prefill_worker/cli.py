"""Registers `baton prefill-worker`."""
from engine.worker_cli import worker_command


def register(app) -> None:
    app.command("prefill-worker")(worker_command("prefill", "prefill_worker.service", 50061, 8081))
