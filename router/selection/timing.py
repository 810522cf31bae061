"""Per-plugin timing: every filter, scorer, index lookup and pick reports (name, seconds) to a hook,
which the router feeds into the `baton_router_decision_latency_seconds` histogram (label = name)."""
from __future__ import annotations

from typing import Callable

TimingHook = Callable[[str, float], None]


class LatencyRecorder:
    """A TimingHook that keeps every sample in memory, for tests and benchmarks."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def __call__(self, name: str, seconds: float) -> None:
        self.samples.setdefault(name, []).append(seconds)

    def percentile(self, name: str, q: float) -> float:
        values = sorted(self.samples.get(name, ()))
        if not values:
            raise KeyError(f"no timing samples named {name!r}; have {sorted(self.samples)}")
        return values[min(len(values) - 1, int(q / 100 * len(values)))]
