"""What an embed worker tells the control plane: each request with its inputs and prompt tokens as it arrives, its
queue time once its first input is in a forward, and the requests it holds as the queue depth."""
from __future__ import annotations

import asyncio

from baton.contracts.signals import SignalPublisher
from baton.devtools.make_model import make_model
from baton.worker.embedding_runtime import EmbeddingRuntime
from baton.worker.settings import WorkerSettings


def test_embed_worker_counts_inputs_on_arrival_and_samples_queue_time(tmp_path):
    model_dir = make_model(tmp_path / "tiny", arch="qwen3", layers=1, hidden=32, heads=2, kv_heads=1, vocab=300,
                           max_position=256, seed=3)
    settings = WorkerSettings(pool="embed", model=str(model_dir), device="cpu",
                              max_batch_delay_ms=50)
    runtime = EmbeddingRuntime(settings)

    async def scenario():
        runtime.start()
        publisher = SignalPublisher(None, "local", "embed", "tiny", "embed-0", _last=0.0)
        runtime.fill_signals(publisher)
        big = asyncio.ensure_future(runtime.embed([[5, 6, 7]] * 30))
        small = asyncio.ensure_future(runtime.embed([[8, 9]]))
        await asyncio.sleep(0)
        # Both are counted as they arrive, before any forward has run.
        arrived = publisher.take(now=1.0)
        runtime.fill_signals(publisher)
        waiting = publisher.take(now=1.5).queue_depth
        await asyncio.gather(big, small)
        runtime.fill_signals(publisher)
        done = publisher.take(now=2.0)
        await runtime.stop()
        return arrived, waiting, done

    arrived, waiting, done = asyncio.run(scenario())
    assert (arrived.requests, arrived.inputs, arrived.prompt_tokens) == (2, 31, 92)
    assert arrived.queue_s == ()  # nothing has reached a forward yet
    assert waiting == 2  # requests, not inputs
    assert done.requests == 0 and len(done.queue_s) == 2 and all(0 <= s < 5 for s in done.queue_s)
    assert done.queue_depth == 0
