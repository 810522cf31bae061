"""The dynamic batcher in front of a real embedding model: same vectors as one by one, budgets kept, small requests
never starve behind a large one, batching off means one request per forward, cancelled inputs are dropped."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from baton.devtools.make_model import make_model
from baton.engine.config import EngineConfig
from baton.engine.embedding import Embedder
from baton.worker.embedding_batcher import EmbeddingBatcher


@pytest.fixture(scope="module")
def embedder(tmp_path_factory) -> Embedder:
    model_dir = make_model(tmp_path_factory.mktemp("emb") / "tiny", arch="qwen3", layers=1, hidden=32, heads=2,
                           kv_heads=1, vocab=300, max_position=256, seed=3)
    return Embedder(EngineConfig(model_dir=str(model_dir), device="cpu", show_progress=False))


def _inputs(n: int, seed: int, longest: int = 24) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randint(1, longest))] for _ in range(n)]


class Recorder:
    """Wraps the model's embed to log every forward's inputs."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self.forwards: list[list[list[int]]] = []

    def __call__(self, inputs):
        self.forwards.append(inputs)
        return self.embedder.embed(inputs).numpy()


def _batcher(fn, **kw) -> EmbeddingBatcher:
    opts = dict(max_batch_tokens=256, max_batch_inputs=32, max_batch_delay_s=0.02, dynamic=True)
    return EmbeddingBatcher(fn, **{**opts, **kw})


def test_batched_vectors_equal_one_by_one_and_budgets_hold(embedder):
    requests = [_inputs(n, seed) for seed, n in enumerate([1, 3, 1, 120, 2, 1, 40, 1])]
    recorder = Recorder(embedder)

    async def main():
        batcher = _batcher(recorder)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.embed(r) for r in requests))
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    for inputs, (vectors, queued) in zip(requests, results):
        assert queued >= 0
        want = np.stack([embedder.embed([ids]).numpy()[0] for ids in inputs])
        np.testing.assert_allclose(vectors, want, rtol=1e-5, atol=1e-5)
    assert len(recorder.forwards) < sum(map(len, requests)) / 4  # packed, not one by one
    for forward in recorder.forwards:
        assert len(forward) <= 32
        assert sum(map(len, forward)) <= 256 or len(forward) == 1


def test_small_request_does_not_wait_for_a_large_one(embedder):
    big, small = _inputs(600, 1), _inputs(1, 2)
    recorder = Recorder(embedder)

    async def main(dynamic: bool):
        batcher = _batcher(recorder, dynamic=dynamic)
        batcher.start()
        done: list[str] = []

        async def run(name, inputs, delay):
            await asyncio.sleep(delay)
            await batcher.embed(inputs)
            done.append(name)

        try:
            await asyncio.gather(run("big", big, 0), run("small", small, 0.05))
        finally:
            await batcher.stop()
        return done

    recorder.forwards.clear()
    assert asyncio.run(main(dynamic=True)) == ["small", "big"]
    forwards_on = len(recorder.forwards)
    # Batching off: one request per forward, in arrival order, so the small one waits for all of the big one.
    recorder.forwards.clear()
    assert asyncio.run(main(dynamic=False)) == ["big", "small"]
    assert recorder.forwards[-1] == small
    assert all(small[0] not in f for f in recorder.forwards[:-1])
    assert forwards_on <= len(recorder.forwards)


def test_requests_within_the_delay_share_a_forward(embedder):
    recorder = Recorder(embedder)

    async def main():
        batcher = _batcher(recorder, max_batch_delay_s=0.2)
        batcher.start()

        async def late(inputs):
            await asyncio.sleep(0.02)
            return await batcher.embed(inputs)

        try:
            await asyncio.gather(batcher.embed(_inputs(1, 5)), late(_inputs(1, 6)))
        finally:
            await batcher.stop()

    asyncio.run(main())
    assert [len(f) for f in recorder.forwards] == [2]


def test_cancelled_request_leaves_the_queue(embedder):
    recorder = Recorder(embedder)

    async def main():
        batcher = _batcher(recorder, max_batch_inputs=4, max_batch_delay_s=0)
        batcher.start()
        try:
            task = asyncio.create_task(batcher.embed(_inputs(400, 7)))
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            left = batcher.stats()
            await batcher.embed(_inputs(1, 8))  # the worker still serves
            return left
        finally:
            await batcher.stop()

    left = asyncio.run(main())
    assert (left.waiting_requests, left.waiting_inputs) == (0, 0)
    assert sum(map(len, recorder.forwards)) < 400
