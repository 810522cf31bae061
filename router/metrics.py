"""Router Prometheus metrics (names from docs/architecture.md), on a registry owned by one router."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 1 ms to 2 min: CPU decode steps are slow, GPU ones fast.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class RouterMetrics:
    """One instance per router; gauges read the prefix index / event consumer at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("baton_router_requests", "Finished requests by route and status",
                                ["route", "status"], registry=r)
        self.ttft = Histogram("baton_router_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("baton_router_inter_token_latency_seconds", "Time between streamed tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("baton_router_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.decisions = Counter("baton_router_decisions", "Worker-selection decisions",
                                 ["policy", "pool"], registry=r)
        self.decision_latency = Histogram("baton_router_decision_latency_seconds",
                                          "Time per selection step (filter/scorer/index/picker, and the whole decision)",
                                          ["step"], buckets=(1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2),
                                          registry=r)
        self.predicted_hit_ratio = Histogram("baton_router_predicted_prefix_hit_ratio",
                                             "Share of the prompt the chosen decode worker is expected to hold",
                                             buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.prefix_index_blocks = Gauge("baton_router_prefix_index_blocks", "(block, worker) pairs in the index",
                                         registry=r)
        self.kv_events_lag = Gauge("baton_router_kv_events_lag_seconds", "Age of the last KV event applied",
                                   registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
