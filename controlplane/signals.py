"""Traffic signals: what routers and workers publish into `baton:signals:<region>:<pool>`, and windows of them.

Routers publish request/token counts and latency samples under their own (origin) region; workers publish
queue depth and KV utilisation with zero counts. The reader sums counts over a window and keeps the latest
gauge of each source. A window with no fresh entry is `None`: the planner then holds, never scales down.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

STREAM_MAXLEN = 10_000


def stream_key(region: str, pool: str) -> str:
    return f"baton:signals:{region}:{pool}"


@dataclass(frozen=True)
class SignalEntry:
    """One publisher's aggregate over `period_s` seconds ending at `ts`."""

    ts: float
    period_s: float
    model: str
    source: str
    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    queue_depth: float | None = None
    kv_utilization: float | None = None
    ttft_s: tuple[float, ...] = ()
    itl_s: tuple[float, ...] = ()

    def to_fields(self) -> dict[str, str]:
        out = {"ts": repr(self.ts), "period_s": repr(self.period_s), "model": self.model, "source": self.source,
               "requests": str(self.requests), "prompt_tokens": str(self.prompt_tokens),
               "output_tokens": str(self.output_tokens), "ttft_s": json.dumps(list(self.ttft_s)),
               "itl_s": json.dumps(list(self.itl_s))}
        if self.queue_depth is not None:
            out["queue_depth"] = repr(self.queue_depth)
        if self.kv_utilization is not None:
            out["kv_utilization"] = repr(self.kv_utilization)
        return out

    @classmethod
    def from_fields(cls, raw: dict) -> SignalEntry:
        f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in raw.items()}
        return cls(ts=float(f["ts"]), period_s=float(f["period_s"]), model=f["model"], source=f["source"],
                   requests=int(f.get("requests", 0)), prompt_tokens=int(f.get("prompt_tokens", 0)),
                   output_tokens=int(f.get("output_tokens", 0)),
                   queue_depth=float(f["queue_depth"]) if "queue_depth" in f else None,
                   kv_utilization=float(f["kv_utilization"]) if "kv_utilization" in f else None,
                   ttft_s=tuple(json.loads(f.get("ttft_s", "[]"))), itl_s=tuple(json.loads(f.get("itl_s", "[]"))))


def p90(samples: list[float] | tuple[float, ...]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


@dataclass(frozen=True)
class SignalWindow:
    """Traffic of one (model, region, pool) over the last window; rates are per second."""

    request_rate: float
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    queue_depth: float = 0.0
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    kv_utilization: float | None = None
    sources: int = 1
    age_s: float = 0.0

    def load(self, pool: str) -> float:
        """The token rate that sizes `pool`: prompt tokens for prefill, output tokens for decode."""
        return self.prompt_tokens_per_s if pool == "prefill" else self.output_tokens_per_s

    def latency_p90_s(self, pool: str) -> float | None:
        return self.ttft_p90_s if pool == "prefill" else self.itl_p90_s


def build_window(entries: list[SignalEntry], now: float, window_s: float, stale_after_s: float) -> SignalWindow | None:
    """Aggregates entries into a window; None when nothing arrived within `stale_after_s`."""
    recent = [e for e in entries if now - window_s <= e.ts <= now + 1.0]
    if not recent:
        return None
    newest = max(e.ts for e in recent)
    if now - newest > stale_after_s:
        return None
    # Divide by the span the entries cover, so a window only partly filled does not read as low traffic.
    covered = max(1e-3, min(window_s, now - min(e.ts - e.period_s for e in recent)))
    latest: dict[str, SignalEntry] = {}
    for e in sorted(recent, key=lambda e: e.ts):
        latest[e.source] = e
    queues = [e.queue_depth for e in latest.values() if e.queue_depth is not None]
    kvs = [e.kv_utilization for e in latest.values() if e.kv_utilization is not None]
    return SignalWindow(
        request_rate=sum(e.requests for e in recent) / covered,
        prompt_tokens_per_s=sum(e.prompt_tokens for e in recent) / covered,
        output_tokens_per_s=sum(e.output_tokens for e in recent) / covered,
        queue_depth=sum(queues),
        ttft_p90_s=p90([s for e in recent for s in e.ttft_s]),
        itl_p90_s=p90([s for e in recent for s in e.itl_s]),
        kv_utilization=sum(kvs) / len(kvs) if kvs else None,
        sources=len(latest),
        age_s=max(0.0, now - newest),
    )


@dataclass
class SignalPublisher:
    """Accumulates one process's traffic and flushes it as one stream entry (`await flush()` every few s).

    `redis` is a redis.asyncio client. Routers call `record_request`, `record_ttft`, `record_itl`; workers set
    the gauges. Latency samples are capped per flush so a busy router writes bounded entries.
    """

    redis: object
    region: str
    pool: str
    model: str
    source: str
    max_samples: int = 512
    _requests: int = 0
    _prompt: int = 0
    _output: int = 0
    _ttft: list[float] = field(default_factory=list)
    _itl: list[float] = field(default_factory=list)
    _queue: float | None = None
    _kv: float | None = None
    _last: float = field(default_factory=time.time)

    def record_request(self, prompt_tokens: int, output_tokens: int = 0) -> None:
        self._requests += 1
        self._prompt += prompt_tokens
        self._output += output_tokens

    def record_output_tokens(self, n: int) -> None:
        self._output += n

    def record_ttft(self, seconds: float) -> None:
        if len(self._ttft) < self.max_samples:
            self._ttft.append(seconds)

    def record_itl(self, seconds: float) -> None:
        if len(self._itl) < self.max_samples:
            self._itl.append(seconds)

    def set_queue_depth(self, n: float) -> None:
        self._queue = n

    def set_kv_utilization(self, ratio: float) -> None:
        self._kv = ratio

    def take(self, now: float | None = None) -> SignalEntry:
        """Returns the entry for the period since the last take and starts a new period."""
        now = time.time() if now is None else now
        entry = SignalEntry(ts=now, period_s=max(1e-3, now - self._last), model=self.model, source=self.source,
                            requests=self._requests, prompt_tokens=self._prompt, output_tokens=self._output,
                            queue_depth=self._queue, kv_utilization=self._kv,
                            ttft_s=tuple(self._ttft), itl_s=tuple(self._itl))
        self._requests = self._prompt = self._output = 0
        self._ttft, self._itl, self._last = [], [], now
        return entry

    async def flush(self, now: float | None = None) -> SignalEntry:
        entry = self.take(now)
        await self.redis.xadd(stream_key(self.region, self.pool), entry.to_fields(),
                              maxlen=STREAM_MAXLEN, approximate=True)
        return entry


class SignalReader:
    """Reads windows of every (model, region, pool) from Redis; `redis` is a redis.asyncio client."""

    def __init__(self, redis: object) -> None:
        self.redis = redis

    async def entries(self, region: str, pool: str, since: float) -> list[SignalEntry]:
        # Stream ids are Redis server time; select by our own `ts` field so clocks need not agree exactly.
        raw = await self.redis.xrevrange(stream_key(region, pool), count=STREAM_MAXLEN)
        out = []
        for _id, fields in raw:
            try:
                e = SignalEntry.from_fields(fields)
            except (KeyError, ValueError):
                continue
            if e.ts < since:
                break
            out.append(e)
        return out

    async def windows(self, keys: list[tuple[str, str, str]], now: float, window_s: float,
                      stale_after_s: float) -> dict[tuple[str, str, str], SignalWindow | None]:
        by_stream: dict[tuple[str, str], list[SignalEntry]] = {}
        for _model, region, pool in keys:
            if (region, pool) not in by_stream:
                by_stream[(region, pool)] = await self.entries(region, pool, now - max(window_s, stale_after_s))
        return {
            (m, r, p): build_window([e for e in by_stream[(r, p)] if e.model == m], now, window_s, stale_after_s)
            for m, r, p in keys
        }
