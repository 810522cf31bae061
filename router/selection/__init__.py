"""Worker selection: filters -> scorers -> picker behind one Policy interface, chosen by name."""
from __future__ import annotations

from router.selection.config import RoutingConfig, ScorerWeights
from router.selection.disaggregation import ConditionalDisaggregation, PrefillDecision, Route, select_route
from router.selection.policies import POLICIES, Policy, make_policy
from router.selection.timing import LatencyRecorder, TimingHook
from router.selection.types import (CandidateScore, NoWorkerAvailable, RoutingRequest, Selection,
                                    SelectionContext, WorkerState)

__all__ = [
    "POLICIES", "CandidateScore", "ConditionalDisaggregation", "LatencyRecorder", "NoWorkerAvailable", "Policy",
    "PrefillDecision", "Route", "RoutingConfig", "RoutingRequest", "ScorerWeights", "Selection",
    "SelectionContext", "TimingHook", "WorkerState", "make_policy", "select_route",
]
