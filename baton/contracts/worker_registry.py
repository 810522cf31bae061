"""Worker discovery through Redis: workers heartbeat a `baton:worker:<id>` hash with a TTL
(`WorkerRegistration`); the router scans those keys and keeps a per-pool view (`WorkerRegistry`)."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from baton.contracts.keys import WORKER_KEY_PREFIX, worker_key
from baton.redis_loops import every, stop_task

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0
TTL_S = 10.0
POOLS = ("prefill", "decode")  # the generation pools
EMBED_POOL = "embed"  # embedding workers: prefill-only forwards, no KV kept
WORKER_POOLS = (*POOLS, EMBED_POOL)


@dataclass(frozen=True)
class WorkerLoad:
    """Live load a worker reports with every heartbeat."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens waiting to be computed
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


@dataclass(frozen=True)
class WorkerRecord:
    """The typed form of one `baton:worker:<id>` hash."""

    worker_id: str
    pool: str
    grpc_address: str
    model: str
    region: str = "local"
    http_address: str = ""
    capacity: int = 0  # concurrent requests the worker admits; 0 = unknown
    block_size: int = 16
    host: str = ""  # socket.gethostname() of the worker's machine; with pid, lets a local launcher reap it
    pid: int = 0
    load: WorkerLoad = field(default_factory=WorkerLoad)
    heartbeat_at: float = 0.0

    def __post_init__(self) -> None:
        if self.pool not in WORKER_POOLS:
            raise ValueError(f"worker {self.worker_id!r}: pool must be one of {WORKER_POOLS}, got {self.pool!r}")
        if not self.worker_id or not self.grpc_address:
            raise ValueError("worker_id and grpc_address must be non-empty")

    @property
    def key(self) -> str:
        return worker_key(self.worker_id)

    def to_hash(self) -> dict[str, str]:
        flat = {k: v for k, v in dataclasses.asdict(self).items() if k != "load"}
        flat.update(dataclasses.asdict(self.load))
        return {k: str(v) for k, v in flat.items()}

    @classmethod
    def from_hash(cls, raw: dict[bytes | str, bytes | str]) -> "WorkerRecord":
        """Parses a hash read from Redis; raises ValueError naming the bad field."""
        h = {_s(k): _s(v) for k, v in raw.items()}
        ints = {"capacity", "block_size", "pid", *(f.name for f in dataclasses.fields(WorkerLoad))}
        parsed: dict[str, object] = {}
        for name, value in h.items():
            try:
                if name in ints:
                    parsed[name] = int(value)
                elif name == "heartbeat_at":
                    parsed[name] = float(value)
                else:
                    parsed[name] = value
            except ValueError:
                raise ValueError(f"field {name!r} = {value!r} is not a number") from None
        load = WorkerLoad(**{f.name: parsed.pop(f.name) for f in dataclasses.fields(WorkerLoad) if f.name in parsed})
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"worker_id", "pool", "grpc_address", "model"} - parsed.keys()
        if missing:
            raise ValueError(f"missing fields {sorted(missing)}")
        return cls(load=load, **{k: v for k, v in parsed.items() if k in known})


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class WorkerRegistration:
    """Worker side: keeps this worker's hash alive in Redis until stop() deletes it."""

    def __init__(
        self,
        redis_url: str,
        record: WorkerRecord,
        load: Callable[[], WorkerLoad] | None = None,
        *,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        ttl_s: float = TTL_S,
    ) -> None:
        if ttl_s <= interval_s:
            raise ValueError(f"ttl_s ({ttl_s}) must exceed interval_s ({interval_s}) or the key flaps")
        self.record = record
        self._load = load
        self._interval_s = interval_s
        self._ttl_ms = int(ttl_s * 1000)
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def heartbeat(self) -> None:
        load = self._load() if self._load else self.record.load
        self.record = dataclasses.replace(self.record, load=load, heartbeat_at=time.time())
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.record.key, mapping=self.record.to_hash())
            pipe.pexpire(self.record.key, self._ttl_ms)
            await pipe.execute()

    async def start(self) -> None:
        """Registers once (so the worker is discoverable when this returns), then heartbeats."""
        await self.heartbeat()
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.record.worker_id}")

    async def _run(self) -> None:
        # Keeps trying through an outage: the key expires on its own if Redis stays away past the TTL.
        await every(self._interval_s, self.heartbeat, f"heartbeat of {self.record.worker_id}",
                    lambda: self._stopping)

    async def stop(self) -> None:
        self._stopping = True
        await stop_task(self._task)
        self._task = None
        try:
            await self._redis.delete(self.record.key)
        except (RedisError, OSError) as exc:
            log.warning("could not deregister %s (its key expires by TTL): %s", self.record.worker_id, exc)
        await self._redis.aclose()

    async def __aenter__(self) -> "WorkerRegistration":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class RegistryListener(Protocol):
    def on_worker_added(self, worker_id: str) -> None: ...

    def on_worker_removed(self, worker_id: str) -> None: ...


class WorkerRegistry:
    """Router side: a view of live workers, refreshed by scanning Redis every poll interval; listeners
    hear of every worker that joins or leaves."""

    def __init__(self, redis_url: str, *, model: str | None = None, poll_interval_s: float = 0.5) -> None:
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self._model = model
        self._poll_interval_s = poll_interval_s
        self._workers: dict[str, WorkerRecord] = {}
        self._listeners: list[RegistryListener] = []
        self._task: asyncio.Task | None = None
        self.connected = False  # the last scan reached Redis
        self._bad_keys: set[str] = set()
        self._stopping = False

    def add_listener(self, listener: RegistryListener) -> None:
        self._listeners.append(listener)

    def workers(self, pool: str | None = None) -> list[WorkerRecord]:
        return [w for w in self._workers.values() if pool is None or w.pool == pool]

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    async def refresh(self) -> None:
        """One scan; workers whose key expired or was deleted are dropped and listeners told."""
        try:
            keys = [k async for k in self._redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=1000)]
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(key)
                hashes = await pipe.execute()
        except (RedisError, OSError):
            self.connected = False
            raise
        seen: dict[str, WorkerRecord] = {}
        for key, raw in zip(keys, hashes):
            if not raw:
                continue  # expired between SCAN and HGETALL
            try:
                record = WorkerRecord.from_hash(raw)
            except (ValueError, TypeError) as exc:
                if _s(key) not in self._bad_keys:
                    self._bad_keys.add(_s(key))
                    log.warning("ignoring malformed worker key %s: %s", _s(key), exc)
                continue
            if self._model is None or record.model == self._model:
                seen[record.worker_id] = record
        removed = self._workers.keys() - seen.keys()
        added = seen.keys() - self._workers.keys()
        self._workers = seen
        self.connected = True
        for worker_id in sorted(added):
            log.info("worker %s joined the registry", worker_id)
            for listener in self._listeners:
                listener.on_worker_added(worker_id)
        for worker_id in sorted(removed):
            log.info("worker %s left the registry", worker_id)
            for listener in self._listeners:
                listener.on_worker_removed(worker_id)

    async def start(self) -> None:
        try:
            await self.refresh()
        except (RedisError, OSError) as exc:
            log.warning("worker registry: Redis unreachable at start: %s", exc)
        self._task = asyncio.create_task(self._run(), name="worker-registry")

    async def _run(self) -> None:
        # A failed scan keeps the last view: workers are still serving even if Redis blinks.
        await every(self._poll_interval_s, self.refresh, "worker registry scan", lambda: self._stopping)

    async def stop(self) -> None:
        self._stopping = True
        await stop_task(self._task)
        self._task = None
        await self._redis.aclose()
