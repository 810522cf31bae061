"""Prometheus view of a worker's engine: gauges and counters read at scrape time, request histograms fed as
requests leave the engine. Every name after `baton_worker_` is vLLM's with vLLM's meaning (docs/metrics.md)."""
from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from baton.engine.llm_engine import FinishedRequest

# vLLM's buckets for the request phase histograms, so dashboards built for it read these unchanged.
PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)
# vLLM's time_to_first_token_seconds buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
# A remote prefill's stages are hops of a millisecond or less as well as prompts of seconds.
STAGE_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0)
# Where a remotely prefilled request's first token spends its time, in order. Decode worker: its blocks reserved,
# the prefill worker's channel ready, the Prefill call (the prefill worker's stages plus the wire), the hand-off
# seen complete here, the first token out of this worker. Prefill worker: the prompt computed (engine queue
# included), its KV written into the decode worker (then it replies).
DECODE_STAGES = ("reserve", "connect", "prefill_call", "kv_wait", "first_token")
PREFILL_STAGES = ("prefill", "kv_send")


def token_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (vLLM's build_1_2_5_buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_len:
                return out
            out.append(m * scale)
        scale *= 10


class EngineCollector:
    def __init__(self, runtime) -> None:
        self.runtime = runtime
        s = runtime.settings
        self._labels = ["model_name", "worker_id", "pool"]
        self._values = [s.served_model_name, s.worker_id, s.pool]
        # Not registered anywhere: collect() yields them with the scrape-time families.
        self._families: list = []

        def histogram(name: str, doc: str, buckets) -> Histogram:
            family = Histogram(name, doc, self._labels, buckets=buckets, registry=None)
            self._families.append(family)
            return family.labels(*self._values)

        self.queue = histogram("baton_worker_request_queue_time_seconds",
                               "Time a request waited before its first step (WAITING phase).", PHASE_BUCKETS)
        self.prefill = histogram("baton_worker_request_prefill_time_seconds",
                                 "First step to first token (PREFILL phase).", PHASE_BUCKETS)
        self.decode = histogram("baton_worker_request_decode_time_seconds",
                                "First token to last token (DECODE phase).", PHASE_BUCKETS)
        self.inference = histogram("baton_worker_request_inference_time_seconds",
                                   "First step to last token (prefill + decode on this worker).", PHASE_BUCKETS)
        tokens = token_buckets(runtime.engine.max_model_len)
        self.ttft = histogram("baton_worker_time_to_first_token_seconds",
                              "Request arrival at this worker to its first token leaving it, whether the prompt was "
                              "prefilled here or by a prefill worker.", TTFT_BUCKETS)
        self._stages = Histogram("baton_worker_remote_prefill_stage_seconds",
                                 "Stages of a remotely prefilled request's path to its first token. Decode worker: "
                                 "reserve, connect, prefill_call, kv_wait, first_token; prefill worker: prefill, "
                                 "kv_send.", [*self._labels, "stage"], buckets=STAGE_BUCKETS,
                                 registry=None)
        self._families.append(self._stages)
        self.prompt_tokens = histogram("baton_worker_request_prompt_tokens", "Prompt tokens per finished request.",
                                       tokens)
        self.generation_tokens = histogram("baton_worker_request_generation_tokens",
                                           "Tokens generated per finished request.", tokens)
        self._success = Counter("baton_worker_request_success", "Requests that left the engine, by finish reason "
                                "(prefilled: handed to a decode worker)", [*self._labels, "finished_reason"],
                                registry=None)
        self._families.append(self._success)
        runtime.engine.finish_listeners.append(self.observe)

    def stage(self, name: str, seconds: float) -> None:
        """One stage of a remote prefill (DECODE_STAGES, PREFILL_STAGES) took `seconds`."""
        self._stages.labels(*self._values, name).observe(seconds)

    def observe(self, done: FinishedRequest) -> None:
        """Called on the engine thread as each request leaves it (prometheus_client is thread-safe)."""
        for child, seconds in ((self.queue, done.queue_s), (self.prefill, done.prefill_s),
                               (self.decode, done.decode_s)):
            if seconds is not None:
                child.observe(seconds)
        if done.prefill_s is not None or done.decode_s is not None:
            self.inference.observe((done.prefill_s or 0.0) + (done.decode_s or 0.0))
        self.prompt_tokens.observe(done.num_prompt_tokens)
        self.generation_tokens.observe(done.num_output_tokens)
        self._success.labels(*self._values, done.finish_reason).inc()

    def collect(self):
        s = self.runtime.engine.stats()
        labels, values = self._labels, self._values

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
        yield gauge("baton_worker_kv_cache_usage_perc", "Fraction (0-1) of KV blocks referenced by live requests.",
                    s.blocks.usage)
        yield gauge("baton_worker_kv_blocks_cached", "Unreferenced KV blocks still holding a reusable prefix.",
                    s.blocks.cached)
        yield counter("baton_worker_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("baton_worker_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits)
        yield counter("baton_worker_prompt_tokens", "Prompt tokens prefilled here, computed or from the prefix cache.",
                      s.prefill_tokens_computed + s.prefill_tokens_cached)
        yield counter("baton_worker_generation_tokens", "Tokens sampled by this worker.", s.generated_tokens)
        yield counter("baton_worker_num_preemptions", "Requests preempted for KV blocks.", s.preemptions)
        yield counter("baton_worker_spec_decode_num_drafts", "Speculative steps: verifications of proposed tokens.",
                      s.spec.num_drafts)
        yield counter("baton_worker_spec_decode_num_draft_tokens", "Tokens proposed for verification.",
                      s.spec.num_draft_tokens)
        yield counter("baton_worker_spec_decode_num_accepted_tokens", "Proposed tokens the model accepted.",
                      s.spec.num_accepted_tokens)
        for family in self._families:
            yield from family.collect()
