"""What-if simulator: replays a trace through the live `Planner`, the oracle and static peak provisioning, each
in the same physical model of the pools, and reports GPU-hours, SLO attainment and scale events side by side.

Physics per region, from the capacity profile (or the flat `capacity_tokens_per_s`):
- prefill is one FIFO of prompts served at ready replicas x the profile's busy throughput, tick by tick (a
  queued prompt starts sooner once new replicas serve); TTFT = the wait plus the request's own prompt at the
  profile's rate for its size;
- decode gets a request when its prefill ends (the prompt's KV is handed over), not when it arrives: a prefill
  queue holds back decode's load, and new prefill replicas draining it release it all at once. Each tick it
  runs the concurrency that serves the output tokens of the requests starting then (Little's law) at the
  profile's ITL for that concurrency and their context; what the KV pools cannot hold waits for admission, and
  that wait is spread over the request's tokens.
Replicas hold GPUs from the moment they are asked for and serve `startup_s` later. The oracle has, each tick,
the fewest replicas the capacity model says meet the SLO at that tick's own load, ready at once; static
provisioning holds the oracle's peak all the time. A request the planner's world serves outside its own region
(spillover) pays CROSS_REGION_RTT_S on its TTFT. SLO attainment counts each request's two checks, TTFT (its
region's prefill pool) and ITL (decode); the share of requests meeting both is reported beside it.
"""
from __future__ import annotations

import itertools
import math
import pathlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from baton.contracts.worker_registry import POOLS
from baton.controlplane.capacity import Load
from baton.controlplane.placement import ClusterState, place
from baton.controlplane.planner import Planner, TickInput
from baton.controlplane.policy import Policy
from baton.controlplane.replay_pools import DecodeServer, Fleet, PrefillServer, RegionQueues
from baton.controlplane.signals import Interval, SignalWindow, p90
from baton.controlplane.startup_spill import CROSS_REGION_RTT_S
from baton.controlplane.trace import Trace

WORLDS = ("planner", "oracle", "static")


@dataclass
class PoolResult:
    gpu_hours: dict[str, float] = field(default_factory=lambda: dict.fromkeys(WORLDS, 0.0))
    met: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORLDS, 0))
    total: int = 0
    events: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORLDS, 0))
    peak: int = 0  # static provisioning: the oracle's largest count
    max_replicas: int = 0  # the planner's largest count

    def attainment(self, world: str = "planner") -> float:
        return self.met[world] / self.total if self.total else 1.0

    def ratio(self, world: str) -> float:
        return self.gpu_hours["planner"] / self.gpu_hours[world] if self.gpu_hours[world] else math.nan

    def add(self, other: PoolResult) -> None:
        for w in WORLDS:
            self.gpu_hours[w] += other.gpu_hours[w]
            self.met[w] += other.met[w]
            self.events[w] += other.events[w]
        self.total += other.total
        self.peak += other.peak
        self.max_replicas += other.max_replicas


@dataclass
class SimResult:
    pools: dict[tuple[str, str, str], PoolResult]
    hours: float
    series: dict[str, list]  # t, and per "region/pool" replicas, oracle and requests/s, for the plot
    both: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WORLDS, 0))  # requests meeting TTFT and ITL
    requests: int = 0

    def request_attainment(self, world: str = "planner") -> float:
        """The share of requests that met both their TTFT and their ITL target (the pools' checks count each
        target on its own)."""
        return self.both[world] / self.requests if self.requests else 1.0

    def total(self) -> PoolResult:
        out = PoolResult()
        for r in self.pools.values():
            out.add(r)
        return out

    def to_dict(self) -> dict:
        def one(r: PoolResult) -> dict:
            return {**asdict(r), "attainment": {w: r.attainment(w) for w in WORLDS},
                    "over_oracle": r.ratio("oracle"), "over_static": r.ratio("static"),
                    "events_per_hour": r.events["planner"] / self.hours if self.hours else 0.0}
        return {"hours": self.hours, "pools": {"/".join(k): one(r) for k, r in sorted(self.pools.items())},
                "total": one(self.total()), "requests": self.requests,
                "request_attainment": {w: self.request_attainment(w) for w in WORLDS}}


def _tick_load(sel: np.ndarray, trace: Trace, dt: float) -> Load:
    return Load(float(sel.sum()) / dt, float(trace.prompt[sel].sum()) / dt, float(trace.output[sel].sum()) / dt)


def _oracle_counts(policy: Policy, trace: Trace, bounds: np.ndarray, dt: float) -> dict[tuple, list[int]]:
    """Per tick and pool: the fewest replicas the capacity model says meet the SLO at that tick's load."""
    out: dict[tuple, list[int]] = {}
    for mi, m in enumerate(trace.models):
        for r in policy.model(m).regions:
            ri = trace.regions.index(r) if r in trace.regions else -1
            mine = (trace.model == mi) & (trace.region == ri)
            for p in POOLS:
                pol, cap = policy.pool(m, r, p), policy.capacity_model(m, r, p)
                counts = []
                for a, b in itertools.pairwise(bounds):
                    need = cap.replicas(_tick_load(mine[a:b], _Slice(trace, a, b), dt), pol.slo_ms / 1000)
                    n = pol.max_replicas if not math.isfinite(need) else math.ceil(need - 1e-9)
                    counts.append(max(pol.min_replicas, min(pol.max_replicas, n)))
                out[(m, r, p)] = counts
    return out


class _Slice:
    """Trace columns between two indices, so a boolean mask over that range selects from them."""

    def __init__(self, trace: Trace, a: int, b: int) -> None:
        self.prompt, self.output = trace.prompt[a:b], trace.output[a:b]


def simulate(policy: Policy, trace: Trace) -> SimResult:
    """Ticks every `tick_s` over the trace: the planner sees the signals of its own world; all three worlds
    serve the same requests."""
    dt = policy.tick_s
    start = float(trace.t[0])
    ticks = max(1, math.ceil((float(trace.t[-1]) - start) / dt + 1e-9))
    bounds = np.searchsorted(trace.t, start + dt * np.arange(ticks + 1), side="left")
    bounds[-1] = len(trace.t)
    # Traces hold generation requests: an embed pool is planned (on no signals, so held) but not replayed.
    keys = [k for k in policy.pool_keys() if k[0] in trace.models and k[2] in POOLS]
    pairs = sorted({(m, r) for m, r, _p in keys})
    oracle = _oracle_counts(policy, trace, bounds, dt)
    results = {k: PoolResult(peak=max(oracle[k])) for k in keys}
    prefill = {(m, r): PrefillServer(policy, m, r) for m, r in pairs}
    decode = {(m, r): DecodeServer(policy, m, r) for m, r in pairs}
    state = {w: {pair: RegionQueues() for pair in pairs} for w in WORLDS}
    fleets: dict[tuple[str, str, str], Fleet] = defaultdict(Fleet)  # planner: (cluster, model, pool)
    region_of = {c.name: c.region for c in policy.clusters}
    window = max(1, round(policy.signals.window_s / dt))
    recent: dict[tuple[str, str], list[tuple[int, float, float, np.ndarray, np.ndarray]]] = defaultdict(list)
    spill_carry: dict[tuple[str, str, str], float] = defaultdict(float)
    shares: dict[str, dict[str, dict[str, float]]] = {}
    series: dict[str, list] = defaultdict(list)
    first_ok = {w: np.zeros(len(trace), dtype=bool) for w in WORLDS}  # per request: its TTFT met the target
    both = dict.fromkeys(WORLDS, 0)
    planner = Planner()

    # Start warm: the first window's fleet at the policy's headroom, placed as the planner places, so the run is
    # about reacting, not booting.
    first = bounds[min(ticks, window)]
    initial = {}
    for m, r, p in keys:
        mine = (trace.model[:first] == trace.models.index(m)) & (trace.region[:first] == _index(trace.regions, r))
        span = max(dt, min(policy.signals.window_s, float(trace.t[first - 1]) - start))
        load = _tick_load(mine, _Slice(trace, 0, first), span)
        pol = policy.pool(m, r, p)
        need = policy.capacity_model(m, r, p).replicas(load.scaled(1 / pol.target_utilization), pol.slo_ms / 1000)
        n = pol.max_replicas if not math.isfinite(need) else math.ceil(need - 1e-9)
        initial[(m, r, p)] = max(pol.min_replicas, min(pol.max_replicas, n))
    for (cname, m, p), n in place(policy, initial, {}, {}).targets.items():
        if n:
            fleets[(cname, m, p)].ready = n

    for k in range(ticks):
        t0 = start + k * dt
        a, b = int(bounds[k]), int(bounds[k + 1])
        for fleet in fleets.values():
            fleet.advance(t0)
        t, rg, md = trace.t[a:b], trace.region[a:b], trace.model[a:b]
        _account(policy, keys, fleets, oracle, results, series, k, dt, rg, trace)
        prompt, output = trace.prompt[a:b], trace.output[a:b]
        host = _route(rg, md, trace, shares, spill_carry)
        counts = {
            "planner": {(m, r, p): sum(fleets[(c.name, m, p)].ready for c in policy.clusters if c.region == r)
                        for m, r, p in keys},
            "oracle": {key: oracle[key][k] for key in keys},
            "static": {key: results[key].peak for key in keys},
        }
        last = k + 1 == ticks
        for m, r in pairs:
            mi, ri = trace.models.index(m), _index(trace.regions, r)
            origin = (md == mi) & (rg == ri)
            for w in WORLDS:
                world = state[w][(m, r)]
                served = ((md == mi) & (host == ri)) if w == "planner" else origin
                pre = prefill[(m, r)]
                first, ttft = world.prefill(a + np.flatnonzero(served), t[served], prompt[served],
                                            pre.own_s(prompt[served]), counts[w][(m, r, "prefill")] * pre.busy,
                                            t0, dt, last)
                world.hand_off(trace.t[first] + ttft, first)
                # The run's last tick decodes every request still waiting, so each has both checks.
                started, prefilled_at = world.take(math.inf if last else t0 + dt)
                itl = _decode(world, decode[(m, r)], trace, started, counts[w][(m, r, "decode")], dt)
                itl[np.isinf(prefilled_at)] = math.inf  # never prefilled: never decoded
                if w == "planner":  # a request served in another region pays the round trip on its TTFT
                    ttft = ttft + CROSS_REGION_RTT_S * (trace.region[first] != ri)
                # Results belong to the requests' own region, wherever they were served.
                first_ok[w][first] = _tally(policy, m, trace, results, w, "prefill", trace.region[first], ttft)
                itl_ok = _tally(policy, m, trace, results, w, "decode", trace.region[started], itl)
                both[w] += int(np.count_nonzero(first_ok[w][started] & itl_ok))
                if w == "planner":  # latencies are reported once known: TTFT at the first token
                    recent[(m, r)].append((int(origin.sum()), float(prompt[origin].sum()),
                                           float(output[origin].sum()), ttft[trace.region[first] == ri],
                                           itl[trace.region[started] == ri]))
                    del recent[(m, r)][:-window]

        now = t0 + dt
        signals = {}
        for m, r, p in keys:
            entries = recent[(m, r)]
            span = min(policy.signals.window_s, now - start)
            n_req = sum(e[0] for e in entries)
            world = state["planner"][(m, r)]
            mean = (sum(e[1] for e in entries) if p == "prefill" else sum(e[2] for e in entries)) / max(1, n_req)
            backlog = world.prefill_backlog if p == "prefill" else world.decode_backlog
            signals[(m, r, p)] = SignalWindow(
                request_rate=n_req / span, prompt_tokens_per_s=sum(e[1] for e in entries) / span,
                output_tokens_per_s=sum(e[2] for e in entries) / span,
                queue_depth=backlog / mean if mean > 0 else 0.0,
                ttft_p90_s=p90(np.minimum(np.concatenate([e[3] for e in entries]), 3600.0).tolist()),
                itl_p90_s=p90(np.minimum(np.concatenate([e[4] for e in entries]), 3600.0).tolist()),
                kv_utilization=world.kv_utilization if counts["planner"][(m, r, "decode")] else None,
                recent=Interval(dt, *entries[-1][:3]) if window > 1 else None)
        clusters = {c.name: ClusterState(ready={(m, p): fleets[(c.name, m, p)].ready for m, _r, p in keys})
                    for c in policy.clusters}
        out = planner.tick(TickInput(now=now, policy=policy, signals=signals, clusters=clusters))
        shares = out.placement.shares
        for d in out.decisions:
            if (d.model, d.region, d.pool) in results and d.direction != "hold":
                results[(d.model, d.region, d.pool)].events["planner"] += 1
        for (cname, m, p), n in out.placement.targets.items():
            if (cname, m, p) in fleets or n:
                fleets[(cname, m, p)].set_target(now, n, policy.pool(m, region_of[cname], p).startup_s)

    requests = int(np.count_nonzero(np.isin(trace.model, [trace.models.index(m) for m, _r in pairs])))
    return SimResult(pools=results, hours=ticks * dt / 3600, series=dict(series), both=both, requests=requests)


def _account(policy: Policy, keys, fleets, oracle, results, series, k: int, dt: float, rg, trace: Trace) -> None:
    """GPU-hours of this tick's interval in each world (replicas still starting hold their GPUs), and the plot."""
    series["t"].append(k * dt)
    for m, r, p in keys:
        g = policy.pool(m, r, p).gpus_per_replica * dt / 3600
        res = results[(m, r, p)]
        provisioned = sum(fleets[(c.name, m, p)].provisioned for c in policy.clusters if c.region == r)
        res.gpu_hours["planner"] += provisioned * g
        res.gpu_hours["oracle"] += oracle[(m, r, p)][k] * g
        res.gpu_hours["static"] += res.peak * g
        res.max_replicas = max(res.max_replicas, provisioned)
        if k and oracle[(m, r, p)][k] != oracle[(m, r, p)][k - 1]:
            res.events["oracle"] += 1
        series[f"{r}/{p}"].append(provisioned)
        series[f"{r}/{p}/oracle"].append(oracle[(m, r, p)][k])
    for r in policy.regions():
        series[f"{r}/rps"].append(int(np.count_nonzero(rg == _index(trace.regions, r))) / dt)


def _index(names: tuple[str, ...], name: str) -> int:
    return names.index(name) if name in names else -1


def _route(region: np.ndarray, model: np.ndarray, trace: Trace, shares: dict, carry: dict) -> np.ndarray:
    """Host region of each request: its own, except every 1/share-th one spilled where the placement says."""
    host = region.copy()
    for m, origins in shares.items():
        if m not in trace.models:
            continue
        for origin, hosts in origins.items():
            idx = np.flatnonzero((model == trace.models.index(m)) & (region == _index(trace.regions, origin)))
            for h, share in hosts.items():
                if h not in trace.regions or not len(idx):
                    continue
                acc = carry[(m, origin, h)] + share * np.arange(1, len(idx) + 1)
                moved = np.floor(acc) > np.floor(np.concatenate(([carry[(m, origin, h)]], acc[:-1])))
                carry[(m, origin, h)] = float(acc[-1] % 1.0)
                host[idx[moved]] = trace.regions.index(h)
                idx = idx[~moved]
    return host


def _decode(world: RegionQueues, dec: DecodeServer, trace: Trace, started: np.ndarray, replicas: int,
            dt: float) -> np.ndarray:
    prompt, output = trace.prompt[started], trace.output[started]
    context = float((prompt + output / 2).mean()) if len(started) else 0.0
    return world.decode(dec, output, context, replicas, dt)


def _tally(policy: Policy, model: str, trace: Trace, results: dict, world: str, pool: str, origin: np.ndarray,
           latency: np.ndarray) -> np.ndarray:
    """Counts each request's check against its own region's target for `pool`; True where it was met."""
    ok = np.zeros(len(latency), dtype=bool)
    for r in policy.model(model).regions:
        mask = origin == _index(trace.regions, r)
        if not mask.any():
            continue
        ok[mask] = latency[mask] <= policy.pool(model, r, pool).slo_ms / 1000 + 1e-9
        res = results[(model, r, pool)]
        res.met[world] += int(np.count_nonzero(ok[mask]))
        if world == "planner":
            res.total += int(np.count_nonzero(mask))
    return ok


def plot(result: SimResult, policy: Policy, path: str | pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = policy.regions()
    fig, axes = plt.subplots(len(regions), 1, figsize=(10, 3.2 * len(regions)), sharex=True, squeeze=False)
    hours = [x / 3600 for x in result.series["t"]]
    for ax, r in zip(axes[:, 0], regions):
        for p, style in (("prefill", "-"), ("decode", "--")):
            if f"{r}/{p}" in result.series:
                ax.plot(hours, result.series[f"{r}/{p}"], style, label=f"{p} replicas")
                ax.plot(hours, result.series[f"{r}/{p}/oracle"], style, alpha=0.35, label=f"{p} oracle")
        ax.set_ylabel(f"{r}\nreplicas")
        load = ax.twinx()
        load.fill_between(hours, result.series.get(f"{r}/rps", [0] * len(hours)), color="grey", alpha=0.2)
        load.set_ylabel("requests/s")
        ax.legend(loc="upper left", fontsize=7)
    axes[-1, 0].set_xlabel("hours")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(result: SimResult) -> str:
    """The table `baton policy simulate` prints: planner against oracle and static peak, per pool and total."""
    lines = [(f"{'model':<12} {'region':<9} {'pool':<8} {'GPU-h':>8} {'oracle':>8} {'static':>8} {'/oracle':>8} "
              f"{'/static':>8} {'SLO':>8} {'oracle':>8} {'static':>8} {'events':>7} {'/hour':>6} {'max':>4} "
              f"{'peak':>4}")]
    rows = [(*k, r) for k, r in sorted(result.pools.items())] + [("total", "", "", result.total())]
    for model, region, pool, r in rows:
        g = r.gpu_hours
        lines.append(f"{model:<12} {region:<9} {pool:<8} {g['planner']:>8.2f} {g['oracle']:>8.2f} "
                     f"{g['static']:>8.2f} {r.ratio('oracle'):>8.3f} {r.ratio('static'):>8.3f} "
                     f"{r.attainment():>8.2%} {r.attainment('oracle'):>8.2%} {r.attainment('static'):>8.2%} "
                     f"{r.events['planner']:>7d} {r.events['planner'] / result.hours:>6.2f} "
                     f"{r.max_replicas:>4d} {r.peak:>4d}")
    t = result.total()
    lines.append(f"{result.hours:.2f} h: GPU-hours {t.gpu_hours['planner']:.2f} = {t.ratio('oracle'):.3f}x oracle "
                 f"({t.gpu_hours['oracle']:.2f}), {t.ratio('static'):.3f}x static peak ({t.gpu_hours['static']:.2f}); "
                 f"SLO attainment {t.attainment():.4f} (oracle {t.attainment('oracle'):.4f}, static "
                 f"{t.attainment('static'):.4f}); scale events {t.events['planner']} "
                 f"({t.events['planner'] / result.hours:.2f}/h)")
    lines.append(f"requests meeting both TTFT and ITL targets: {result.request_attainment():.4f} (oracle "
                 f"{result.request_attainment('oracle'):.4f}, static {result.request_attainment('static'):.4f})")
    return "\n".join(lines)
