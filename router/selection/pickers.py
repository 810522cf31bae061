"""Pickers: turn weighted totals into one choice."""
from __future__ import annotations

import random
from typing import Sequence

from baton.router.selection.types import SelectionContext, WorkerState

# Totals closer than this are a tie: float sums of the same scores in another order differ by ~1e-16.
TIE_EPSILON = 1e-9


class WeightedPicker:
    """Highest weighted total wins; ties go to a random one so equal workers share the load."""

    name = "weighted"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, ctx: SelectionContext, workers: Sequence[WorkerState], totals: Sequence[float]) -> int:
        best = max(totals)
        tied = [i for i, total in enumerate(totals) if total >= best - TIE_EPSILON]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class RoundRobinPicker:
    """Cycles through the candidates of each pool in worker-id order, ignoring scores."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn: dict[str, int] = {}

    def pick(self, ctx: SelectionContext, workers: Sequence[WorkerState], totals: Sequence[float]) -> int:
        turn = self._turn.get(ctx.pool, 0)
        self._turn[ctx.pool] = turn + 1
        order = sorted(range(len(workers)), key=lambda i: workers[i].worker_id)
        return order[turn % len(order)]
