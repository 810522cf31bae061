"""Prefix-overlap scorer: the share of the prompt's prefill a worker would skip thanks to its cached blocks."""
from __future__ import annotations

from typing import Sequence

from router.selection.types import SelectionContext, WorkerState


class PrefixOverlapScorer:
    name = "prefix_overlap"

    def score(self, ctx: SelectionContext, workers: Sequence[WorkerState]) -> list[float]:
        request = ctx.request
        prompt = max(1, request.prompt_tokens)
        return [request.cached_tokens(ctx.matches.get(w.worker_id, 0)) / prompt for w in workers]
