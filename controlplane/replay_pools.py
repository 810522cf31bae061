"""What one world's pools do with a trace's requests in the what-if simulator (simulator.py): replicas that start
and serve, a prefill FIFO that hands each request to decode when its prompt is done, and decode at the profile's
ITL with a queue for admission."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from baton.controlplane.capacity import DecodeModel
from baton.controlplane.policy import Policy


class PrefillServer:
    """Prompt throughput of one replica: busy (the FIFO's drain rate) and per prompt size (its own prefill)."""

    def __init__(self, policy: Policy, model: str, region: str) -> None:
        profile = policy.model(model).profile
        if profile is not None:
            self.sizes = np.asarray(profile.prefill.batch_tokens, dtype=np.float64)
            self.rates = np.asarray(profile.prefill.tokens_per_s, dtype=np.float64)
            self.busy = profile.prefill.busy_throughput
        else:
            self.busy = float(policy.pool(model, region, "prefill").capacity_tokens_per_s)
            self.sizes, self.rates = np.asarray([1.0]), np.asarray([self.busy])

    def own_s(self, prompt: np.ndarray) -> np.ndarray:
        return prompt / np.interp(prompt, self.sizes, self.rates)


class DecodeServer:
    """Decode of one replica: ITL at the concurrency that carries a given output load, and its ceiling."""

    def __init__(self, policy: Policy, model: str, region: str) -> None:
        profile = policy.model(model).profile
        self.slo_s = policy.pool(model, region, "decode").slo_ms / 1000
        self.profile = profile.decode if profile is not None else None
        self.flat = float(policy.pool(model, region, "decode").capacity_tokens_per_s or 0)
        self._tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _table(self, context: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Concurrency grid up to what the KV pool holds, with its ITL and tokens/s, per 256-token context."""
        key = int(context // 256)
        if key not in self._tables:
            ctx = (key + 1) * 256.0
            c_max = max(1.0, DecodeModel(self.profile).kv_concurrency(ctx))
            c = np.geomspace(0.05, c_max, 160)
            itl = np.asarray([self.profile.itl_s(x, ctx) for x in c])
            self._tables[key] = (c, itl, c / itl)
        return self._tables[key]

    def step(self, tokens_per_s: float, replicas: int, context: float) -> tuple[float, float, float]:
        """(ITL, tokens/s served, KV utilisation) of `replicas` asked to decode `tokens_per_s`."""
        if replicas <= 0:
            return math.inf, 0.0, 1.0
        per = tokens_per_s / replicas
        if self.profile is None:  # flat: ITL reaches the SLO at the stated capacity, beyond it in proportion
            rho = per / self.flat
            served = min(per, self.flat) * replicas
            return self.slo_s * (0.5 + 0.5 * min(rho, 1.0)), served, min(1.0, rho)
        c, itl, thr = self._table(context)
        if per >= thr[-1]:
            return float(itl[-1]), float(thr[-1]) * replicas, 1.0
        conc = float(np.interp(per, thr, c))
        return float(np.interp(conc, c, itl)), tokens_per_s, conc / c[-1]


@dataclass
class Fleet:
    """Replicas of one (cluster, model, pool) in the planner's world: those serving, and those starting, which
    hold their GPUs already."""

    ready: int = 0
    pending: list[tuple[float, int]] = field(default_factory=list)  # (ready at, replicas)

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
class RegionQueues:
    """One world's state of one (model, region): queues carried between ticks."""

    prefill_backlog: float = 0.0  # prompt tokens
    decode_backlog: float = 0.0  # output tokens waiting for admission
    kv_utilization: float = 0.0
    # Queued prompts whose prefill has not started: trace index, arrival, own prefill seconds and the prompt
    # tokens still ahead of each. They start as the pool works that off at whatever rate it has by then.
    waiting: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    waiting_at: np.ndarray = field(default_factory=lambda: np.empty(0))
    waiting_own: np.ndarray = field(default_factory=lambda: np.empty(0))
    waiting_ahead: np.ndarray = field(default_factory=lambda: np.empty(0))
    # Prefilled requests not yet decoding: when their prefill ends (a decode worker gets a request only once its
    # prompt's KV is handed over) and their index in the trace.
    handed_at: np.ndarray = field(default_factory=lambda: np.empty(0))
    handed: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def prefill(self, index: np.ndarray, t: np.ndarray, prompt: np.ndarray, own: np.ndarray, rate: float, t0: float,
                dt: float, last: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(trace index, TTFT) of the requests whose prefill starts in this tick, FIFO at `rate` prompt tokens/s:
        those queued from earlier ticks, then this tick's arrivals (times t, sorted), by Lindley's recursion;
        TTFT is the wait plus the request's own prefill. The run's `last` tick starts every one still queued at
        the rate it ends with."""
        serving = rate > 0 or last
        go = (self.waiting_ahead <= rate * dt) | last if serving else np.zeros(len(self.waiting), dtype=bool)
        started = [self.waiting[go]]
        ttft = [t0 + _over(self.waiting_ahead[go], rate) - self.waiting_at[go] + self.waiting_own[go]]
        self.waiting, self.waiting_at, self.waiting_own = self.waiting[~go], self.waiting_at[~go], self.waiting_own[~go]
        self.waiting_ahead = self.waiting_ahead[~go] - rate * dt
        if len(t):
            times = np.concatenate(([0.0], t - t0))
            sizes = np.concatenate(([self.prefill_backlog], prompt))
            arrivals = np.cumsum(sizes) - rate * times
            after = arrivals - np.minimum.accumulate(arrivals - sizes)  # work in the queue after each arrival
            self.prefill_backlog = float(after[-1]) + rate * float(times[-1])
            ahead = after[1:] - prompt
            left = ahead - rate * (t0 + dt - t)  # still ahead of each at the tick's end
            go = (left <= 0) | last if serving else np.zeros(len(t), dtype=bool)
            started.append(index[go])
            ttft.append(_over(ahead[go], rate) + own[go])
            for name, new in (("waiting", index), ("waiting_at", t), ("waiting_own", own), ("waiting_ahead", left)):
                setattr(self, name, np.concatenate((getattr(self, name), new[~go])))
        self.prefill_backlog = max(0.0, self.prefill_backlog - rate * dt)
        return np.concatenate(started), np.concatenate(ttft)

    def hand_off(self, done_at: np.ndarray, index: np.ndarray) -> None:
        self.handed_at = np.concatenate((self.handed_at, done_at))
        self.handed = np.concatenate((self.handed, index))

    def take(self, until: float) -> tuple[np.ndarray, np.ndarray]:
        """(index, prefill end) of the handed-off requests whose prefill ends before `until` (all of them at
        `until` inf, even those never prefilled); they leave."""
        due = self.handed_at < until if until < math.inf else np.ones(len(self.handed), dtype=bool)
        out = self.handed[due], self.handed_at[due]
        self.handed, self.handed_at = self.handed[~due], self.handed_at[~due]
        return out

    def decode(self, physics: DecodeServer, output: np.ndarray, context: float, replicas: int, dt: float) -> np.ndarray:
        """ITL of each request starting to decode this tick: the tick's ITL plus its wait for admission spread
        over its tokens."""
        demand = (self.decode_backlog + float(output.sum())) / dt
        itl, served, self.kv_utilization = physics.step(demand, replicas, context)
        wait = self.decode_backlog / served if served > 0 else math.inf
        self.decode_backlog = max(0.0, (demand - served) * dt)
        return itl + wait / output if len(output) else np.empty(0)


def _over(tokens: np.ndarray, rate: float) -> np.ndarray:
    """Seconds to work off `tokens` at `rate`; never, at no rate (a pool with no replicas)."""
    return tokens / rate if rate > 0 else np.full(len(tokens), math.inf)
