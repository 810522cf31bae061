"""Real prefill and decode worker processes: KV blocks move over each transport and decode equals one engine."""
from __future__ import annotations

import asyncio
import importlib.util
import json

import grpc
import httpx
import jsonschema
import pytest

from baton.devtools.make_model import make_model
from baton.engine.config import EngineConfig
from baton.engine.llm_engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.engine.tokenizer import Tokenizer
from baton.proto.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from baton.worker.metrics import DECODE_STAGES, PREFILL_STAGES
from tests.cluster import start_worker

PROMPTS = [[5, 9, 13, 200, 7] * 9, list(range(20, 90)), [300, 301]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_model(tmp_path_factory.mktemp("pd") / "model", arch="llama", vocab=512, seed=11))


def reference(model_dir, prompt, max_tokens=12, kv_cache_dtype="auto"):
    engine = LLMEngine(EngineConfig(model_dir, num_kv_blocks=128, show_progress=False, kv_cache_dtype=kv_cache_dtype))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt], params)[0].output_ids


async def decode(address, rid, prompt, prefill=None, max_tokens=12, sampling=None, generated=()):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        req = worker_pb2.DecodeRequest(
            request_id=rid, token_ids=prompt, generated_token_ids=generated,
            sampling=sampling or inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        if prefill is not None:
            req.prefill.CopyFrom(worker_pb2.PrefillTarget(worker_id=prefill.worker_id,
                                                          grpc_address=prefill.grpc_address))
        chunks = [c async for c in stub.Generate(req)]
        stats = await stub.Stats(worker_pb2.StatsRequest())
    return chunks, stats


def by_stage(worker, name: str) -> dict[str, float]:
    """A per-stage histogram's samples on a worker's /metrics, by stage."""
    return {labels.split('stage="')[1].split('"')[0]: value for labels, value in metric(worker, name).items()}


def metric(worker, name: str) -> dict[str, float]:
    """Samples of one metric on a worker's /metrics, by label set."""
    text = httpx.get(f"http://127.0.0.1:{worker.http_port}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            labels, value = line[len(name):].rsplit(" ", 1)
            out[labels.strip("{}")] = float(value)
    return out


async def prefill_stats(address):
    async with grpc.aio.insecure_channel(address) as channel:
        return await worker_pb2_grpc.PrefillWorkerStub(channel).Stats(worker_pb2.StatsRequest())


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "ipc", "ipc-layerwise", "nixl", "tcp-fp8"])
def test_remote_prefill_equals_single_engine(model_dir, redis_url, transport):
    # find_spec, not import: loading UCX into this long-lived test process is what the workers must do, not us.
    if transport == "nixl" and importlib.util.find_spec("nixl") is None:
        pytest.skip("nixl is not installed")
    transport, fp8 = transport.removesuffix("-fp8"), transport.endswith("-fp8")
    transport, layerwise = transport.removesuffix("-layerwise"), transport.endswith("-layerwise")
    kv_cache_dtype = "fp8" if fp8 else "auto"  # both workers and the single engine: FP8 blocks go as they are
    p = start_worker("prefill", model_dir, redis_url, f"p-{transport}-{layerwise}-{fp8}", "--kv-transport", transport,
                     "--kv-cache-dtype", kv_cache_dtype, *(["--kv-layerwise"] if layerwise else []))
    d = start_worker("decode", model_dir, redis_url, f"d-{transport}-{fp8}", "--kv-transport", transport,
                     "--kv-cache-dtype", kv_cache_dtype)
    # The model is float32: an FP8 block is a quarter of its bytes.
    block_nbytes = 2 * 2 * 16 * 2 * 16 * (1 if fp8 else 4)  # layers, K|V, block size, KV heads, head dim
    try:
        for i, prompt in enumerate(PROMPTS):
            chunks, stats = asyncio.run(decode(d.grpc_address, f"r{i}", prompt, prefill=p))
            assert not any(c.HasField("error") for c in chunks), chunks[-1]
            tokens = [t for c in chunks for t in c.token_ids]
            assert tokens == reference(model_dir, prompt, kv_cache_dtype=kv_cache_dtype), f"prompt {i}"
            assert chunks[0].prefill.kv_bytes == -(-len(prompt) // 16) * block_nbytes
            assert chunks[-1].usage.completion_tokens == 12
            assert chunks[-1].usage.prompt_tokens == len(prompt)
        assert stats.kv_blocks_used == 0 and stats.num_requests_running == 0
        pstats = asyncio.run(prefill_stats(p.grpc_address))
        assert pstats.kv_blocks_used == 0
        assert pstats.prompt_tokens_computed_total >= sum(map(len, PROMPTS)) - 16
        sent = metric(p, "baton_kv_transfer_bytes_total")
        assert sent.get(f'transport="{transport}"', 0) > 0 and len(sent) == 1  # the configured transport, only
        # Every hand-off is timed stage by stage on both sides; the decode worker's stages follow one another from
        # the request's arrival to its first token, so they add up to its time to first token.
        stage = "baton_worker_remote_prefill_stage_seconds"
        assert by_stage(d, f"{stage}_count") == dict.fromkeys(DECODE_STAGES, len(PROMPTS))
        assert by_stage(p, f"{stage}_count") == dict.fromkeys(PREFILL_STAGES, len(PROMPTS))
        ttft = metric(d, "baton_worker_time_to_first_token_seconds_sum")
        assert sum(by_stage(d, f"{stage}_sum").values()) == pytest.approx(sum(ttft.values()), rel=1e-6)
        assert by_stage(d, f"{stage}_sum")["prefill_call"] > sum(by_stage(p, f"{stage}_sum").values()) > 0
        if transport == "ipc":
            assert metric(p, "baton_kv_ipc_peer_mappings_total")[""] == 1  # the decode pool is mapped once
            # every hand-off (one per prompt) copied layer by layer with --kv-layerwise, none without
            assert metric(p, "baton_kv_layerwise_handoffs_total").get("", 0) == (len(PROMPTS) if layerwise else 0)
    finally:
        p.stop()
        d.stop()


@pytest.mark.slow
@pytest.mark.parametrize("decode_args,expected", [
    ((), "dtype float8_e4m3fn != float32"),
    (("--kv-cache-dtype", "fp8"), "FP8 KV scales differ"),  # calculated scales vs the default 1.0
])
def test_kv_cache_dtype_or_scales_mismatch_is_refused_and_frees_the_blocks(model_dir, redis_url, decode_args,
                                                                             expected):
    """An FP8 prefill worker never hands its blocks to a float32 decode worker, nor to an FP8 one whose per-layer
    scales differ (they would read back scaled wrong): the request fails naming why, and neither worker keeps a
    block."""
    tag = "scales" if decode_args else "dtype"
    p = start_worker("prefill", model_dir, redis_url, f"p-fp8-{tag}", "--kv-transport", "tcp", "--kv-cache-dtype",
                     "fp8", "--calculate-kv-scales")
    d = start_worker("decode", model_dir, redis_url, f"d-mix-{tag}", "--kv-transport", "tcp", *decode_args)
    try:
        chunks, stats = asyncio.run(decode(d.grpc_address, "mix", PROMPTS[1], prefill=p))
        err = chunks[-1].error
        assert err.kind == worker_pb2.DecodeError.KIND_PREFILL_FAILED, chunks[-1]
        assert expected in err.message, err.message
        assert not any(c.token_ids for c in chunks)
        assert stats.kv_blocks_used == 0 and stats.num_requests_running == 0
        assert asyncio.run(prefill_stats(p.grpc_address)).kv_blocks_used == 0
    finally:
        p.stop()
        d.stop()


@pytest.mark.slow
def test_local_prefill_and_dead_prefill_worker(model_dir, redis_url):
    d = start_worker("decode", model_dir, redis_url, "d-local")
    try:
        chunks, _ = asyncio.run(decode(d.grpc_address, "loc", PROMPTS[1]))
        assert [t for c in chunks for t in c.token_ids] == reference(model_dir, PROMPTS[1])
        assert sum(metric(d, "baton_worker_time_to_first_token_seconds_count").values()) == 1

        class Gone:
            worker_id, grpc_address = "p-gone", "127.0.0.1:1"

        chunks, stats = asyncio.run(decode(d.grpc_address, "dead", PROMPTS[0], prefill=Gone))
        err = chunks[-1].error
        assert err.kind == worker_pb2.DecodeError.KIND_PREFILL_FAILED and err.retryable
        assert err.prefill_worker_id == "p-gone"
        assert stats.kv_blocks_used == 0  # the reserved destination blocks were freed
        # Reserved, then never connected: no first token, and only the stage that completed is timed.
        assert by_stage(d, "baton_worker_remote_prefill_stage_seconds_count") == {"reserve": 1}
        assert sum(metric(d, "baton_worker_time_to_first_token_seconds_count").values()) == 1
    finally:
        d.stop()


@pytest.mark.slow
def test_resumed_request_goes_on_from_the_tokens_already_generated(model_dir, redis_url):
    d = start_worker("decode", model_dir, redis_url, "d-resume")
    try:
        expected = reference(model_dir, PROMPTS[1])
        chunks, stats = asyncio.run(decode(d.grpc_address, "moved", PROMPTS[1], generated=expected[:5]))
        assert [t for c in chunks for t in c.token_ids] == expected[5:]
        assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(PROMPTS[1])

        class Somewhere:
            worker_id, grpc_address = "p0", "127.0.0.1:1"

        chunks, stats = asyncio.run(decode(d.grpc_address, "both", PROMPTS[1], prefill=Somewhere,
                                           generated=expected[:5]))
        assert chunks[-1].error.kind == worker_pb2.DecodeError.KIND_INVALID_REQUEST
        assert stats.kv_blocks_used == 0 and stats.num_requests_running == 0
    finally:
        d.stop()


@pytest.mark.slow
def test_remote_prefill_keeps_the_json_schema(model_dir, redis_url):
    """The prefill worker masks the first token it samples and the decode worker's matcher continues from it."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    structured = inference_pb2.StructuredOutput(kind="json_schema", json_schema=json.dumps(schema))
    tok = Tokenizer.from_dir(model_dir)
    p = start_worker("prefill", model_dir, redis_url, "p-json", "--kv-transport", "tcp")
    d = start_worker("decode", model_dir, redis_url, "d-json", "--kv-transport", "tcp")
    try:
        for seed in range(3):
            sampling = inference_pb2.SamplingParams(max_tokens=100, temperature=1.0, seed=seed,
                                                    structured_output=structured)
            chunks, _ = asyncio.run(decode(d.grpc_address, f"j{seed}", PROMPTS[1], prefill=p, sampling=sampling))
            assert not any(c.HasField("error") for c in chunks), chunks[-1]
            assert chunks[0].prefill.kv_bytes > 0  # the first token came from the prefill worker
            assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_STOP
            jsonschema.validate(json.loads(tok.decode([t for c in chunks for t in c.token_ids])), schema)
    finally:
        d.stop()
        p.stop()
