"""Worker-side KV event publisher: block stored/removed/cleared/snapshot events to the Redis stream
`baton:kv_events`, batched by a background thread so the engine's step loop only appends to a deque."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import redis
from redis.backoff import ConstantBackoff
from redis.retry import Retry

from baton.contracts.keys import KV_EVENTS_STREAM, KV_SNAPSHOT_REQUESTS_KEY

log = logging.getLogger(__name__)

# Hash: field = worker id or "*", value = a fresh nonce per request; publishers poll it.
KINDS = ("stored", "removed", "cleared", "snapshot")


def encode_hashes(hashes: Iterable[int]) -> bytes:
    packed = array("Q", hashes)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def decode_hashes(data: bytes) -> list[int]:
    if len(data) % 8:
        raise ValueError(f"hashes field is {len(data)} bytes, not a multiple of 8")
    packed = array("Q")
    packed.frombytes(data)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tolist()


@dataclass(frozen=True)
class KVEvent:
    """One stream entry. `epoch` names the publisher instance, `seq` counts its entries from 0 so a
    reader can tell a gap (trimmed stream, lost batch) from a clean sequence; `ts` is the wall time
    the oldest event in the entry was recorded, for lag."""

    worker: str
    kind: str
    hashes: tuple[int, ...] | list[int]
    epoch: str = ""
    seq: int = 0
    ts: float = 0.0

    def to_fields(self) -> dict[str, bytes | str]:
        return {"worker": self.worker, "kind": self.kind, "hashes": encode_hashes(self.hashes),
                "epoch": self.epoch, "seq": str(self.seq), "ts": repr(self.ts)}

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes]) -> "KVEvent":
        try:
            kind = fields[b"kind"].decode()
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            return cls(worker=fields[b"worker"].decode(), kind=kind,
                       hashes=decode_hashes(fields.get(b"hashes", b"")),
                       epoch=fields.get(b"epoch", b"").decode(), seq=int(fields.get(b"seq", b"0")),
                       ts=float(fields.get(b"ts", b"0")))
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed KV event entry {fields!r}: {exc}") from exc


def coalesce(pending: list[tuple[str, list[int], float]]) -> list[tuple[str, list[int], float]]:
    """Merges runs of same-kind stored/removed events into one entry each, keeping order."""
    out: list[tuple[str, list[int], float]] = []
    for kind, hashes, ts in pending:
        if out and kind in ("stored", "removed") and out[-1][0] == kind:
            out[-1][1].extend(hashes)
        else:
            out.append((kind, list(hashes), ts))
    return out


class KVEventPublisher:
    """Engine-facing API: stored/removed/cleared/snapshot append to an in-memory queue (no I/O, no lock);
    a daemon thread flushes every `flush_interval_s` or once `max_batch` events wait, in one pipeline.

    If `snapshot_source` is given (a thread-safe callable returning every hash the worker caches),
    the thread publishes a snapshot at start, when a router asks (KV_SNAPSHOT_REQUESTS_KEY), after Redis
    restarts, and after a batch was lost; without it, it publishes `cleared` in those cases so no
    router keeps believing in blocks it can no longer verify.
    """

    def __init__(self, redis_url: str, worker_id: str, *, snapshot_source: Callable[[], Iterable[int]] | None = None,
                 stream: str = KV_EVENTS_STREAM, requests_key: str = KV_SNAPSHOT_REQUESTS_KEY,
                 flush_interval_s: float = 0.005, max_batch: int = 512, poll_interval_s: float = 0.25,
                 stream_maxlen: int = 100_000, max_pending: int = 1_000_000) -> None:
        if not worker_id or worker_id == "*":
            raise ValueError(f"worker_id must be a non-empty string other than '*', got {worker_id!r}")
        if flush_interval_s <= 0 or poll_interval_s <= 0:
            raise ValueError("flush_interval_s and poll_interval_s must be positive")
        self.worker_id = worker_id
        self.epoch = os.urandom(8).hex()
        # One quick retry covers a stale pooled connection; the default (10, exponential) would
        # stall the flush thread for seconds while Redis is away.
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                           retry=Retry(ConstantBackoff(0.01), 1))
        self._snapshot_source = snapshot_source
        self._stream = stream
        self._requests_key = requests_key
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._poll_interval_s = poll_interval_s
        self._stream_maxlen = stream_maxlen
        self._max_pending = max_pending
        self._pending: deque[tuple[str, Iterable[int], float]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._seq = 0
        self._resync = True  # the first flush announces this instance's state
        self._seen_requests: list[bytes | None] | None = None
        self._run_id: str | None = None
        self._next_poll = 0.0
        self._redis_ok = True
        self.entries_published = 0
        self.events_dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{worker_id}", daemon=True)
        self._thread.start()

    # Hot path: called from the engine's step loop; deque.append is atomic under the GIL, so no lock.
    def stored(self, hashes: Iterable[int]) -> None:
        self._append("stored", tuple(hashes))

    def removed(self, hashes: Iterable[int]) -> None:
        self._append("removed", tuple(hashes))

    def cleared(self) -> None:
        self._append("cleared", ())

    def snapshot(self, hashes: Iterable[int]) -> None:
        self._append("snapshot", tuple(hashes))

    def _append(self, kind: str, hashes: tuple[int, ...]) -> None:
        if self._stop:
            raise RuntimeError(f"KV event publisher for {self.worker_id} is closed")
        pending = self._pending
        pending.append((kind, hashes, time.time()))
        if len(pending) >= self._max_batch:
            self._wake.set()

    def flush(self, timeout_s: float = 5.0) -> None:
        """Blocks until everything appended before the call has been sent (or dropped on error)."""
        marker = threading.Event()
        self._pending.append(("_flush", (), marker))  # type: ignore[arg-type]
        self._wake.set()
        if not marker.wait(timeout_s):
            raise TimeoutError(f"KV events of {self.worker_id} not flushed within {timeout_s}s")

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._redis.close()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_interval_s)
            self._wake.clear()
            stopping = self._stop
            for step in (self._poll_requests, self._flush_once):
                try:
                    step()
                except redis.RedisError as exc:
                    if self._redis_ok:
                        log.warning("KV events of %s: Redis unavailable (%s); will resync", self.worker_id, exc)
                    self._redis_ok = False
                    self._resync = True
                except Exception:  # a bad snapshot source must not kill the publisher thread
                    log.exception("KV events of %s: flush failed; will resync", self.worker_id)
                    self._resync = True
            if stopping:
                return

    def _poll_requests(self) -> None:
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self._poll_interval_s
        pipe = self._redis.pipeline(transaction=False)
        pipe.hmget(self._requests_key, [self.worker_id, "*"])
        pipe.info("server")
        requests, info = pipe.execute()
        self._redis_ok = True
        run_id = info.get("run_id")
        if self._run_id is not None and run_id != self._run_id:
            self._resync = True  # Redis restarted: the stream and everything routers knew is gone
        self._run_id = run_id
        if self._seen_requests is not None and any(
                new is not None and new != old for new, old in zip(requests, self._seen_requests)):
            self._resync = True
        self._seen_requests = requests

    def _drain(self) -> tuple[list[tuple[str, list[int], float]], list[threading.Event]]:
        events, markers = [], []
        while self._pending:
            kind, hashes, ts = self._pending.popleft()
            if kind == "_flush":
                markers.append(ts)  # type: ignore[arg-type]
            else:
                events.append((kind, hashes, ts))
        return events, markers

    def _flush_once(self) -> None:
        if not self._redis_ok:
            # Until the next poll reaches Redis, queued events are dropped: the resync snapshot
            # that follows supersedes them, and retrying every few ms would only burn CPU.
            events, markers = self._drain()
            self.events_dropped += len(events)
            for marker in markers:
                marker.set()
            return
        resync_state: list[int] | None = None
        if self._resync:
            # Read the state before draining: queued events are then replayed after the snapshot,
            # which is harmless because stored/removed/cleared are idempotent and stay in order.
            resync_state = list(self._snapshot_source()) if self._snapshot_source is not None else None
        events, markers = self._drain()
        try:
            entries = coalesce(events)
            if self._resync:
                kind = "snapshot" if resync_state is not None else "cleared"
                entries.insert(0, (kind, resync_state or [], time.time()))
            if not entries:
                return
            pipe = self._redis.pipeline(transaction=False)
            for kind, hashes, ts in entries:
                event = KVEvent(self.worker_id, kind, hashes, self.epoch, self._seq, ts)
                self._seq += 1
                pipe.xadd(self._stream, event.to_fields(), maxlen=self._stream_maxlen, approximate=True)
            try:
                pipe.execute()
            except redis.RedisError:
                self.events_dropped += len(events)
                raise
            self._resync = False
            self.entries_published += len(entries)
        finally:
            for marker in markers:
                marker.set()
            if len(self._pending) > self._max_pending:
                # Redis has been away for long: drop the backlog, a snapshot will replace it.
                self.events_dropped += len(self._pending)
                self._pending.clear()
                self._resync = True
