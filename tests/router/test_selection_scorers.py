"""Scorers on constructed worker states, including adversarial ones (the cache holder is saturated)."""
from __future__ import annotations

import random

from baton.contracts.block_hash import hash_blocks
from baton.router.prefix_index import PrefixIndex
from baton.router.selection import RoutingConfig, RoutingRequest, SelectionContext, WorkerState, make_policy
from baton.router.selection.scorers import LoadScorer, PrefixOverlapScorer

BS = 16


def request(n_tokens: int, seed: int = 0) -> RoutingRequest:
    rng = random.Random(seed)
    tokens = [rng.randrange(32000) for _ in range(n_tokens)]
    return RoutingRequest(tokens, hash_blocks(tokens, BS), BS)


def test_prefix_overlap_is_share_of_prompt_saved():
    req = request(100)  # 6 full blocks + 4 tokens
    workers = [WorkerState("a", "prefill"), WorkerState("b", "prefill"), WorkerState("c", "prefill")]
    ctx = SelectionContext(req, "prefill", {"a": 6, "b": 2})
    assert PrefixOverlapScorer().score(ctx, workers) == [96 / 100, 32 / 100, 0.0]


def test_prefill_load_halves_when_queue_equals_prompt():
    req = request(1000)
    workers = [WorkerState("idle", "prefill"), WorkerState("busy", "prefill", queued_prefill_tokens=1000),
               WorkerState("swamped", "prefill", queued_prefill_tokens=100_000)]
    scores = LoadScorer().score(SelectionContext(req, "prefill"), workers)
    assert scores[0] == 1.0 and scores[1] == 0.5
    assert 0 < scores[2] < 0.01


def test_decode_load_counts_kv_batch_and_local_prefill():
    req = request(160)  # 10 blocks
    workers = [
        WorkerState("free", "decode", capacity=8, total_kv_blocks=100),
        WorkerState("kv_full", "decode", capacity=8, active_kv_blocks=95, total_kv_blocks=100),
        WorkerState("batch_full", "decode", capacity=8, running_requests=8, total_kv_blocks=100),
        WorkerState("unknown", "decode"),
    ]
    ctx = SelectionContext(req, "decode", {"kv_full": 10})  # kv_full needs no new blocks for this prompt
    free, kv_full, batch_full, unknown = LoadScorer().score(ctx, workers)
    assert free == (0.9 + 1 + 1) / 3
    assert kv_full == (0.05 + 1 + 1) / 3
    assert batch_full == (0.9 + 0 + 1) / 3
    assert unknown == 1.0


def test_scores_stay_in_unit_interval_on_random_states():
    rng = random.Random(3)
    scorers = [PrefixOverlapScorer(), LoadScorer()]
    for _ in range(200):
        req = request(rng.randrange(0, 400), seed=rng.randrange(10))
        pool = rng.choice(["prefill", "decode"])
        workers = [WorkerState(f"w{i}", pool, capacity=rng.randrange(0, 9), running_requests=rng.randrange(0, 20),
                               queued_prefill_tokens=rng.randrange(0, 10**6), active_kv_blocks=rng.randrange(0, 300),
                               total_kv_blocks=rng.randrange(0, 200)) for i in range(4)]
        matches = {w.worker_id: rng.randrange(0, len(req.block_hashes) + 1) for w in workers}
        for scorer in scorers:
            for s in scorer.score(SelectionContext(req, pool, matches), workers):
                assert 0.0 <= s <= 1.0


def adversarial(queue_of_holder: int, pool: str = "prefill", **holder_load) -> str:
    req = request(2048)
    index = PrefixIndex()
    index.add("holder", req.block_hashes)
    policy = make_policy(RoutingConfig(seed=0), index)
    workers = [WorkerState("holder", pool, queued_prefill_tokens=queue_of_holder, **holder_load),
               WorkerState("idle", pool)]
    return policy.select(req, workers, pool).worker.worker_id


def test_saturated_prefix_holder_loses_past_a_point():
    assert adversarial(0) == "holder"
    assert adversarial(1500) == "holder"  # waiting 1500 tokens beats recomputing 2048
    assert adversarial(3000) == "idle"  # past the point, load wins
    winners = [adversarial(q) for q in range(0, 8000, 250)]
    switch = winners.index("idle")
    assert set(winners[:switch]) == {"holder"} and set(winners[switch:]) == {"idle"}  # one clean crossover


def test_saturated_decode_holder_loses():
    assert adversarial(0, "decode", capacity=8, total_kv_blocks=1000) == "holder"
    assert adversarial(0, "decode", capacity=8, running_requests=8, active_kv_blocks=1000,
                       total_kv_blocks=1000) == "idle"
