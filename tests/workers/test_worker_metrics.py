"""A worker's /metrics: vLLM's names (after `baton_worker_`) with `model_name`, prefix-cache counters, and the
queue / prefill / decode histograms fed by a real engine."""
from __future__ import annotations

import types

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from baton.engine.config import EngineConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.worker.metrics import DECODE_STAGES, EngineCollector, token_buckets
from tests.engine.checkpoints import make_hf_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_hf_checkpoint(tmp_path_factory.mktemp("wm") / "llama", "llama", seed=1, max_position=512)
    return LLMEngine(EngineConfig(str(model_dir), num_kv_blocks=64, show_progress=False))


def scrape(engine) -> dict[tuple[str, tuple], float]:
    settings = types.SimpleNamespace(served_model_name="m1", worker_id="w1", pool="decode")
    registry = CollectorRegistry()
    collector = EngineCollector(types.SimpleNamespace(engine=engine, settings=settings))
    registry.register(collector)
    prompt = list(range(3, 43))  # 40 tokens: 2 whole blocks of 16
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], params)
    engine.generate([prompt], params)
    engine.add_request("gone", prompt, params)
    engine.abort("gone")
    engine.finish_listeners.remove(collector.observe)
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_names_labels_and_values(engine):
    samples = scrape(engine)
    base = (("model_name", "m1"), ("pool", "decode"), ("worker_id", "w1"))

    def value(name, **extra):
        return samples[(name, tuple(sorted(base + tuple(extra.items()))))]

    assert value("baton_worker_num_requests_running") == 0 and value("baton_worker_num_requests_waiting") == 0
    assert value("baton_worker_kv_cache_usage_perc") == 0.0
    assert value("baton_worker_prefix_cache_queries_total") == 80  # the aborted request never got blocks
    assert value("baton_worker_prefix_cache_hits_total") == 32  # the second request's 2 whole blocks
    assert value("baton_worker_generation_tokens_total") == 10
    assert value("baton_worker_prompt_tokens_total") == 80
    assert value("baton_worker_num_preemptions_total") == 0
    assert value("baton_worker_request_success_total", finished_reason="length") == 2
    assert value("baton_worker_request_success_total", finished_reason="abort") == 1
    for phase in ("queue", "prefill", "decode", "inference"):
        assert value(f"baton_worker_request_{phase}_time_seconds_count") == 2, phase  # not the aborted one
    assert value("baton_worker_request_decode_time_seconds_sum") > 0
    assert value("baton_worker_request_prompt_tokens_sum") == 120
    assert value("baton_worker_request_generation_tokens_bucket", le="5.0") == 3
    assert not any("hit_ratio" in name for name, _ in samples), "a lifetime ratio gauge cannot be windowed"


def test_token_buckets():
    assert token_buckets(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


def test_remote_prefill_stages_and_ttft(engine):
    """Each stage is its own series of one histogram, in buckets fine enough for sub-millisecond hops."""
    settings = types.SimpleNamespace(served_model_name="m1", worker_id="w1", pool="decode")
    registry = CollectorRegistry()
    collector = EngineCollector(types.SimpleNamespace(engine=engine, settings=settings))
    engine.finish_listeners.remove(collector.observe)
    registry.register(collector)
    for stage, seconds in zip(DECODE_STAGES, (0.0003, 0.0001, 0.04, 0.0004, 0.0015)):
        collector.stage(stage, seconds)
    collector.stage("reserve", 0.003)
    collector.ttft.observe(0.0423)
    samples = {(s.name, s.labels.get("stage"), s.labels.get("le")): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for s in family.samples}
    name = "baton_worker_remote_prefill_stage_seconds"
    assert samples[(f"{name}_count", "reserve", None)] == 2
    assert samples[(f"{name}_bucket", "reserve", "0.0005")] == 1  # 0.3 ms, not 3 ms
    assert samples[(f"{name}_bucket", "connect", "0.0002")] == 1
    assert samples[(f"{name}_sum", "prefill_call", None)] == pytest.approx(0.04)
    assert {stage for (n, stage, _) in samples if n == f"{name}_count"} == set(DECODE_STAGES)
    assert samples[("baton_worker_time_to_first_token_seconds_count", None, None)] == 1
    assert samples[("baton_worker_time_to_first_token_seconds_bucket", None, "0.06")] == 1
    assert samples[("baton_worker_time_to_first_token_seconds_bucket", None, "0.04")] == 0
