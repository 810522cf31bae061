"""Worker discovery through a real Redis: registration, heartbeats, TTL expiry, listeners."""
from __future__ import annotations

import asyncio

import pytest
import redis

from baton.contracts.keys import worker_key
from baton.contracts.worker_registry import WorkerLoad, WorkerRecord, WorkerRegistration, WorkerRegistry

pytestmark = pytest.mark.anyio


def _record(worker_id: str, pool: str = "decode", model: str = "m") -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, pool=pool, grpc_address=f"127.0.0.1:{1000 + len(worker_id)}",
                        model=model, region="r1", capacity=8, block_size=16)


class Listener:
    def __init__(self) -> None:
        self.added: list[str] = []
        self.ids: list[str] = []  # removed

    def on_worker_added(self, worker_id: str) -> None:
        self.added.append(worker_id)

    def on_worker_removed(self, worker_id: str) -> None:
        self.ids.append(worker_id)


def test_record_round_trips_through_a_hash() -> None:
    rec = WorkerRecord(worker_id="d0", pool="decode", grpc_address="h:1", model="m", host="node-1", pid=4242,
                       load=WorkerLoad(num_requests_running=3, kv_blocks_used=5, kv_blocks_total=9), heartbeat_at=1.5)
    raw = {k.encode(): v.encode() for k, v in rec.to_hash().items()}
    assert WorkerRecord.from_hash(raw) == rec


def test_malformed_hash_names_the_field() -> None:
    raw = _record("d0").to_hash() | {"capacity": "lots"}
    with pytest.raises(ValueError, match="capacity"):
        WorkerRecord.from_hash(raw)
    with pytest.raises(ValueError, match="pool"):
        WorkerRecord(worker_id="x", pool="gpu", grpc_address="h:1", model="m")


async def test_registration_heartbeat_and_stop(redis_url: str) -> None:
    loads = iter([WorkerLoad(num_requests_running=i) for i in range(100)])
    reg = WorkerRegistration(redis_url, _record("d0"), lambda: next(loads), interval_s=0.05, ttl_s=1.0)
    registry = WorkerRegistry(redis_url, model="m", poll_interval_s=0.05)
    removed = Listener()
    registry.add_listener(removed)
    await reg.start()
    await registry.start()
    try:
        assert [w.worker_id for w in registry.workers("decode")] == ["d0"]
        assert registry.workers("prefill") == []
        first = registry.get("d0").load.num_requests_running
        await asyncio.sleep(0.3)
        assert registry.get("d0").load.num_requests_running > first, "heartbeats must refresh the live load"
        ttl = redis.Redis.from_url(redis_url).pttl(worker_key("d0"))
        assert 0 < ttl <= 1000
        await reg.stop()
        await asyncio.sleep(0.2)
        assert registry.workers() == [] and removed.ids == ["d0"] and removed.added == ["d0"]
    finally:
        await registry.stop()


async def test_worker_that_stops_heartbeating_expires(redis_url: str) -> None:
    # One heartbeat and no loop: a worker that registered and then hung or was SIGKILLed.
    reg = WorkerRegistration(redis_url, _record("p0", pool="prefill"), interval_s=0.1, ttl_s=0.4)
    registry = WorkerRegistry(redis_url, poll_interval_s=0.05)
    removed = Listener()
    registry.add_listener(removed)
    await reg.heartbeat()
    await registry.start()
    try:
        assert registry.get("p0") is not None
        await asyncio.sleep(0.8)
        assert registry.get("p0") is None and removed.ids == ["p0"]
    finally:
        await registry.stop()
        await reg.stop()


async def test_registry_filters_model_and_skips_garbage(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset(worker_key("junk"), mapping={"worker_id": "junk", "pool": "decode"})
    client.hset(worker_key("other"), mapping=_record("other", model="other-model").to_hash())
    client.hset(worker_key("good"), mapping=_record("good").to_hash())
    registry = WorkerRegistry(redis_url, model="m")
    await registry.refresh()
    assert [w.worker_id for w in registry.workers()] == ["good"]
    await registry.stop()


async def test_registry_survives_unreachable_redis() -> None:
    from tests.conftest import free_port

    registry = WorkerRegistry(f"redis://127.0.0.1:{free_port()}/0", poll_interval_s=0.05)
    await registry.start()
    await asyncio.sleep(0.1)
    assert registry.connected is False and registry.workers() == []
    await registry.stop()


def test_ttl_must_exceed_interval(redis_url: str) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        WorkerRegistration(redis_url, _record("d0"), interval_s=2.0, ttl_s=1.0)
