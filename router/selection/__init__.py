"""Worker selection: filters -> scorers -> picker behind one Policy interface, chosen by name."""
from __future__ import annotations

from baton.router.selection.config import POLICY_NAMES, RoutingConfig, ScorerWeights
from baton.router.selection.disaggregation import ConditionalDisaggregation, PrefillDecision, Route, select_route
from baton.router.selection.policies import POLICIES, Policy, make_policy
from baton.router.selection.timing import LatencyRecorder, TimingHook
from baton.router.selection.types import (
    CandidateScore,
    NoWorkerAvailable,
    RoutingRequest,
    Selection,
    SelectionContext,
    WorkerState,
)

__all__ = [
    "POLICIES", "POLICY_NAMES", "CandidateScore", "ConditionalDisaggregation", "LatencyRecorder", "NoWorkerAvailable", "Policy",
    "PrefillDecision", "Route", "RoutingConfig", "RoutingRequest", "ScorerWeights", "Selection",
    "SelectionContext", "TimingHook", "WorkerState", "make_policy", "select_route",
]
