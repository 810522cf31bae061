"""Candidate filters: drop workers that must not get the request at all."""
from __future__ import annotations

from typing import Sequence

from baton.router.selection.types import SelectionContext, WorkerState


class PoolFilter:
    """Keeps workers of the pool being chosen (prefill and decode are chosen separately)."""

    name = "pool"

    def filter(self, ctx: SelectionContext, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return [w for w in workers if w.pool == ctx.pool]


class HealthyFilter:
    name = "healthy"

    def filter(self, ctx: SelectionContext, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return [w for w in workers if w.healthy]
