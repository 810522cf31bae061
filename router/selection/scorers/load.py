"""Load scorer: how free a worker is, in the units that delay this request on its pool."""
from __future__ import annotations

from typing import Sequence

from baton.router.selection.types import SelectionContext, WorkerState


class LoadScorer:
    """Prefill workers: P / (P + queued prefill tokens), with P the prompt length, i.e. the share of the
    worker's pending prefill work that is this request; it halves once the queue is as long as the
    prompt, so with the default weights (overlap 1, load 2) a worker holding the whole prompt still
    wins until its queue exceeds the prompt — the point where waiting costs more than recomputing.

    Decode workers: the mean of free KV blocks (after this request's uncached blocks), free batch
    slots, and the same prefill term for prompts they prefill locally. Unknown capacities (0) count
    as free, so a worker that reports nothing is not punished.
    """

    name = "load"

    def score(self, ctx: SelectionContext, workers: Sequence[WorkerState]) -> list[float]:
        prompt = max(1, ctx.request.prompt_tokens)
        if ctx.pool == "prefill":
            return [prompt / (prompt + w.queued_prefill_tokens) for w in workers]
        blocks = -(-ctx.request.prompt_tokens // ctx.request.block_size)
        out = []
        for w in workers:
            needed = max(0, blocks - ctx.matches.get(w.worker_id, 0))
            kv_used = min(1.0, (w.active_kv_blocks + needed) / w.total_kv_blocks) if w.total_kv_blocks else 0.0
            batch_used = min(1.0, w.running_requests / w.capacity) if w.capacity else 0.0
            prefill_free = prompt / (prompt + w.queued_prefill_tokens)
            out.append(((1.0 - kv_used) + (1.0 - batch_used) + prefill_free) / 3.0)
        return out
