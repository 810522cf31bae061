"""SLA model: forecast token load, divide by the per-replica capacity measured at the SLO target."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HoltForecaster:
    """Holt's linear trend on the load series; forecasts `horizon_s` ahead (the replica start-up time)."""

    alpha: float = 0.6
    beta: float = 0.3
    level: float | None = None
    trend: float = 0.0  # per second
    last_t: float | None = None

    def update(self, t: float, value: float) -> None:
        if self.level is None or self.last_t is None or t <= self.last_t:
            self.level, self.last_t = value, t
            return
        dt = t - self.last_t
        prev = self.level
        self.level = self.alpha * value + (1 - self.alpha) * (prev + self.trend * dt)
        self.trend = self.beta * (self.level - prev) / dt + (1 - self.beta) * self.trend
        self.last_t = t

    def forecast(self, horizon_s: float) -> float:
        if self.level is None:
            return 0.0
        return max(0.0, self.level + self.trend * horizon_s)


@dataclass
class CapacityEstimate:
    """Per-replica tokens/s at the SLO: starts at the policy hint, lowered by what replicas actually did.

    A breach of the latency SLO at a per-replica load below the estimate lowers it towards that load; windows
    that meet the SLO let it recover towards the hint. It never rises above the hint: arrival rates measured
    before latency catches up would otherwise read as capacity. Floor hint/4 so one odd window cannot run away.
    """

    hint: float
    value: float = 0.0
    smoothing: float = 0.5
    recovery: float = 0.1

    def __post_init__(self) -> None:
        if self.value <= 0:
            self.value = self.hint

    def observe(self, load_per_replica: float, latency_p90_s: float | None, slo_s: float) -> None:
        if latency_p90_s is None or load_per_replica <= 0:
            return
        if latency_p90_s > slo_s and load_per_replica < self.value:
            self.value += self.smoothing * (load_per_replica - self.value)
        elif latency_p90_s <= slo_s:
            self.value += self.recovery * (self.hint - self.value)
        self.value = min(self.hint, max(self.hint / 4, self.value))


def replicas_for_load(load: float, capacity_per_replica: float, target_utilization: float) -> float:
    """Fractional replicas that serve `load` tokens/s at the target utilisation of measured capacity."""
    return load / (capacity_per_replica * target_utilization)
