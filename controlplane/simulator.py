"""What-if simulator: replays a request trace through the live `Planner` and a fluid queueing model.

Prefill is a FIFO of prompt tokens served at ready replicas x per-replica tokens/s; TTFT = wait + own prefill.
Decode ITL rises with utilisation and with admission wait spread over the request's tokens. New replicas
become ready `startup_s` after they are asked for and use GPUs from that moment. The oracle knows each tick's
load in advance and has exactly enough replicas, ready at once.
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import pathlib
from collections import defaultdict
from dataclasses import dataclass, field

from baton.contracts.worker_registry import POOLS
from baton.controlplane.placement import ClusterState
from baton.controlplane.planner import Planner, TickInput
from baton.controlplane.policy import Policy
from baton.controlplane.signals import SignalWindow, p90
from baton.controlplane.sla import replicas_for_load


class TraceError(Exception):
    """A trace row that cannot be read; the message names file and line."""


@dataclass(frozen=True)
class Request:
    t: float
    region: str
    prompt_tokens: int
    output_tokens: int
    model: str


def load_trace(path: str | pathlib.Path, default_model: str) -> list[Request]:
    """CSV (or .csv.gz) with header timestamp,region,prompt_tokens,output_tokens[,model]; times in seconds."""
    path = pathlib.Path(path)
    try:
        handle = (io.TextIOWrapper(gzip.open(path), newline="") if path.suffix == ".gz"
                  else path.open(newline=""))
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    out = []
    with handle:
        reader = csv.DictReader(handle)
        missing = {"timestamp", "region", "prompt_tokens", "output_tokens"} - set(reader.fieldnames or ())
        if missing:
            raise TraceError(f"{path}:1: header lacks {', '.join(sorted(missing))}")
        for row in reader:
            try:
                out.append(Request(float(row["timestamp"]), row["region"], int(row["prompt_tokens"]),
                                   int(row["output_tokens"]), row.get("model") or default_model))
            except (TypeError, ValueError):
                raise TraceError(f"{path}:{reader.line_num}: bad row {row}") from None
    if not out:
        raise TraceError(f"{path}: no requests")
    out.sort(key=lambda r: r.t)
    return out


@dataclass
class _Queue:
    """Fluid FIFO of one pool in one region: `backlog` tokens drain at the region's ready capacity."""

    backlog: float = 0.0
    t: float = 0.0

    def advance(self, t: float, rate: float) -> None:
        self.backlog = max(0.0, self.backlog - rate * max(0.0, t - self.t))
        self.t = t


@dataclass
class _Replicas:
    ready: int = 0
    pending: list[tuple[float, int]] = field(default_factory=list)

    @property
    def provisioned(self) -> int:
        return self.ready + sum(n for _t, n in self.pending)

    def advance(self, now: float) -> None:
        self.ready += sum(n for t, n in self.pending if t <= now)
        self.pending = [(t, n) for t, n in self.pending if t > now]

    def set_target(self, now: float, n: int, startup_s: float) -> None:
        if n > self.provisioned:
            self.pending.append((now + startup_s, n - self.provisioned))
            return
        excess = self.provisioned - n
        while excess and self.pending:  # cancel the newest not-yet-ready replicas first
            t, k = self.pending.pop()
            if k > excess:
                self.pending.append((t, k - excess))
            excess -= min(k, excess)
        self.ready -= excess


@dataclass
class PoolResult:
    gpu_hours: float = 0.0
    met: int = 0
    total: int = 0
    oracle_gpu_hours: float = 0.0
    oracle_met: int = 0

    @property
    def attainment(self) -> float:
        return self.met / self.total if self.total else 1.0

    @property
    def oracle_attainment(self) -> float:
        return self.oracle_met / self.total if self.total else 1.0


@dataclass
class SimResult:
    pools: dict[tuple[str, str, str], PoolResult]
    series: dict[str, list]  # t, and per "region/pool" replicas and load for the plot

    def total(self) -> PoolResult:
        out = PoolResult()
        for r in self.pools.values():
            out.gpu_hours += r.gpu_hours
            out.oracle_gpu_hours += r.oracle_gpu_hours
            out.met += r.met
            out.total += r.total
            out.oracle_met += r.oracle_met
        return out


class _World:
    """The physical side: replicas per cluster, queues per region, for either the planner or the oracle."""

    def __init__(self, policy: Policy, capacity: dict[str, float]) -> None:
        self.policy = policy
        self.capacity = capacity
        self.replicas: dict[tuple[str, str, str], _Replicas] = defaultdict(_Replicas)
        self.queues: dict[tuple[str, str, str], _Queue] = defaultdict(_Queue)

    def region_ready(self, model: str, region: str, pool: str) -> int:
        return sum(self.replicas[(c.name, model, pool)].ready for c in self.policy.clusters if c.region == region)

    def prefill(self, req: Request, host: str) -> float:
        """TTFT of one request: FIFO wait behind the region's prompt backlog plus its own prefill."""
        cap = self.capacity["prefill"]
        q = self.queues[(req.model, host, "prefill")]
        rate = self.region_ready(req.model, host, "prefill") * cap
        q.advance(req.t, rate)
        ttft = (q.backlog / rate + req.prompt_tokens / cap) if rate > 0 else math.inf
        q.backlog += req.prompt_tokens
        return ttft

    def decode_tick(self, model: str, host: str, tokens: float, dt: float) -> float:
        """Decode utilisation of one tick, backlog included; what exceeds capacity carries over."""
        q = self.queues[(model, host, "decode")]
        capacity = self.region_ready(model, host, "decode") * self.capacity["decode"] * dt
        work = q.backlog + tokens
        q.backlog = max(0.0, work - capacity)
        if work == 0:
            return 0.0
        return work / capacity if capacity > 0 else math.inf


def _itl(slo_s: float, rho: float) -> float:
    """ITL grows with batch occupancy up to the SLO at full capacity, and beyond it in proportion."""
    return slo_s * (0.5 + 0.5 * min(rho, 1.0)) * max(1.0, rho)


def _capacity(policy: Policy, override: dict[str, float] | None) -> dict[str, float]:
    first = policy.models[0]
    region = next(iter(first.regions))
    cap = {p: policy.pool(first.name, region, p).capacity_tokens_per_s for p in POOLS}
    for p in POOLS:
        if override and f"{p}_tokens_per_s" in override:
            cap[p] = float(override[f"{p}_tokens_per_s"])
    return cap


def simulate(policy: Policy, trace: list[Request], capacity: dict[str, float] | None = None) -> SimResult:
    """Runs the planner (every tick_s) and the oracle side by side over the trace."""
    cap = _capacity(policy, capacity)
    dt = policy.tick_s
    planner = Planner()
    live, oracle = _World(policy, cap), _World(policy, cap)
    keys = policy.pool_keys()
    results = {k: PoolResult() for k in keys}
    series: dict[str, list] = defaultdict(list)
    recent: list[tuple[Request, float, float]] = []  # (request, ttft, itl) within the signal window
    spill_acc: dict[tuple[str, str], float] = defaultdict(float)
    shares: dict[str, dict[str, dict[str, float]]] = {}
    start, end = trace[0].t, trace[-1].t
    # Queue depth is reported in requests, as workers do: backlog tokens over the trace's mean request size.
    mean_tokens = {"prefill": max(1.0, sum(q.prompt_tokens for q in trace) / len(trace)),
                   "decode": max(1.0, sum(q.output_tokens for q in trace) / len(trace))}
    # Start warm: the first tick's right-sized fleet, so the comparison is about reacting, not cold start.
    for m, r, p in keys:
        pol = policy.pool(m, r, p)
        tokens = sum(q.prompt_tokens if p == "prefill" else q.output_tokens
                     for q in trace if q.t < start + policy.signals.window_s and (q.model, q.region) == (m, r))
        need = math.ceil(replicas_for_load(tokens / policy.signals.window_s, cap[p], pol.target_utilization))
        home = next(c.name for c in policy.clusters if c.region == r)
        live.replicas[(home, m, p)].ready = max(pol.min_replicas, min(pol.max_replicas, need))
    i = 0
    t = start
    while t <= end:
        batch = []
        while i < len(trace) and trace[i].t < t + dt:
            batch.append(trace[i])
            i += 1
        for w in (live, oracle):
            for rep in w.replicas.values():
                rep.advance(t)
        # Oracle: exactly enough replicas for this tick's own traffic, ready now.
        for m, r, p in keys:
            pol = policy.pool(m, r, p)
            tokens = sum(q.prompt_tokens if p == "prefill" else q.output_tokens
                         for q in batch if q.region == r and q.model == m)
            need = math.ceil(tokens / (dt * cap[p]) - 1e-9)
            need = max(pol.min_replicas, min(pol.max_replicas, need))
            home = next(c.name for c in policy.clusters if c.region == r)
            oracle.replicas[(home, m, p)] = _Replicas(ready=need)
            results[(m, r, p)].oracle_gpu_hours += need * pol.gpus_per_replica * dt / 3600
        # Live: route with the spillover shares of the last tick, then serve.
        routed = []
        for q in batch:
            host = q.region
            for h, s in shares.get(q.model, {}).get(q.region, {}).items():
                spill_acc[(q.region, h)] += s
                if spill_acc[(q.region, h)] >= 1.0:
                    spill_acc[(q.region, h)] -= 1.0
                    host = h
                    break
            routed.append((q, host))
        rho_live, rho_oracle = {}, {}
        for m, r, _p in keys:
            rho_live[(m, r)] = live.decode_tick(m, r, sum(q.output_tokens for q, h in routed if (q.model, h) == (m, r)), dt)
            rho_oracle[(m, r)] = oracle.decode_tick(
                m, r, sum(q.output_tokens for q in batch if (q.model, q.region) == (m, r)), dt)
        for q, host in routed:
            slo_d = policy.pool(q.model, q.region, "decode").slo_ms / 1000
            ttft, itl = live.prefill(q, host), _itl(slo_d, rho_live[(q.model, host)])
            o_ttft, o_itl = oracle.prefill(q, q.region), _itl(slo_d, rho_oracle[(q.model, q.region)])
            recent.append((q, ttft, itl))
            for p, lat, o_lat in (("prefill", ttft, o_ttft), ("decode", itl, o_itl)):
                res = results[(q.model, q.region, p)]
                slo = policy.pool(q.model, q.region, p).slo_ms / 1000
                res.total += 1
                res.met += lat <= slo + 1e-9
                res.oracle_met += o_lat <= slo + 1e-9
        t += dt
        window = policy.signals.window_s
        recent = [x for x in recent if x[0].t >= t - window]
        signals = {}
        for m, r, p in keys:
            mine = [x for x in recent if x[0].region == r and x[0].model == m]
            ready_d = live.region_ready(m, r, "decode")
            span = min(window, t - start)
            signals[(m, r, p)] = SignalWindow(
                request_rate=len(mine) / span,
                prompt_tokens_per_s=sum(x[0].prompt_tokens for x in mine) / span,
                output_tokens_per_s=sum(x[0].output_tokens for x in mine) / span,
                queue_depth=live.queues[(m, r, p)].backlog / mean_tokens[p],
                ttft_p90_s=p90([min(x[1], 3600.0) for x in mine]),
                itl_p90_s=p90([min(x[2], 3600.0) for x in mine]),
                kv_utilization=min(1.0, rho_live[(m, r)]) if ready_d else None,
            )
        clusters = {c.name: ClusterState(ready={(m, p): live.replicas[(c.name, m, p)].ready for m, _r, p in keys})
                    for c in policy.clusters}
        out = planner.tick(TickInput(now=t, policy=policy, signals=signals, clusters=clusters))
        shares = out.placement.shares
        for (cname, m, p), n in out.placement.targets.items():
            region = next(c.region for c in policy.clusters if c.name == cname)
            live.replicas[(cname, m, p)].set_target(t, n, policy.pool(m, region, p).startup_s)
        series["t"].append(t - start)
        for m, r, p in keys:
            pol = policy.pool(m, r, p)
            provisioned = sum(live.replicas[(c.name, m, p)].provisioned for c in policy.clusters if c.region == r)
            results[(m, r, p)].gpu_hours += provisioned * pol.gpus_per_replica * dt / 3600
            series[f"{r}/{p}"].append(provisioned)
            series[f"{r}/{p}/oracle"].append(oracle.region_ready(m, r, p))
        for r in policy.regions():
            series[f"{r}/rps"].append(sum(1 for q in batch if q.region == r) / dt)
    return SimResult(pools=results, series=dict(series))


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
    """The table `baton policy simulate` prints, ending with the totals and the ratio to the oracle."""
    lines = [f"{'model':<14} {'region':<10} {'pool':<8} {'GPU-h':>8} {'SLO met':>8} {'oracle GPU-h':>13} "
             f"{'oracle SLO':>10} {'GPU-h/oracle':>12}"]
    rows = [(*k, r) for k, r in sorted(result.pools.items())] + [("total", "", "", result.total())]
    for model, region, pool, r in rows:
        ratio = r.gpu_hours / r.oracle_gpu_hours if r.oracle_gpu_hours else float("nan")
        lines.append(f"{model:<14} {region:<10} {pool:<8} {r.gpu_hours:>8.2f} {r.attainment:>8.2%} "
                     f"{r.oracle_gpu_hours:>13.2f} {r.oracle_attainment:>10.2%} {ratio:>12.2f}")
    t = result.total()
    lines.append(f"request-pool checks {t.total}  SLO attainment {t.attainment:.4f}  GPU-hours {t.gpu_hours:.2f}  "
                 f"oracle {t.oracle_gpu_hours:.2f}  ratio {t.gpu_hours / max(1e-9, t.oracle_gpu_hours):.3f}")
    return "\n".join(lines)
