"""The planner core, with zero I/O: TickInput -> desired replicas per region/pool, placement and reasons.

The live service and the what-if simulator both call `Planner.tick`, so a replay exercises the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from baton.controlplane import replica_math as rm
from baton.controlplane.placement import ClusterState, Placement, PoolKey, SpillKey, place
from baton.controlplane.policy import DecodePool, Policy
from baton.controlplane.signals import SignalWindow
from baton.controlplane.sla import CapacityEstimate, HoltForecaster, replicas_for_load


@dataclass(frozen=True)
class TickInput:
    now: float
    policy: Policy
    signals: Mapping[PoolKey, SignalWindow | None]
    clusters: Mapping[str, ClusterState]


@dataclass(frozen=True)
class Decision:
    ts: float
    model: str
    region: str
    pool: str
    current: int
    desired: int
    reason: str
    proposals: dict[str, int]
    limits: tuple[str, ...]
    inputs: dict[str, float | None]

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "hold"


@dataclass(frozen=True)
class TickOutput:
    desired: dict[PoolKey, int]
    placement: Placement
    decisions: list[Decision]


@dataclass
class _PoolState:
    spec: int
    history: rm.PoolHistory
    forecaster: HoltForecaster = field(default_factory=HoltForecaster)
    capacity: CapacityEstimate | None = None


class Planner:
    """Holds per-pool memory (recommendations, forecaster, capacity estimate, last spill) between ticks."""

    def __init__(self) -> None:
        self._pools: dict[PoolKey, _PoolState] = {}
        self._spill: dict[SpillKey, int] = {}

    def tick(self, inp: TickInput) -> TickOutput:
        desired: dict[PoolKey, int] = {}
        decisions: list[Decision] = []
        for key in inp.policy.pool_keys():
            d = self._decide(inp, key)
            desired[key] = d.desired
            decisions.append(d)
        placement = place(inp.policy, desired, inp.clusters, self._spill)
        self._spill = dict(placement.spill)
        for key in list(self._pools):
            if key not in desired:
                del self._pools[key]
        return TickOutput(desired=desired, placement=placement, decisions=decisions)

    def _ready(self, inp: TickInput, key: PoolKey) -> int:
        model, region, pool = key
        names = [c.name for c in inp.policy.clusters if c.region == region]
        n = sum(inp.clusters.get(c, ClusterState()).ready.get((model, pool), 0) for c in names)
        return n + sum(k for (m, p, o, _h), k in self._spill.items() if (m, p, o) == (model, pool, region))

    def _decide(self, inp: TickInput, key: PoolKey) -> Decision:
        model, region, pool_name = key
        pol = inp.policy.pool(model, region, pool_name)
        now = inp.now
        st = self._pools.get(key)
        if st is None:
            st = self._pools[key] = _PoolState(spec=self._ready(inp, key), history=rm.PoolHistory([]))
        if st.capacity is None or st.capacity.hint != pol.capacity_tokens_per_s:
            st.capacity = CapacityEstimate(hint=pol.capacity_tokens_per_s)
        current = st.spec
        sig = inp.signals.get(key)
        proposals: dict[str, int] = {}
        limits: list[str] = []
        inputs: dict[str, float | None] = {}

        if sig is None:
            # Vanished metrics say nothing about traffic: hold, never scale down on them.
            st.history.idle_since = None
            desired = rm.clamp(current, pol.min_replicas, pol.max_replicas)
            limits.append("stale")
            reason = f"signals missing or stale; holding at {desired}"
            return self._commit(st, key, now, current, desired, reason, proposals, limits, inputs)

        load = sig.load(pool_name)
        st.forecaster.update(now, load)
        predicted = max(load, st.forecaster.forecast(pol.startup_s))
        latency = sig.latency_p90_s(pool_name)
        ready = self._ready(inp, key)
        if ready > 0:
            st.capacity.observe(load / ready, latency, pol.slo_ms / 1000)
        inputs = {"load_tokens_per_s": round(load, 3), "predicted_tokens_per_s": round(predicted, 3),
                  "capacity_per_replica": round(st.capacity.value, 3), "request_rate": round(sig.request_rate, 4),
                  "queue_depth": sig.queue_depth, "latency_p90_s": latency, "kv_utilization": sig.kv_utilization,
                  "ready": ready, "signal_age_s": round(sig.age_s, 3)}

        proposals["sla"] = rm.absolute(
            current, replicas_for_load(predicted, st.capacity.value, pol.target_utilization), pol.tolerance)
        # Guards scale what is serving now (HPA counts ready pods), so replicas still starting do not
        # compound the same breach tick after tick; they only ever push up.
        base = ready if ready > 0 else max(current, 1)
        if sig.queue_depth / base > pol.max_queue_per_replica:
            proposals["queue"] = rm.proportional(base, sig.queue_depth / base, pol.max_queue_per_replica, 0.0)
        slo_s = pol.slo_ms / 1000
        if latency is not None and latency > slo_s * (1 + pol.tolerance) and ready > 0:
            proposals["latency"] = rm.proportional(base, latency, slo_s, pol.tolerance)
        if isinstance(pol, DecodePool) and sig.kv_utilization is not None and ready > 0 \
                and sig.kv_utilization > pol.kv_target_utilization * (1 + pol.tolerance):
            proposals["kv"] = rm.proportional(base, sig.kv_utilization, pol.kv_target_utilization, pol.tolerance)
        raw = max(proposals.values())

        busy = load > 0 or sig.queue_depth > 0 or sig.request_rate > 0
        if busy:
            st.history.idle_since = None
        elif st.history.idle_since is None:
            st.history.idle_since = now
        if busy:
            raw = max(raw, 1)

        if pol.min_replicas == 0 and not busy:
            idle_for = now - st.history.idle_since
            if idle_for >= pol.idle_timeout_s:
                reason = f"idle for {idle_for:.0f}s >= idle_timeout_s {pol.idle_timeout_s:.0f}; scale to zero"
                return self._commit(st, key, now, current, 0, reason, proposals, ["idle"], inputs)
            raw = max(raw, 1 if current > 0 else 0)
        if current == 0 and raw > 0 and pol.max_replicas > 0:
            # Cold start: requests are waiting on nothing, so skip stabilisation and cooldown.
            desired = rm.clamp(rm.step_limit(current, raw, pol.scale_up, pol.scale_down), 1, pol.max_replicas)
            desired = max(desired, pol.min_replicas)
            st.history.remember(now, raw, self._horizon(pol))
            reason = f"scale from zero: {_why(proposals)}"
            return self._commit(st, key, now, current, desired, reason, proposals, ["cold-start"], inputs)

        floor = pol.min_replicas if pol.min_replicas > 0 else (1 if current > 0 else 0)
        raw = rm.clamp(raw, floor, pol.max_replicas)
        st.history.remember(now, raw, self._horizon(pol))
        n = rm.stabilize(now, current, raw, st.history, pol.scale_up, pol.scale_down)
        if n != raw:
            limits.append("stabilization")
        stepped = rm.step_limit(current, n, pol.scale_up, pol.scale_down)
        if stepped != n:
            limits.append("step")
        if rm.in_cooldown(now, current, stepped, st.history, pol.scale_up, pol.scale_down):
            limits.append("cooldown")
            stepped = current
        desired = rm.clamp(stepped, floor, pol.max_replicas)
        if desired != stepped:
            limits.append("min" if desired > stepped else "max")
        if max(proposals.values()) > pol.max_replicas and desired == pol.max_replicas:
            limits.append("max")
        reason = _why(proposals)
        if limits:
            reason += f"; limited by {', '.join(dict.fromkeys(limits))}"
        return self._commit(st, key, now, current, desired, reason, proposals, limits, inputs)

    @staticmethod
    def _horizon(pol) -> float:
        return max(pol.scale_up.stabilization_s, pol.scale_down.stabilization_s)

    def _commit(self, st: _PoolState, key: PoolKey, now: float, current: int, desired: int, reason: str,
                proposals: dict[str, int], limits: list[str], inputs: dict) -> Decision:
        if desired > current:
            st.history.last_up = now
        elif desired < current:
            st.history.last_down = now
        st.spec = desired
        model, region, pool = key
        return Decision(ts=now, model=model, region=region, pool=pool, current=current, desired=desired,
                        reason=reason, proposals=dict(proposals), limits=tuple(dict.fromkeys(limits)),
                        inputs=inputs)


def _why(proposals: dict[str, int]) -> str:
    if not proposals:
        return "no proposals"
    top = max(proposals, key=lambda k: proposals[k])
    rest = ", ".join(f"{k}={v}" for k, v in proposals.items())
    return f"{top} proposes {proposals[top]} ({rest})"


__all__ = ["ClusterState", "Decision", "Planner", "TickInput", "TickOutput"]
