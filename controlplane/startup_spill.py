"""Spillover while replicas start: a region whose new replicas do not serve yet sends the share of its requests
its ready replicas cannot carry to a `spillover` region whose ready replicas have room, at the cost of a
cross-region round trip on TTFT; the share is back to zero as soon as nothing is starting.

Pure: loads, ready and desired counts in, routing shares out (merged with placement's full-cluster shares).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

from baton.contracts.worker_registry import POOLS
from baton.controlplane.capacity import CapacityModel, Load
from baton.controlplane.placement import PoolKey
from baton.controlplane.policy import Policy

# Added to the TTFT of a request served outside its region (the router's forward and the first token's way
# back): a same-continent pair is 10-30 ms, us-east <-> eu-west about 80 ms. The simulator charges it too.
CROSS_REGION_RTT_S = 0.08
# A host takes spilled prompts while the queue they build over the origin's start-up waits at most this share
# of its TTFT target (less the round trip): the rest is the request's own prefill and the ordinary wait. On the
# spike example 0.25 leaves the host's own attainment as it was (eu-west prefill 99.37%); 0.5 took it to 99.13%.
TRANSIENT_WAIT_SHARE = 0.25

Shares = dict[str, dict[str, dict[str, float]]]  # model -> origin -> host -> share of traffic


def startup_shares(policy: Policy, loads: Mapping[PoolKey, Load], ready: Mapping[PoolKey, int],
                   starting: Mapping[PoolKey, int], capacity: Callable[[PoolKey], CapacityModel]) -> Shares:
    """Per model and origin with replicas still starting after this tick and more load than its ready replicas
    serve: the share each spillover host takes, at most the rule's `max_share` in all."""
    out: Shares = {}
    for m in policy.models:
        for origin in m.regions:
            rule = policy.spill_rule(origin)
            keys = [(m.name, origin, p) for p in POOLS if (m.name, origin, p) in loads]
            if rule is None or not keys or not any(starting.get(k, 0) for k in keys):
                continue
            left = min(rule.max_share, max(_shed(policy, k, loads[k], ready.get(k, 0), capacity) for k in keys))
            for host in rule.to:
                if left <= 0 or host not in m.regions:
                    continue
                room = _room(policy, m.name, host, {k[2]: loads[k] for k in keys}, loads, ready, capacity, left)
                if room > 0:
                    out.setdefault(m.name, {}).setdefault(origin, {})[host] = round(room, 4)
                    left -= room
    return out


def merge(a: Shares, b: Shares) -> Shares:
    """The larger share per (model, origin, host): routers spill whole requests."""
    out = {m: {o: dict(h) for o, h in origins.items()} for m, origins in a.items()}
    for m, origins in b.items():
        for o, hosts in origins.items():
            mine = out.setdefault(m, {}).setdefault(o, {})
            for h, s in hosts.items():
                mine[h] = max(mine.get(h, 0.0), s)
    return out


def _shed(policy: Policy, key: PoolKey, load: Load, ready: int, capacity: Callable[[PoolKey], CapacityModel]) -> float:
    """The share of `load` beyond what `ready` replicas serve flat out."""
    model, region, pool = key
    tokens = load.tokens(pool)
    if tokens <= 0:
        return 0.0
    slo_s = policy.pool(model, region, pool).slo_ms / 1000
    return max(0.0, 1 - ready * capacity(key).busy_rate(load, slo_s) / tokens)


def _room(policy: Policy, model: str, host: str, spilled: Mapping[str, Load], loads: Mapping[PoolKey, Load],
          ready: Mapping[PoolKey, int], capacity: Callable[[PoolKey], CapacityModel], most: float) -> float:
    """The largest share (up to `most`) of the origin's loads that the host's ready replicas take on top of their
    own, found by bisection (fits is monotone in the share)."""
    def fits(share: float) -> bool:
        for pool, extra in spilled.items():
            key = (model, host, pool)
            if key not in loads:
                return False
            pol = policy.pool(model, host, pool)
            load, n, cap = loads[key].plus(extra.scaled(share)), ready.get(key, 0), capacity(key)
            slo_s = pol.slo_ms / 1000
            if pool == "prefill":
                # Only for the origin's start-up: the fluid queue built meanwhile must wait within budget.
                budget = TRANSIENT_WAIT_SHARE * (slo_s - CROSS_REGION_RTT_S)
                serve = n * cap.busy_rate(load, slo_s)
                if (load.tokens(pool) - serve) * pol.startup_s > budget * serve:
                    return False
            elif cap.replicas(load, slo_s) > n + 1e-9:
                return False
        return True

    if not fits(0.0):
        return 0.0
    lo, hi = 0.0, most
    if fits(hi):
        return hi
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
