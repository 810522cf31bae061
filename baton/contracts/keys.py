"""Every Redis key and stream name Baton processes share: written by one process, read by another."""
from __future__ import annotations

WORKER_KEY_PREFIX = "baton:worker:"  # + worker id: a hash holding the worker record, kept alive by heartbeats
KV_EVENTS_STREAM = "baton:kv_events"  # workers' block stored/removed events, read by every router
KV_SNAPSHOT_REQUESTS_KEY = "baton:kv_snapshot_requests"  # routers ask workers to republish their blocks
SIGNALS_STREAM_MAXLEN = 10_000


def worker_key(worker_id: str) -> str:
    return WORKER_KEY_PREFIX + worker_id


def signals_stream_key(region: str, pool: str) -> str:
    """Traffic signals of one pool in one region: routers' rates and latencies, workers' gauges."""
    return f"baton:signals:{region}:{pool}"


def spillover_key(model: str) -> str:
    """A hash region -> spillover share JSON, written by the control plane, followed by routers."""
    return f"baton:spillover:{model}"
