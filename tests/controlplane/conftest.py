"""Shared for control-plane tests: a command that behaves like a worker process but needs no model."""
from __future__ import annotations

import sys

# Writes its argv to <dir>/<worker_id>.argv, then sleeps until terminated: a real process to start and stop.
SLEEPER = [sys.executable, "-c",
           "import sys, pathlib, time; a = sys.argv[1:]; "
           "pathlib.Path(a[0], a[a.index('--worker-id') + 1] + '.argv').write_text(' '.join(a)); time.sleep(600)",
           "{out_dir}", "--pool", "{pool}", "--model", "{model_dir}", "--redis-url", "{redis_url}",
           "--region", "{region}", "--worker-id", "{worker_id}", "--grpc-port", "{grpc_port}",
           "--http-port", "{http_port}"]


def sleeper(out_dir) -> list[str]:
    return [part.replace("{out_dir}", str(out_dir)) for part in SLEEPER]
