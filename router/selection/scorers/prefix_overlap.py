"""Prefix-overlap scorer: the share of the prompt's prefill a worker would skip thanks to its cached blocks."""
from __future__ import annotations

from typing import Sequence

from baton.router.selection.types import SelectionContext, WorkerState


class PrefixOverlapScorer:
    name = "prefix_overlap"

    def score(self, ctx: SelectionContext, workers: Sequence[WorkerState]) -> list[float]:
        prompt = len(ctx.request.token_ids)
        if not prompt:
            return [0.0] * len(workers)
        block_size, get = ctx.request.block_size, ctx.matches.get
        return [min(get(w.worker_id, 0) * block_size, prompt) / prompt for w in workers]
