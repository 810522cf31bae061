"""KV events end to end with a real redis-server: KVEventPublisher -> `baton:kv_events` -> KVEventConsumer
-> PrefixIndex, including worker leave, router restart, stream gaps and Redis restart."""
from __future__ import annotations

import asyncio
import random
import time

import pytest
import redis

from baton.contracts.block_hash import hash_blocks
from baton.contracts.keys import KV_EVENTS_STREAM
from baton.contracts.kv_events import KVEvent, KVEventPublisher, coalesce, decode_hashes, encode_hashes
from baton.router.kv_event_consumer import KVEventConsumer
from baton.router.prefix_index import PrefixIndex

FAST = dict(flush_interval_s=0.002, poll_interval_s=0.02)


def chain(seed: int, n_blocks: int, block_size: int = 4) -> list[int]:
    rng = random.Random(seed)
    return hash_blocks([rng.randrange(32000) for _ in range(n_blocks * block_size)], block_size)


class Worker:
    """The block-manager side of a worker: its cached hashes and the publisher it reports to."""

    def __init__(self, redis_url: str, worker_id: str, **kw) -> None:
        self.held: set[int] = set()
        self.publisher = KVEventPublisher(redis_url, worker_id, snapshot_source=lambda: list(self.held), **{**FAST, **kw})

    def store(self, hashes: list[int]) -> None:
        self.held.update(hashes)
        self.publisher.stored(hashes)

    def evict(self, hashes: list[int]) -> None:
        self.held.difference_update(hashes)
        self.publisher.removed(hashes)


async def poll_until(consumer: KVEventConsumer, condition, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s; index workers={consumer.index.workers()}")
        await consumer.poll(block_ms=10)


def matches_state(index: PrefixIndex, workers: dict[str, Worker]) -> bool:
    return all(index.hashes_of(w) == worker.held for w, worker in workers.items())


def test_wire_format_roundtrip_and_coalescing():
    hashes = [0, 1, 2**64 - 1, 12345678901234567890]
    assert encode_hashes(hashes) == b"".join(h.to_bytes(8, "little") for h in hashes)
    assert decode_hashes(encode_hashes(hashes)) == hashes
    with pytest.raises(ValueError, match="multiple of 8"):
        decode_hashes(b"abc")
    with pytest.raises(ValueError, match="malformed KV event"):
        KVEvent.from_fields({b"worker": b"a", b"kind": b"nonsense"})
    merged = coalesce([("stored", (1,), 1.0), ("stored", (2, 3), 2.0), ("removed", (1,), 3.0),
                       ("cleared", (), 4.0), ("stored", (4,), 5.0)])
    assert [(k, h) for k, h, _ in merged] == [("stored", [1, 2, 3]), ("removed", [1]), ("cleared", []), ("stored", [4])]
    assert merged[0][2] == 1.0  # an entry carries its oldest event's time, so lag includes batching


def test_events_reach_the_index(redis_url):
    async def scenario():
        a, b = Worker(redis_url, "a"), Worker(redis_url, "b")
        consumer = KVEventConsumer(redis_url, PrefixIndex())
        try:
            prompt = chain(1, 12)
            a.store(prompt[:4])
            a.store(prompt[4:12])
            b.store(prompt[:5])
            a.evict(prompt[10:])
            await poll_until(consumer, lambda: matches_state(consumer.index, {"a": a, "b": b}))
            assert consumer.index.find_matches(prompt) == {"a": 10, "b": 5}
            assert consumer.gaps == 0 and consumer.malformed == 0
            assert 0 <= consumer.lag_seconds < 2
            a.publisher.flush()
            # Initial snapshot + a few coalesced batches, not one entry per call.
            assert a.publisher.entries_published <= 4
        finally:
            a.publisher.close()
            b.publisher.close()
            await consumer.stop()

    asyncio.run(scenario())


def test_worker_leave_drops_entries_and_ignores_leftovers(redis_url):
    async def scenario():
        a = Worker(redis_url, "a")
        consumer = KVEventConsumer(redis_url, PrefixIndex())
        prompt = chain(2, 6)
        try:
            a.store(prompt)
            await poll_until(consumer, lambda: consumer.index.find_matches(prompt) == {"a": 6})
            a.store(chain(3, 2))
            a.publisher.flush()
            consumer.on_worker_removed("a")  # registry: heartbeat expired, the entry above is in flight
            await consumer.poll(block_ms=10)
            await consumer.poll(block_ms=10)
            assert consumer.index.find_matches(prompt) == {} and consumer.index.workers() == []
            consumer.on_worker_added("a")  # it was only late: its full state comes back by snapshot
            await poll_until(consumer, lambda: matches_state(consumer.index, {"a": a}))
        finally:
            a.publisher.close()
            await consumer.stop()

    asyncio.run(scenario())


def test_router_restart_replays_stream_and_fills_gaps_with_snapshots(redis_url):
    async def scenario():
        a = Worker(redis_url, "a")
        b = Worker(redis_url, "b")
        workers = {"a": a, "b": b}
        first = KVEventConsumer(redis_url, PrefixIndex())
        try:
            for i in range(6):
                a.store(chain(10 + i, 3))
                b.store(chain(20 + i, 3))
                a.publisher.flush()
                b.publisher.flush()
            a.evict(chain(10, 3))
            await poll_until(first, lambda: matches_state(first.index, workers))
            await first.stop()
            replayed = KVEventConsumer(redis_url, PrefixIndex())  # a restarted router, full stream
            await replayed.poll(block_ms=None)
            assert matches_state(replayed.index, workers) and replayed.gaps == 0
            await replayed.stop()
            # Publishers trim approximately; trim exactly here so the head of the history is surely gone.
            redis.Redis.from_url(redis_url).xtrim(KV_EVENTS_STREAM, maxlen=2, approximate=False)
            # A router started now sees only the tail of the history: it must ask for snapshots.
            second = KVEventConsumer(redis_url, PrefixIndex())
            await poll_until(second, lambda: matches_state(second.index, workers))
            assert second.gaps >= 1
            assert second.index.find_matches(chain(25, 3)) == {"b": 3}
            await second.stop()
        finally:
            a.publisher.close()
            b.publisher.close()

    asyncio.run(scenario())


def test_two_router_replicas_agree(redis_url):
    async def scenario():
        a, b = Worker(redis_url, "a"), Worker(redis_url, "b")
        replicas = [KVEventConsumer(redis_url, PrefixIndex()) for _ in range(2)]
        rng = random.Random(5)
        try:
            chains = [chain(s, 8) for s in range(5)]
            for _ in range(60):
                worker, c = rng.choice([a, b]), rng.choice(chains)
                n = rng.randrange(1, 9)
                (worker.store if rng.random() < 0.7 else worker.evict)(c[:n])
            for r in replicas:
                await poll_until(r, lambda r=r: matches_state(r.index, {"a": a, "b": b}))
            for c in chains:
                assert replicas[0].index.find_matches(c) == replicas[1].index.find_matches(c)
        finally:
            a.publisher.close()
            b.publisher.close()
            for r in replicas:
                await r.stop()

    asyncio.run(scenario())


def test_redis_restart_rebuilds_index(redis_server, redis_url):
    async def scenario():
        a, b = Worker(redis_url, "a"), Worker(redis_url, "b")
        workers = {"a": a, "b": b}
        consumer = KVEventConsumer(redis_url, PrefixIndex(), check_interval_s=0.05)
        await consumer.start()
        try:
            a.store(chain(1, 8))
            b.store(chain(2, 8))
            await wait_for(lambda: matches_state(consumer.index, workers))
            redis_server.restart()
            a.evict(chain(1, 8)[6:])  # changes while Redis was away are lost from the stream...
            b.store(chain(3, 4))
            # ...but both publishers resync by snapshot, and the router rebuilds from them.
            await wait_for(lambda: consumer.resets == 1 and matches_state(consumer.index, workers), timeout_s=8)
            assert consumer.index.find_matches(chain(1, 8)) == {"a": 6}
            assert consumer.index.find_matches(chain(3, 4)) == {"b": 4}
            a.store(chain(4, 2))  # and live events flow again afterwards
            await wait_for(lambda: consumer.index.find_matches(chain(4, 2)) == {"a": 2})
        finally:
            a.publisher.close()
            b.publisher.close()
            await consumer.stop()

    asyncio.run(scenario())


async def wait_for(condition, timeout_s: float = 4.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)


def test_publisher_survives_redis_outage_and_bad_entries(redis_server, redis_url):
    async def scenario():
        a = Worker(redis_url, "a")
        consumer = KVEventConsumer(redis_url, PrefixIndex())
        try:
            redis.Redis.from_url(redis_url).xadd(KV_EVENTS_STREAM, {"worker": "x", "kind": "bogus"})
            redis_server.stop()
            started = time.perf_counter()
            for i in range(1000):
                a.store([i])  # hot path: must neither block nor raise while Redis is down
            assert time.perf_counter() - started < 0.05
            a.publisher.flush()
            assert a.publisher.events_dropped > 0
            redis_server.start()
            a.store(chain(8, 3))
            await poll_until(consumer, lambda: matches_state(consumer.index, {"a": a}), timeout_s=5)
            assert consumer.malformed <= 1  # the bogus entry is skipped (gone too if Redis lost it)
        finally:
            a.publisher.close()
            await consumer.stop()

    asyncio.run(scenario())


def test_restarted_worker_and_failing_snapshot_source(redis_url):
    async def scenario():
        consumer = KVEventConsumer(redis_url, PrefixIndex())
        old = Worker(redis_url, "a")
        old.store(chain(1, 5))
        await poll_until(consumer, lambda: len(consumer.index.hashes_of("a")) == 5)
        old.publisher.close()
        # Same worker id, new process: its first snapshot source call fails, the next succeeds.
        calls = []

        def flaky_source():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("block manager not ready")
            return [7, 8]

        new = KVEventPublisher(redis_url, "a", snapshot_source=flaky_source, **FAST)
        try:
            await poll_until(consumer, lambda: consumer.index.hashes_of("a") == {7, 8})
            assert len(calls) >= 2 and consumer.index.find_matches(chain(1, 5)) == {}
            consumer.sync_workers([])  # the registry lists no live worker
            assert consumer.index.workers() == []
            consumer.sync_workers(["a"])  # it reappears: its state comes back by snapshot
            await poll_until(consumer, lambda: consumer.index.hashes_of("a") == {7, 8})
        finally:
            new.close()
            await consumer.stop()

    asyncio.run(scenario())
