"""POST /v1/embeddings through `baton up` with an embedding pool (Redis, router, control plane, a real embed worker
process): the openai client unmodified, vectors equal to the engine's, dimensions, usage, and clear 400s for hostile
inputs that leave nothing queued on the worker."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from baton.devtools.local_cluster import WorkerProcess
from baton.engine.config import EngineConfig
from baton.engine.embedding import Embedder
from baton.engine.tokenizer import Tokenizer
from tests.e2e.conftest import start_cluster
from tests.engine.embedding_checkpoints import write_sentence_transformers_files

PREFIX = "query: "


@pytest.fixture(scope="module")
def embed_model_dir(tmp_path_factory):
    from baton.devtools.make_model import make_model

    model_dir = make_model(tmp_path_factory.mktemp("emb") / "emb-qwen3", arch="qwen3", layers=2, hidden=64, heads=4,
                           kv_heads=2, vocab=512, max_position=128, seed=8)
    write_sentence_transformers_files(model_dir, "mean", True, prompts={"query": PREFIX}, default_prompt="query")
    config = json.loads((model_dir / "config.json").read_text())
    config["matryoshka_dimensions"] = [16, 32, 64]
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture(scope="module")
def cluster(embed_model_dir, tmp_path_factory):
    cluster = start_cluster(embed_model_dir, tmp_path_factory.mktemp("up-embed"), prefill=0, decode=0, embed=2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def reference(embed_model_dir):
    embedder = Embedder(EngineConfig(model_dir=str(embed_model_dir), device="cpu", show_progress=False))
    tokenizer = Tokenizer.from_dir(embed_model_dir)

    def embed(texts_or_ids):
        ids = [tokenizer.encode(PREFIX + x) if isinstance(x, str) else x for x in texts_or_ids]
        return embedder.embed(ids).numpy(), sum(map(len, ids))

    return embed


def _worker_stats(cluster) -> dict[str, dict]:
    return {w.worker_id: httpx.get(f"http://{w.http_address}/stats", timeout=5).json()
            for w in cluster.workers() if w.pool == "embed"}


def test_openai_client_embeddings(cluster, reference):
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
    texts = ["The capital of France is Paris.", "Embeddings map text to vectors.", "x"]
    got = client.embeddings.create(model=cluster.model_name, input=texts)  # base64 on the wire (the client's pick)
    want, tokens = reference(texts)
    vectors = np.array([d.embedding for d in got.data])
    np.testing.assert_allclose(vectors, want, rtol=1e-5, atol=1e-5)
    assert [d.index for d in got.data] == [0, 1, 2]
    assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    single = client.embeddings.create(model=cluster.model_name, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, want[0], rtol=1e-5, atol=1e-5)
    ids = [[5, 6, 7, 8], [9, 10]]
    by_ids = client.embeddings.create(model=cluster.model_name, input=ids, encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in by_ids.data], reference(ids)[0], rtol=1e-5, atol=1e-5)
    one_list = client.embeddings.create(model=cluster.model_name, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(one_list.data[0].embedding, reference(ids[:1])[0][0], rtol=1e-5, atol=1e-5)


def test_matryoshka_dimensions_truncate_and_renormalise(cluster, reference):
    body = {"model": cluster.model_name, "input": ["hello world"], "dimensions": 16}
    r = httpx.post(f"{cluster.url}/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 200, r.text
    vector = np.array(r.json()["data"][0]["embedding"])
    full = reference(["hello world"])[0][0][:16]
    np.testing.assert_allclose(vector, full / np.linalg.norm(full), rtol=1e-5, atol=1e-6)
    r = httpx.post(f"{cluster.url}/v1/embeddings", json={**body, "dimensions": 20}, timeout=30)
    assert r.status_code == 400 and "one of [16, 32, 64]" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,status,needle", [
    ({"input": ""}, 400, "input[0] is an empty string"),
    ({"input": ["ok", ""]}, 400, "input[1] is an empty string"),
    ({"input": []}, 400, "'input' must not be empty"),
    ({"input": [[]]}, 400, "input[0] is an empty list of token ids"),
    ({"input": ["a"] * 100_000}, 400, "at most 2048 per request (max_embedding_inputs)"),
    ({"input": "word " * 400}, 400, "maximum input length is 128 tokens (max_model_len)"),
    ({"input": 42}, 400, "'input' must be a string, a list of strings"),
    ({"input": [1, "a"]}, 400, "input[0] must be a string or a list of token ids"),
    ({"input": [[1, 2.5]]}, 400, "input[0] must hold token ids (integers); got 2.5"),
    ({"input": [[1, 99999]]}, 400, "token id 99999 is outside the vocabulary"),
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "a", "normalize": True}, 400, "'normalize' is not supported"),
    ({"input": "a", "model": "other"}, 404, "does not exist"),
])
def test_hostile_inputs_get_clear_errors_and_leave_nothing_behind(cluster, body, status, needle):
    r = httpx.post(f"{cluster.url}/v1/embeddings", json={"model": cluster.model_name, **body}, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    for stats in _worker_stats(cluster).values():
        assert (stats["waiting_requests"], stats["waiting_inputs"]) == (0, 0)
    ok = httpx.post(f"{cluster.url}/v1/embeddings", json={"model": cluster.model_name, "input": "still fine"},
                    timeout=30)
    assert ok.status_code == 200


def test_requests_spread_over_the_pool_and_survive_a_dead_worker(cluster):
    """Runs last in the module: it kills one of the two embed workers."""
    async def burst(n: int) -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": cluster.model_name, "input": [f"sentence {i}" for i in range(64)]}
            rs = await asyncio.gather(*(client.post(f"{cluster.url}/v1/embeddings", json=body) for _ in range(n)))
        return [r.status_code for r in rs]

    before = {w: s["inputs"] for w, s in _worker_stats(cluster).items()}
    assert asyncio.run(burst(8)) == [200] * 8
    served = {w: s["inputs"] - before[w] for w, s in _worker_stats(cluster).items()}
    assert len(served) == 2 and all(n > 0 for n in served.values()), served  # least-loaded spreads them
    # The control plane started the pool; kill the worker with the lowest id.
    victim = min((w for w in cluster.workers() if w.pool == "embed"), key=lambda w: w.worker_id)
    dead = WorkerProcess(victim.pid)
    dead.kill()  # its registry record outlives it until the TTL: the router meets a refused connection
    dead.wait(timeout=10)
    assert asyncio.run(burst(6)) == [200] * 6
    # On a tie the router picks the lowest worker id: the dead one was tried, refused and skipped.
    assert f"embed worker {victim.worker_id}" in (cluster.run_dir / "router.log").read_text()
