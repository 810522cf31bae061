"""Conditional disaggregation: after the decode worker is chosen, decide whether a remote prefill is
worth the KV transfer, from the tokens that worker would still have to compute (not the raw prompt)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from baton.router.selection.policies import Policy
from baton.router.selection.types import RoutingRequest, Selection, WorkerState


@dataclass(frozen=True)
class PrefillDecision:
    remote: bool
    uncached_tokens: int
    reason: str


class ConditionalDisaggregation:
    name = "conditional"

    def __init__(self, local_prefill_threshold_tokens: int) -> None:
        if local_prefill_threshold_tokens < 0:
            raise ValueError(f"local_prefill_threshold_tokens must be >= 0, got {local_prefill_threshold_tokens}")
        self.threshold = local_prefill_threshold_tokens

    def decide(self, request: RoutingRequest, decode: Selection, *, prefill_available: bool = True) -> PrefillDecision:
        uncached = request.prompt_tokens - decode.predicted_cached_tokens
        if request.local_prefill:
            return PrefillDecision(False, uncached, "the request needs a local prefill (prompt or top logprobs)")
        if uncached <= self.threshold:
            return PrefillDecision(False, uncached, f"{uncached} uncached tokens <= threshold {self.threshold}")
        if not prefill_available:
            return PrefillDecision(False, uncached, "no prefill worker available")
        return PrefillDecision(True, uncached, f"{uncached} uncached tokens > threshold {self.threshold}")


@dataclass(frozen=True)
class Route:
    decode: Selection
    prefill: Selection | None  # None: the decode worker prefills locally
    decision: PrefillDecision


def select_route(policy: Policy, decider: ConditionalDisaggregation, request: RoutingRequest,
                 workers: Sequence[WorkerState]) -> Route:
    """Decode first (it holds the request longest), then the decider, then a prefill worker if needed."""
    matches = policy.match(request)
    decode = policy.select(request, workers, "decode", matches)
    has_prefill = any(w.pool == "prefill" and w.healthy for w in workers)
    decision = decider.decide(request, decode, prefill_available=has_prefill)
    prefill = policy.select(request, workers, "prefill", matches) if decision.remote else None
    return Route(decode, prefill, decision)
