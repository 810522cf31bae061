"""Policies by name, tie-breaking, timing, bad input, and the conditional-disaggregation decider."""
from __future__ import annotations

import random
from collections import Counter

import pydantic
import pytest

from baton.contracts.block_hash import hash_blocks
from baton.router.prefix_index import PrefixIndex
from baton.router.selection import (
    POLICIES,
    POLICY_NAMES,
    ConditionalDisaggregation,
    LatencyRecorder,
    NoWorkerAvailable,
    RoutingConfig,
    RoutingRequest,
    WorkerState,
    make_policy,
    select_route,
)

BS = 16


def request(n_tokens: int, seed: int = 0, prefix: list[int] | None = None) -> RoutingRequest:
    rng = random.Random(seed)
    tokens = (prefix or []) + [rng.randrange(32000) for _ in range(n_tokens - len(prefix or []))]
    return RoutingRequest(tokens, hash_blocks(tokens, BS), BS)


def pool_of(n: int, pool: str = "decode", **load) -> list[WorkerState]:
    return [WorkerState(f"w{i}", pool, **load) for i in range(n)]


def test_registry_has_the_three_policies_and_kv_aware_is_default():
    assert set(POLICIES) == {"round_robin", "least_load", "kv_aware"}
    assert set(POLICY_NAMES) == set(POLICIES)  # the config accepts exactly the policies that exist
    assert RoutingConfig().policy == "kv_aware"
    for name in POLICIES:
        assert make_policy(RoutingConfig(policy=name)).name == name


def test_round_robin_cycles_in_id_order_and_skips_unhealthy():
    policy = make_policy(RoutingConfig(policy="round_robin"))
    workers = [WorkerState("c", "decode"), WorkerState("a", "decode"), WorkerState("b", "decode", healthy=False),
               WorkerState("p", "prefill")]
    picks = [policy.select(request(40), workers, "decode").worker.worker_id for _ in range(4)]
    assert picks == ["a", "c", "a", "c"]


def test_least_load_picks_shortest_prefill_queue():
    policy = make_policy(RoutingConfig(policy="least_load"))
    workers = [WorkerState("a", "prefill", queued_prefill_tokens=900), WorkerState("b", "prefill", queued_prefill_tokens=10),
               WorkerState("c", "prefill", queued_prefill_tokens=500)]
    assert policy.select(request(100), workers, "prefill").worker.worker_id == "b"


def test_kv_aware_follows_the_cache_and_reports_prediction():
    shared = request(512, seed=1)
    index = PrefixIndex()
    index.add("w2", shared.block_hashes)
    index.add("w1", shared.block_hashes[:4])
    policy = make_policy(RoutingConfig(seed=0), index)
    follow_up = request(600, seed=2, prefix=list(shared.token_ids))
    selection = policy.select(follow_up, pool_of(4), "decode")
    assert selection.worker.worker_id == "w2" and selection.policy == "kv_aware"
    assert selection.matched_blocks == 32 and selection.predicted_cached_tokens == 512
    assert selection.scores["prefix_overlap"] == pytest.approx(512 / 600)
    assert {c.worker_id: c.matched_blocks for c in selection.candidates} == {"w0": 0, "w1": 4, "w2": 32, "w3": 0}
    # Round robin ignores the cache but still reports what the chosen worker holds.
    rr = make_policy(RoutingConfig(policy="round_robin"), index)
    assert [rr.select(follow_up, pool_of(4), "decode").predicted_cached_tokens for _ in range(3)] == [0, 64, 512]


def test_ties_are_broken_at_random_and_reproducibly_with_a_seed():
    workers = pool_of(4)

    def picks(seed: int) -> list[str]:
        policy = make_policy(RoutingConfig(), rng=random.Random(seed))
        return [policy.select(request(64), workers, "decode").worker.worker_id for _ in range(400)]

    counts = Counter(picks(1))
    assert set(counts) == {"w0", "w1", "w2", "w3"} and min(counts.values()) > 50
    assert picks(1) == picks(1) and picks(1) != picks(2)


def test_every_step_is_timed_by_name():
    recorder = LatencyRecorder()
    index = PrefixIndex()
    policy = make_policy(RoutingConfig(), index, timing=recorder)
    for _ in range(5):
        policy.select(request(64), pool_of(2), "decode")
    assert set(recorder.samples) == {"filter.pool", "filter.healthy", "index.find_matches", "scorer.prefix_overlap",
                                     "scorer.load", "picker.weighted", "decision"}
    assert all(len(v) == 5 for v in recorder.samples.values())
    assert recorder.percentile("decision", 50) >= recorder.percentile("scorer.load", 50) > 0


def test_bad_input_gives_clear_errors():
    policy = make_policy(RoutingConfig())
    with pytest.raises(NoWorkerAvailable, match="no healthy decode worker among 2"):
        policy.select(request(32), [WorkerState("a", "decode", healthy=False), WorkerState("b", "prefill")], "decode")
    with pytest.raises(ValueError, match="block size 8 differs"):
        policy.select(RoutingRequest([1] * 32, [], 8), pool_of(1), "decode")
    with pytest.raises(ValueError, match="pool must be one of"):
        policy.select(request(32), pool_of(1), "both")
    with pytest.raises(ValueError, match="pool must be one of"):
        WorkerState("a", "encode")
    with pytest.raises(ValueError, match="queued_prefill_tokens must be >= 0"):
        WorkerState("a", "prefill", queued_prefill_tokens=-1)
    with pytest.raises(ValueError, match="3 block hashes but only 32 tokens"):
        RoutingRequest([1] * 32, [1, 2, 3], 16)
    with pytest.raises(pydantic.ValidationError, match="unknown routing policy 'random'"):
        RoutingConfig(policy="random")
    with pytest.raises(pydantic.ValidationError, match="weight of scorer 'load' must be >= 0"):
        RoutingConfig(weights={"decode": {"load": -1}})
    with pytest.raises(pydantic.ValidationError, match="at least one scorer"):
        RoutingConfig(weights={"prefill": {"load": 0}})


def test_conditional_disaggregation_uses_uncached_length():
    conversation = request(2000, seed=3)
    index = PrefixIndex()
    index.add("d1", conversation.block_hashes)
    config = RoutingConfig(local_prefill_threshold_tokens=64, seed=0)
    policy = make_policy(config, index)
    decider = ConditionalDisaggregation(config.local_prefill_threshold_tokens)
    workers = pool_of(2, "decode") + [WorkerState("d1", "decode"), WorkerState("p0", "prefill")]

    next_turn = request(2040, seed=4, prefix=list(conversation.token_ids))  # 2040 tokens, 2000 of them cached on d1
    route = select_route(policy, decider, next_turn, workers)
    assert route.decode.worker.worker_id == "d1"
    assert route.prefill is None and not route.decision.remote and route.decision.uncached_tokens == 40

    fresh = request(2040, seed=5)
    recorder = LatencyRecorder()
    route = select_route(make_policy(config, index, timing=recorder), decider, fresh, workers)
    assert len(recorder.samples["index.find_matches"]) == 1  # one lookup serves both pools
    assert len(recorder.samples["decision"]) == 2
    assert route.decision.remote and route.decision.uncached_tokens == 2040
    assert route.prefill is not None and route.prefill.worker.worker_id == "p0"

    no_prefill = select_route(policy, decider, fresh, workers[:3])
    assert not no_prefill.decision.remote and "no prefill worker" in no_prefill.decision.reason
    with pytest.raises(ValueError, match="must be >= 0"):
        ConditionalDisaggregation(-1)
