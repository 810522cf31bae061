"""Registers `baton prefill-worker`."""
from baton.worker.cli import worker_command


def register(app) -> None:
    app.command("prefill-worker")(worker_command("prefill", "baton.prefill_worker.service"))
