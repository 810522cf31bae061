"""`baton up` on one GPU: router + 1 prefill + 1 decode worker, each taking its share of the device with
--gpu-memory-utilization, KV handed over by CUDA IPC; the OpenAI API answers token for token what one engine
computes on the same weights at fp32. Runs where there is a CUDA device and a redis-server (skipped elsewhere)."""
from __future__ import annotations

import shutil

import httpx
import pytest
import torch

from baton.devtools.local_cluster import LocalCluster, UpOptions
from tests.conftest import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

LONG = "The quick brown fox jumps over the lazy dog while the router picks a prefill worker. " * 4


@pytest.fixture(scope="module")
def gpu_cluster(e2e_model_dir, tmp_path_factory):
    opts = UpOptions(model=e2e_model_dir, port=free_port(), grpc_port=free_port(), controlplane_port=free_port(),
                     run_dir=tmp_path_factory.mktemp("gpu-up"), prefill=1, decode=1, kv_transport="ipc",
                     local_prefill_threshold=24,
                     worker_settings={"device": "cuda", "dtype": "float32", "gpu_memory_utilization": 0.3})
    cluster = LocalCluster(opts)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def worker_metrics(cluster) -> dict[str, str]:
    import redis

    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    out = {}
    for key in client.scan_iter(match="baton:worker:*"):
        rec = client.hgetall(key)
        out[rec["pool"]] = httpx.get(f"http://{rec['http_address']}/metrics", timeout=5).text
    return out


def sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_serves_on_the_gpu_token_exact_over_cuda_ipc(gpu_cluster, e2e_model_dir):
    from baton.engine.config import EngineConfig
    from baton.engine.llm_engine import LLMEngine
    from baton.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(str(e2e_model_dir), device="cuda", dtype="float32", num_kv_blocks=256,
                                    show_progress=False))
    prompts = ["Hi", LONG, "Request 7: " + LONG[:150]]  # short: local prefill; long: prefill worker + CUDA IPC
    with httpx.Client(base_url=gpu_cluster.url, timeout=60) as http:
        for prompt in prompts:
            body = http.post("/v1/completions", json={"model": gpu_cluster.model_name, "prompt": prompt,
                                                      "max_tokens": 24, "temperature": 0, "ignore_eos": True}).json()
            ids = engine.tokenizer.encode(prompt)
            ref = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
            assert body["choices"][0]["text"] == engine.tokenizer.decode(ref.output_ids), prompt
            assert body["usage"] == {**body["usage"], "prompt_tokens": len(ids), "completion_tokens": 24}
    metrics = worker_metrics(gpu_cluster)
    assert sample(metrics["prefill"], 'baton_kv_transfer_bytes_total{transport="ipc"}') > 0
    assert sample(metrics["prefill"], "baton_kv_ipc_peer_mappings_total") == 1  # the decode pool, mapped once
    stats = httpx.get(f"{gpu_cluster.url}/ready", timeout=5)
    assert stats.status_code == 200
