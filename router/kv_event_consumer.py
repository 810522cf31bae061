"""Feeds the router's PrefixIndex from the `baton:kv_events` stream and keeps it honest across worker
departures, gaps in the stream, router restarts (replay + snapshots) and Redis restarts (reset + snapshots)."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable, Iterable

import redis
import redis.asyncio as aioredis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from baton.contracts.keys import KV_EVENTS_STREAM, KV_SNAPSHOT_REQUESTS_KEY
from baton.contracts.kv_events import KVEvent
from baton.redis_loops import stop_task
from baton.router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

ALL_WORKERS = "*"


class KVEventConsumer:
    """Each router replica runs one over the same stream, so replicas converge to the same index.

    Start-up replays the stream from its first retained entry; any worker whose history there is
    incomplete (first entry seen is not its seq 0, or a later seq is skipped) is asked for a snapshot
    through KV_SNAPSHOT_REQUESTS_KEY, which every KVEventPublisher polls. A change of Redis' run_id means
    Redis restarted and the stream is gone: the index is cleared and all workers are asked.
    """

    def __init__(self, redis_url: str, index: PrefixIndex, *, stream: str = KV_EVENTS_STREAM,
                 requests_key: str = KV_SNAPSHOT_REQUESTS_KEY, block_ms: int = 50, read_count: int = 1000,
                 check_interval_s: float = 1.0, snapshot_retry_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        # socket_timeout well above block_ms, so a blocking read ends by itself first.
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0,
                                              retry=Retry(ConstantBackoff(0.05), 2))
        self._stream = stream
        self._requests_key = requests_key
        self._block_ms = block_ms
        self._read_count = read_count
        self._check_interval_s = check_interval_s
        self._snapshot_retry_s = snapshot_retry_s
        self._clock = clock
        self.last_id = "0"
        self._tracks: dict[str, tuple[str, int]] = {}  # worker -> (epoch, next expected seq)
        self._departed: dict[str, str] = {}  # worker -> epoch it had when the registry dropped it
        self._want_snapshot: set[str] = set()
        self._requested_at: dict[str, float] = {}
        self._run_id: str | None = None
        self._next_check = 0.0
        self._task: asyncio.Task | None = None
        self._stopping = False
        # For baton_router_kv_events_lag_seconds: how old the last applied entry's oldest event was
        # when applied (publisher batching included); 0 once a read finds the stream drained.
        self.lag_seconds = 0.0
        self.entries_applied = 0
        self.blocks_applied = 0
        self.gaps = 0
        self.resets = 0
        self.malformed = 0

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._check_redis()
        self._task = asyncio.create_task(self._run(), name="kv-event-consumer")

    async def stop(self) -> None:
        self._stopping = True
        await stop_task(self._task)
        self._task = None
        await self._redis.aclose()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            try:
                await self.poll()
                backoff = 0.05
            except (redis.RedisError, OSError) as exc:
                log.warning("KV event stream unreadable (%s); retrying in %.2fs", exc, backoff)
                self._next_check = 0.0  # whatever comes back may be a fresh Redis
            except Exception:  # keep consuming: a dead task would silently freeze the index
                log.exception("KV event consumer failed; retrying in %.2fs", backoff)
            else:
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    # --- the registry's hooks --------------------------------------------------------------

    def on_worker_removed(self, worker: str) -> None:
        """The worker left: forget its blocks, and ignore leftover entries of the same process."""
        self.index.remove_worker(worker)
        track = self._tracks.pop(worker, None)
        if track is not None:
            self._departed[worker] = track[0]
        self._want_snapshot.discard(worker)
        self._requested_at.pop(worker, None)

    def on_worker_added(self, worker: str) -> None:
        """A worker dropped earlier is back (e.g. a missed heartbeat): ask for its full state."""
        if self._departed.pop(worker, None) is not None:
            self._want_snapshot.add(worker)

    def sync_workers(self, live: Iterable[str]) -> None:
        """Reconciles with the registry's live set, e.g. after a router restart replayed entries
        of workers that died while no router was watching."""
        live = set(live)
        for worker in set(self.index.workers()) | set(self._tracks):
            if worker not in live:
                self.on_worker_removed(worker)
        for worker in live:
            self.on_worker_added(worker)
            if worker not in self._tracks:
                # Nothing of it in the retained stream (trimmed to its maxlen, or the worker was idle while the
                # stream moved on): only a snapshot tells what it holds.
                self._want_snapshot.add(worker)

    # --- reading ---------------------------------------------------------------------------

    async def poll(self, block_ms: int | None = -1) -> int:
        """Reads and applies one batch; returns the number of entries applied. block_ms=-1 uses
        the configured block time, None does not block."""
        if time.monotonic() >= self._next_check:
            await self._check_redis()
        block = self._block_ms if block_ms == -1 else block_ms
        reply = await self._redis.xread({self._stream: self.last_id}, count=self._read_count, block=block)
        applied = 0
        if reply:
            for entry_id, fields in reply[0][1]:
                applied += self._apply(entry_id, fields)
        else:
            self.lag_seconds = 0.0  # caught up with the stream
        await self._send_snapshot_requests()
        return applied

    def _apply(self, entry_id: bytes, fields: dict[bytes, bytes]) -> int:
        self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        try:
            event = KVEvent.from_fields(fields)
        except ValueError as exc:
            self.malformed += 1
            log.warning("skipping KV event %s: %s", self.last_id, exc)
            return 0
        worker = event.worker
        departed_epoch = self._departed.get(worker)
        if departed_epoch is not None:
            if event.epoch == departed_epoch:
                return 0
            del self._departed[worker]  # the same id came back as a new process
        track = self._tracks.get(worker)
        if event.kind in ("snapshot", "cleared"):
            # Both state the worker's whole cache, so any earlier gap no longer matters.
            self._want_snapshot.discard(worker)
            self._requested_at.pop(worker, None)
        elif track is None or track[0] != event.epoch:
            if track is not None:
                self.index.clear_worker(worker)  # a new process starts with a new cache
            if event.seq != 0:
                self._note_gap(worker)
        elif event.seq < track[1]:
            return 0  # already applied (duplicate delivery)
        elif event.seq > track[1]:
            self._note_gap(worker)
        self.index.apply(event)
        self._tracks[worker] = (event.epoch, event.seq + 1)
        self.entries_applied += 1
        self.blocks_applied += len(event.hashes)
        if event.ts > 0:
            self.lag_seconds = max(0.0, self._clock() - event.ts)
        return 1

    def _note_gap(self, worker: str) -> None:
        self.gaps += 1
        self._want_snapshot.add(worker)

    async def _send_snapshot_requests(self) -> None:
        now = time.monotonic()
        for worker, at in self._requested_at.items():
            if now - at > self._snapshot_retry_s:
                self._want_snapshot.add(worker)  # the worker did not answer; ask again
        if not self._want_snapshot:
            return
        wanted = {worker: os.urandom(8).hex() for worker in self._want_snapshot}
        await self._redis.hset(self._requests_key, mapping=wanted)
        for worker in wanted:
            if worker != ALL_WORKERS:
                self._requested_at[worker] = now
        self._want_snapshot.clear()

    async def _check_redis(self) -> None:
        info = await self._redis.info("server")
        self._next_check = time.monotonic() + self._check_interval_s
        run_id = info.get("run_id")
        if self._run_id is not None and run_id != self._run_id:
            log.warning("Redis restarted (run_id %s -> %s): rebuilding the prefix index", self._run_id, run_id)
            self.resets += 1
            self.index.clear()
            self._tracks.clear()
            self._requested_at.clear()
            self.last_id = "0"
            self._want_snapshot = {ALL_WORKERS}
        self._run_id = run_id
