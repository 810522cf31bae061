"""Policies: filters -> weighted scorers -> picker, per pool, with every step timed; a registry by name."""
from __future__ import annotations

import random
import time
from typing import Callable, Sequence

from baton.contracts.worker_registry import POOLS
from baton.router.selection.base import Filter, Picker, PrefixMatcher, Scorer
from baton.router.selection.config import RoutingConfig
from baton.router.selection.filters import HealthyFilter, PoolFilter
from baton.router.selection.pickers import RoundRobinPicker, WeightedPicker
from baton.router.selection.scorers import SCORERS, LoadScorer
from baton.router.selection.timing import TimingHook
from baton.router.selection.types import (
    CandidateScore,
    NoWorkerAvailable,
    RoutingRequest,
    Selection,
    SelectionContext,
    WorkerState,
)


class Policy:
    """Chooses one worker of a pool. The index is consulted under every policy so that predicted
    cache hits can be reported (and compared) for round_robin and least_load too."""

    def __init__(self, name: str, filters: Sequence[Filter], scorers: dict[str, list[tuple[Scorer, float]]],
                 picker: Picker, *, block_size: int, index: PrefixMatcher | None = None,
                 timing: TimingHook | None = None) -> None:
        self.name = name
        self._filters = list(filters)
        self._scorers = scorers
        self._picker = picker
        self._block_size = block_size
        self.index = index
        self._timing = timing or (lambda name, seconds: None)

    def match(self, request: RoutingRequest) -> dict[str, int]:
        """Leading cached blocks per worker; compute once per request and pass to select() for both pools."""
        if self.index is None:
            return {}
        t = time.perf_counter()
        matches = self.index.find_matches(request.block_hashes)
        self._timing("index.find_matches", time.perf_counter() - t)
        return matches

    def select(self, request: RoutingRequest, workers: Sequence[WorkerState], pool: str,
               matches: dict[str, int] | None = None) -> Selection:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if request.block_size != self._block_size:
            raise ValueError(f"request block size {request.block_size} differs from the router's {self._block_size}")
        clock, timing = time.perf_counter, self._timing
        started = clock()
        ctx = SelectionContext(request, pool)
        candidates = list(workers)
        for f in self._filters:
            t = clock()
            candidates = f.filter(ctx, candidates)
            timing(f"filter.{f.name}", clock() - t)
        if not candidates:
            raise NoWorkerAvailable(f"no healthy {pool} worker among {len(workers)} known")
        ctx = SelectionContext(request, pool, self.match(request) if matches is None else matches)
        totals = [0.0] * len(candidates)
        by_scorer: dict[str, list[float]] = {}
        for scorer, weight in self._scorers.get(pool, ()):
            t = clock()
            scores = scorer.score(ctx, candidates)
            timing(f"scorer.{scorer.name}", clock() - t)
            by_scorer[scorer.name] = scores
            for i, s in enumerate(scores):
                totals[i] += weight * s
        t = clock()
        chosen = self._picker.pick(ctx, candidates, totals)
        timing(f"picker.{self._picker.name}", clock() - t)
        matches = ctx.matches
        names = list(by_scorer)
        per_worker = zip(*by_scorer.values()) if names else ((),) * len(candidates)
        breakdown = tuple(
            CandidateScore(w.worker_id, dict(zip(names, scores)), total, matches.get(w.worker_id, 0))
            for w, scores, total in zip(candidates, per_worker, totals))
        worker = candidates[chosen]
        matched = ctx.matches.get(worker.worker_id, 0)
        selection = Selection(worker=worker, pool=pool, policy=self.name, scores=breakdown[chosen].scores,
                              total=totals[chosen], matched_blocks=matched,
                              predicted_cached_tokens=request.cached_tokens(matched), candidates=breakdown)
        timing("decision", clock() - started)
        return selection


PolicyFactory = Callable[[RoutingConfig, "PrefixMatcher | None", random.Random, "TimingHook | None"], Policy]


def _round_robin(config: RoutingConfig, index, rng, timing) -> Policy:
    return Policy("round_robin", [PoolFilter(), HealthyFilter()], {}, RoundRobinPicker(),
                  block_size=config.block_size, index=index, timing=timing)


def _least_load(config: RoutingConfig, index, rng, timing) -> Policy:
    scorers = {pool: [(LoadScorer(), 1.0)] for pool in POOLS}
    return Policy("least_load", [PoolFilter(), HealthyFilter()], scorers, WeightedPicker(rng),
                  block_size=config.block_size, index=index, timing=timing)


def _kv_aware(config: RoutingConfig, index, rng, timing) -> Policy:
    scorers = {pool: [(SCORERS[name](), weight) for name, weight in getattr(config.weights, pool).items() if weight]
               for pool in POOLS}
    return Policy("kv_aware", [PoolFilter(), HealthyFilter()], scorers, WeightedPicker(rng),
                  block_size=config.block_size, index=index, timing=timing)


POLICIES: dict[str, PolicyFactory] = {"round_robin": _round_robin, "least_load": _least_load, "kv_aware": _kv_aware}


def make_policy(config: RoutingConfig, index: PrefixMatcher | None = None, *, rng: random.Random | None = None,
                timing: TimingHook | None = None) -> Policy:
    """Builds the configured policy; `rng` (default: seeded from config.seed) breaks ties."""
    factory = POLICIES.get(config.policy)
    if factory is None:
        raise ValueError(f"unknown routing policy {config.policy!r}; choose one of {sorted(POLICIES)}")
    return factory(config, index, rng or random.Random(config.seed), timing)
