"""The router's link to the control plane: it publishes traffic signals (rates, TTFT, ITL) for its region's
pools and follows the spillover shares the control plane publishes when a region runs out of capacity."""
from __future__ import annotations

import asyncio
import json
import logging
import random

import redis.asyncio as aioredis

from baton.contracts.keys import spillover_key
from baton.contracts.signals import SignalPublisher
from baton.redis_loops import every, stop_task

log = logging.getLogger(__name__)


class Traffic:
    def __init__(self, redis_url: str, region: str, model: str, source: str, *, interval_s: float = 2.0,
                 rng: random.Random | None = None) -> None:
        # Bounded calls: a hung Redis fails a publish (retried next interval), never blocks it.
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.region = region
        self.model = model
        self._interval_s = interval_s
        self._rng = rng or random.Random()
        self.prefill = SignalPublisher(self._redis, region=region, pool="prefill", model=model, source=source)
        self.decode = SignalPublisher(self._redis, region=region, pool="decode", model=model, source=source)
        self.spill: dict[str, float] = {}  # region -> share of this region's traffic to send there
        self._task: asyncio.Task | None = None
        self._stopping = False

    # Hot path: plain in-memory counters, flushed by the background loop.
    def first_token(self, prompt_tokens: int, ttft_s: float) -> None:
        self.prefill.record_request(prompt_tokens)
        self.prefill.record_ttft(ttft_s)
        self.decode.record_request(prompt_tokens)

    def tokens(self, n: int, gap_s: float | None) -> None:
        self.decode.record_output_tokens(n)
        if gap_s is not None:
            for _ in range(n):
                self.decode.record_itl(gap_s)

    def target_region(self) -> str:
        """This router's region, or a spillover region drawn by the published shares."""
        draw = self._rng.random()
        for region, share in self.spill.items():
            if draw < share:
                return region
            draw -= share
        return self.region

    async def refresh_spill(self) -> None:
        raw = await self._redis.hget(spillover_key(self.model), self.region)
        spill: dict[str, float] = {}
        if raw:
            try:
                spill = {str(k): float(v) for k, v in json.loads(raw).items() if float(v) > 0}
            except (ValueError, TypeError, AttributeError) as exc:
                log.warning("ignoring malformed spillover entry for %s: %s", self.region, exc)
        if spill != self.spill:
            log.info("spillover from %s is now %s", self.region, spill or "off")
        self.spill = spill

    async def _publish(self) -> None:
        await self.prefill.flush()
        await self.decode.flush()
        await self.refresh_spill()

    def start(self) -> None:
        self._task = asyncio.create_task(every(self._interval_s, self._publish, "publishing traffic signals",
                                               lambda: self._stopping), name="traffic-signals")

    async def stop(self) -> None:
        self._stopping = True
        await stop_task(self._task)
        await self._redis.aclose()
