"""Background loops of the processes that talk to Redis: run a step every interval through Redis outages, and stop
such a loop within a bound."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger(__name__)


async def every(interval_s: float, step: Callable[[], Awaitable[None]], what: str,
                stopping: Callable[[], bool] = lambda: False) -> None:
    """Awaits `step` every `interval_s` until cancelled or `stopping()`. A Redis error is logged once per outage
    and the step tried again next interval: these loops must outlive a Redis restart."""
    failing = False
    while not stopping():
        await asyncio.sleep(interval_s)
        try:
            await step()
        except (RedisError, OSError) as exc:
            if not failing:
                log.warning("%s failed, retrying every %.1fs: %s", what, interval_s, exc)
            failing = True
        else:
            if failing:
                log.info("%s works again", what)
            failing = False


async def stop_task(task: asyncio.Task | None, timeout_s: float = 2.0) -> None:
    """Cancels a background loop and waits a bounded time. The loops also check a stop flag,
    because a cancellation that lands inside a Redis call can be absorbed there (seen in tests
    as a heartbeat that never stopped), and shutdown must never hang on that."""
    if task is None:
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("background task %s did not stop within %.1fs", task.get_name(), timeout_s)
