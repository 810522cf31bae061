"""Traffic signals in `baton:signals:<region>:<pool>`: the entry format, and the accumulator that routers and
workers flush into the stream. The control plane reads them (controlplane/signals.py)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from baton.contracts.keys import SIGNALS_STREAM_MAXLEN, signals_stream_key


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
    inputs: int = 0  # embedding inputs (a request carries one or thousands)
    queue_depth: float | None = None
    kv_utilization: float | None = None
    ttft_s: tuple[float, ...] = ()
    itl_s: tuple[float, ...] = ()
    queue_s: tuple[float, ...] = ()  # embedding requests: arrival to first forward

    def to_fields(self) -> dict[str, str]:
        out = {"ts": repr(self.ts), "period_s": repr(self.period_s), "model": self.model, "source": self.source,
               "requests": str(self.requests), "prompt_tokens": str(self.prompt_tokens),
               "output_tokens": str(self.output_tokens), "ttft_s": json.dumps(list(self.ttft_s)),
               "itl_s": json.dumps(list(self.itl_s))}
        if self.inputs or self.queue_s:
            out["inputs"], out["queue_s"] = str(self.inputs), json.dumps(list(self.queue_s))
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
                   output_tokens=int(f.get("output_tokens", 0)), inputs=int(f.get("inputs", 0)),
                   queue_depth=float(f["queue_depth"]) if "queue_depth" in f else None,
                   kv_utilization=float(f["kv_utilization"]) if "kv_utilization" in f else None,
                   ttft_s=tuple(json.loads(f.get("ttft_s", "[]"))), itl_s=tuple(json.loads(f.get("itl_s", "[]"))),
                   queue_s=tuple(json.loads(f.get("queue_s", "[]"))))


@dataclass
class SignalPublisher:
    """Accumulates one process's traffic and flushes it as one stream entry (`await flush()` every few s).

    `redis` is a redis.asyncio client. Routers call `record_request`, `record_ttft`, `record_itl`; workers set
    the gauges, and embedding workers record their requests (with inputs) and queue times themselves. Latency samples are capped per flush so a busy router writes bounded entries.
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
    _inputs: int = 0
    _queue_s: list[float] = field(default_factory=list)
    _queue: float | None = None
    _kv: float | None = None
    _last: float = field(default_factory=time.time)

    def record_request(self, prompt_tokens: int, output_tokens: int = 0, inputs: int = 0) -> None:
        self._requests += 1
        self._prompt += prompt_tokens
        self._output += output_tokens
        self._inputs += inputs

    def record_output_tokens(self, n: int) -> None:
        self._output += n

    def record_ttft(self, seconds: float) -> None:
        if len(self._ttft) < self.max_samples:
            self._ttft.append(seconds)

    def record_itl(self, seconds: float) -> None:
        if len(self._itl) < self.max_samples:
            self._itl.append(seconds)

    def record_queue_time(self, seconds: float) -> None:
        if len(self._queue_s) < self.max_samples:
            self._queue_s.append(seconds)

    def set_queue_depth(self, n: float) -> None:
        self._queue = n

    def set_kv_utilization(self, ratio: float) -> None:
        self._kv = ratio

    def take(self, now: float | None = None) -> SignalEntry:
        """Returns the entry for the period since the last take and starts a new period."""
        now = time.time() if now is None else now
        entry = SignalEntry(ts=now, period_s=max(1e-3, now - self._last), model=self.model, source=self.source,
                            requests=self._requests, prompt_tokens=self._prompt, output_tokens=self._output,
                            inputs=self._inputs, queue_depth=self._queue, kv_utilization=self._kv,
                            ttft_s=tuple(self._ttft), itl_s=tuple(self._itl), queue_s=tuple(self._queue_s))
        self._requests = self._prompt = self._output = self._inputs = 0
        self._ttft, self._itl, self._queue_s, self._last = [], [], [], now
        return entry

    async def flush(self, now: float | None = None) -> SignalEntry:
        entry = self.take(now)
        await self.redis.xadd(signals_stream_key(self.region, self.pool), entry.to_fields(),
                              maxlen=SIGNALS_STREAM_MAXLEN, approximate=True)
        return entry
