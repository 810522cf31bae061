"""Prometheus view of a worker's engine, read at scrape time (names follow docs/architecture.md)."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class EngineCollector:
    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def collect(self):
        s = self.runtime.engine.stats()
        labels = ["worker_id", "pool"]
        values = [self.runtime.settings.worker_id, self.runtime.settings.pool]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        yield gauge("baton_worker_num_requests_running", "Requests decoding or prefilling now.",
                    s.running + s.prefilled + s.pending_remote)
        yield gauge("baton_worker_num_requests_waiting", "Requests queued for KV blocks or batch room.", s.waiting)
        yield gauge("baton_worker_kv_cache_usage_ratio", "Fraction of KV blocks referenced by live requests.",
                    s.blocks.usage)
        yield gauge("baton_worker_kv_blocks_cached", "Unreferenced KV blocks still holding a reusable prefix.",
                    s.blocks.cached)
        total_prompt = s.prefill_tokens_computed + s.prefill_tokens_cached
        yield gauge("baton_worker_prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache / all.",
                    s.prefill_tokens_cached / total_prompt if total_prompt else 0.0)
        yield counter("baton_worker_prompt_tokens", "Prompt tokens computed by this worker.",
                      s.prefill_tokens_computed)
        yield counter("baton_worker_prompt_tokens_cached", "Prompt tokens served from the prefix cache.",
                      s.prefill_tokens_cached)
        yield counter("baton_worker_generation_tokens", "Tokens sampled by this worker.", s.generated_tokens)
        yield counter("baton_worker_preemptions", "Requests preempted for KV blocks.", s.preemptions)
