"""Router Prometheus metrics on a registry owned by one router. Request latencies and outcomes carry `model_name`,
and their names after `baton_router_` are vLLM's (docs/metrics.md has the mapping)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# From 1 ms to 1 hour: GPU steps are fast, CPU ones slow, and long generations run for many minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                   160.0, 320.0, 640.0, 1280.0, 2560.0, 3600.0)


class RouterMetrics:
    """One instance per router; gauges read the prefix index / event consumer at scrape time."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_name = model_name
        self._requests = Counter("baton_router_requests", "Finished requests by route and HTTP (or gRPC-mapped) status",
                                 ["model_name", "route", "status"], registry=r)
        self._success = Counter("baton_router_request_success", "Requests that finished, by finish reason",
                                ["model_name", "finished_reason"], registry=r)

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(model_name)

        self.ttft = latency("baton_router_time_to_first_token_seconds", "Time to first token")
        self.itl = latency("baton_router_inter_token_latency_seconds", "Time between streamed tokens")
        self.e2e = latency("baton_router_e2e_request_latency_seconds", "Request latency, arrival to last token")
        self.decisions = Counter("baton_router_decisions", "Worker-selection decisions",
                                 ["policy", "pool"], registry=r)
        self.decision_latency = Histogram("baton_router_decision_latency_seconds",
                                          "Time per selection step (filter/scorer/index/picker, and the whole decision)",
                                          ["step"], buckets=(1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2),
                                          registry=r)
        self.migrations = Counter("baton_router_migrations", "Requests resumed on another decode worker after "
                                  "theirs failed mid-stream", ["model_name"], registry=r).labels(model_name)
        self.predicted_hit_ratio = Histogram("baton_router_predicted_prefix_hit_ratio",
                                             "Share of the prompt the chosen decode worker is expected to hold",
                                             buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.prefix_index_blocks = Gauge("baton_router_prefix_index_blocks", "(block, worker) pairs in the index",
                                         registry=r)
        self.kv_events_lag = Gauge("baton_router_kv_events_lag_seconds", "Age of the last KV event applied",
                                   registry=r)

    def request_done(self, route: str, status: str | int) -> None:
        self._requests.labels(self.model_name, route, str(status)).inc()

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
