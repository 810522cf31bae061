"""Traffic signals as the control plane reads them: windows over what routers and workers publish.

Routers publish request/token counts and latency samples under their own (origin) region; workers publish
queue depth and KV utilisation with zero counts. Embedding workers, which no router counts for, publish their
own requests, inputs and queue-time samples. The reader sums counts over a window and keeps the latest
gauge of each source. A window with no fresh entry is `None`: the planner then holds, never scales down.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from baton.contracts.keys import SIGNALS_STREAM_MAXLEN, signals_stream_key
from baton.contracts.signals import SignalEntry
from baton.contracts.worker_registry import EMBED_POOL


def p90(samples: list[float] | tuple[float, ...]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Interval:
    """What arrived over the newest part of a window (the last tick): counts, not rates, so the planner can test
    a change of level against the count's own Poisson noise."""

    seconds: float
    requests: float
    prompt_tokens: float
    output_tokens: float
    inputs: float = 0.0


@dataclass(frozen=True)
class SignalWindow:
    """Traffic of one (model, region, pool) over the last window; rates are per second. `recent`: the newest
    part of it, where a sudden change shows a window's length before the window's average catches up."""

    request_rate: float
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    queue_depth: float = 0.0
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    kv_utilization: float | None = None
    inputs_per_s: float = 0.0  # embedding inputs
    queue_p90_s: float | None = None  # embedding requests: arrival to first forward
    sources: int = 1
    age_s: float = 0.0
    recent: Interval | None = None

    def load(self, pool: str) -> float:
        """The rate that sizes `pool`: prompt tokens for prefill, output tokens for decode, inputs for embed."""
        return {"prefill": self.prompt_tokens_per_s, EMBED_POOL: self.inputs_per_s}.get(pool, self.output_tokens_per_s)

    def latency_p90_s(self, pool: str) -> float | None:
        """The latency the pool's SLO bounds: TTFT for prefill, ITL for decode, queue time for embed."""
        return {"prefill": self.ttft_p90_s, EMBED_POOL: self.queue_p90_s}.get(pool, self.itl_p90_s)


def build_window(entries: list[SignalEntry], now: float, window_s: float, stale_after_s: float,
                 recent_s: float | None = None) -> SignalWindow | None:
    """Aggregates entries into a window; None when nothing arrived within `stale_after_s`. `recent_s`: also sum
    the entries of the window's last `recent_s` seconds."""
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
    recent_interval = None
    if recent_s is not None and recent_s < window_s:
        last = [e for e in recent if e.ts > now - recent_s]
        if last:
            recent_interval = Interval(
                # what the entries cover, which is more than recent_s when publishers flush less often
                seconds=max(1e-3, now - min(e.ts - e.period_s for e in last)),
                requests=sum(e.requests for e in last), prompt_tokens=sum(e.prompt_tokens for e in last),
                output_tokens=sum(e.output_tokens for e in last), inputs=sum(e.inputs for e in last))
    return SignalWindow(
        request_rate=sum(e.requests for e in recent) / covered,
        prompt_tokens_per_s=sum(e.prompt_tokens for e in recent) / covered,
        output_tokens_per_s=sum(e.output_tokens for e in recent) / covered,
        queue_depth=sum(queues),
        ttft_p90_s=p90([s for e in recent for s in e.ttft_s]),
        itl_p90_s=p90([s for e in recent for s in e.itl_s]),
        kv_utilization=sum(kvs) / len(kvs) if kvs else None,
        inputs_per_s=sum(e.inputs for e in recent) / covered,
        queue_p90_s=p90([s for e in recent for s in e.queue_s]),
        sources=len(latest),
        age_s=max(0.0, now - newest),
        recent=recent_interval,
    )


class SignalReader:
    """Reads windows of every (model, region, pool) from Redis; `redis` is a redis.asyncio client."""

    def __init__(self, redis: object) -> None:
        self.redis = redis

    async def entries(self, region: str, pool: str, since: float) -> list[SignalEntry]:
        # Stream ids are Redis server time; select by our own `ts` field so clocks need not agree exactly.
        raw = await self.redis.xrevrange(signals_stream_key(region, pool), count=SIGNALS_STREAM_MAXLEN)
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
                      stale_after_s: float, recent_s: float | None = None,
                      ) -> dict[tuple[str, str, str], SignalWindow | None]:
        by_stream: dict[tuple[str, str], list[SignalEntry]] = {}
        for _model, region, pool in keys:
            if (region, pool) not in by_stream:
                by_stream[(region, pool)] = await self.entries(region, pool, now - max(window_s, stale_after_s))
        return {
            (m, r, p): build_window([e for e in by_stream[(r, p)] if e.model == m], now, window_s, stale_after_s,
                                    recent_s)
            for m, r, p in keys
        }
