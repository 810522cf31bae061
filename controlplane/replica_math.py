"""Kubernetes-HPA-style replica math: proportional proposals, stabilisation, step limits, cooldowns, clamps."""
from __future__ import annotations

import math
from dataclasses import dataclass

from baton.controlplane.policy import ScaleBehavior


def proportional(current: int, metric: float, target: float, tolerance: float) -> int:
    """ceil(current × metric / target), unchanged inside the tolerance band (HPA's formula)."""
    if target <= 0 or current <= 0:
        return current
    ratio = metric / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return math.ceil(current * ratio - 1e-9)


def with_hysteresis(current: int, needed: float, margin: float) -> int:
    """Up to ceil(needed) at once (the SLO needs it); down only to a size that still has `margin` to spare, so a
    load hovering at a replica boundary does not add and remove that replica tick after tick."""
    up = math.ceil(needed - 1e-9)
    if up >= current:
        return up
    return min(current, math.ceil(needed * (1 + margin) - 1e-9))


@dataclass
class PoolHistory:
    """What one pool's past decisions leave behind: raw recommendations and the times of last changes."""

    recommendations: list[tuple[float, int]]
    last_up: float = -math.inf
    last_down: float = -math.inf
    idle_since: float | None = None

    def remember(self, now: float, raw: int, horizon_s: float) -> None:
        self.recommendations.append((now, raw))
        self.recommendations = [(t, r) for t, r in self.recommendations if now - t <= horizon_s]


def stabilize(now: float, current: int, raw: int, history: PoolHistory, up: ScaleBehavior,
              down: ScaleBehavior, down_since: float = -math.inf) -> int:
    """HPA stabilisation: scale up only to the smallest and down only to the largest recent recommendation.
    Scaling down counts only recommendations made since `down_since` (`now`: the newest alone)."""
    up_window = [r for t, r in history.recommendations if now - t <= up.stabilization_s] + [raw]
    down_window = [r for t, r in history.recommendations
                   if now - t <= down.stabilization_s and t >= down_since] + [raw]
    result = current
    result = max(result, min(up_window))
    result = min(result, max(down_window))
    return result


def step_limit(current: int, proposed: int, up: ScaleBehavior, down: ScaleBehavior) -> int:
    if proposed > current:
        step = max(up.max_step, math.ceil(current * up.max_step_percent / 100))
        return min(proposed, current + step)
    if proposed < current:
        step = max(down.max_step, math.floor(current * down.max_step_percent / 100))
        return max(proposed, current - step)
    return proposed


def in_cooldown(now: float, current: int, proposed: int, history: PoolHistory, up: ScaleBehavior,
                down: ScaleBehavior) -> bool:
    """Scale-up waits `up.cooldown_s` after the last scale-up; scale-down waits after any change."""
    if proposed > current:
        return now - history.last_up < up.cooldown_s
    if proposed < current:
        return now - max(history.last_up, history.last_down) < down.cooldown_s
    return False


def clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))
