"""PrefixIndex: insert/remove/snapshot/rebuild, worker leave, chain semantics, checked against a brute-force model."""
from __future__ import annotations

import random

import pytest

from baton.contracts.block_hash import hash_blocks
from baton.contracts.kv_events import KVEvent
from baton.router.prefix_index import PrefixIndex

BS = 4


def chain(seed: int, n_blocks: int) -> list[int]:
    rng = random.Random(seed)
    return hash_blocks([rng.randrange(32000) for _ in range(n_blocks * BS)], BS)


def test_leading_blocks_per_worker():
    index = PrefixIndex()
    prompt = chain(1, 10)
    index.add("a", prompt[:10])
    index.add("b", prompt[:3])
    index.add("c", chain(2, 5))
    assert index.find_matches(prompt) == {"a": 10, "b": 3}
    assert index.find_matches(prompt[:2]) == {"a": 2, "b": 2}
    assert index.find_matches(chain(3, 4)) == {}
    assert index.find_matches([]) == {}


def test_later_block_counts_only_if_all_earlier_match():
    index = PrefixIndex()
    prompt = chain(1, 8)
    index.add("a", prompt[:3] + prompt[4:])  # block 3 evicted from the middle
    index.add("b", prompt[1:])  # lacks the first block
    assert index.find_matches(prompt) == {"a": 3}


def test_remove_and_shared_blocks():
    index = PrefixIndex()
    prompt = chain(1, 6)
    index.add("a", prompt)
    index.add("b", prompt)
    index.remove("a", prompt[4:])
    assert index.find_matches(prompt) == {"a": 4, "b": 6}
    assert index.num_hashes == 6 and index.num_entries == 10
    index.remove("b", prompt)
    assert index.find_matches(prompt) == {"a": 4}
    assert index.num_hashes == 4
    index.remove("nobody", prompt)  # unknown worker: no error, no change
    index.remove("a", chain(9, 3))  # hashes the worker never held
    assert len(index.hashes_of("a")) == 4


def test_snapshot_replaces_worker_state_only():
    index = PrefixIndex()
    old, new = chain(1, 5), chain(2, 5)
    index.add("a", old)
    index.add("b", old)
    index.apply(KVEvent("a", "snapshot", new[:3] + old[:1]))
    assert index.hashes_of("a") == set(new[:3] + old[:1])
    assert index.find_matches(old) == {"a": 1, "b": 5}
    assert index.find_matches(new) == {"a": 3}


def test_cleared_keeps_worker_slot_and_remove_worker_frees_it():
    index = PrefixIndex()
    prompt = chain(1, 4)
    index.add("a", prompt)
    index.add("b", prompt)
    index.apply(KVEvent("a", "cleared", ()))
    assert index.find_matches(prompt) == {"b": 4}
    assert "a" in index.workers()
    index.remove_worker("b")
    assert index.find_matches(prompt) == {}
    assert index.workers() == ["a"] and index.num_hashes == 0
    index.add("c", prompt)  # takes b's freed slot; must not inherit anything of b
    assert index.find_matches(prompt) == {"c": 4}


def test_rebuild_from_snapshots_equals_incremental_state():
    incremental = PrefixIndex()
    for w in range(4):
        incremental.add(f"w{w}", chain(w, 20))
        incremental.add(f"w{w}", chain(100, 7))
        incremental.remove(f"w{w}", chain(w, 20)[15:])
    rebuilt = PrefixIndex()
    for worker in incremental.workers():
        rebuilt.apply(KVEvent(worker, "snapshot", sorted(incremental.hashes_of(worker))))
    for seed in (0, 1, 2, 3, 100):
        assert rebuilt.find_matches(chain(seed, 20)) == incremental.find_matches(chain(seed, 20))
    assert rebuilt.num_entries == incremental.num_entries


def test_matches_brute_force_under_random_churn():
    rng = random.Random(7)
    index = PrefixIndex()
    model: dict[str, set[int]] = {}
    chains = [chain(s, 12) for s in range(6)]
    for _ in range(400):
        worker = f"w{rng.randrange(70)}"  # > 64 workers: masks grow past one machine word
        c = rng.choice(chains)
        op = rng.random()
        if op < 0.5:
            hashes = c[: rng.randrange(1, 13)]
            index.add(worker, hashes)
            model.setdefault(worker, set()).update(hashes)
        elif op < 0.85:
            hashes = rng.sample(c, 3)
            index.remove(worker, hashes)
            model.get(worker, set()).difference_update(hashes)
        else:
            index.remove_worker(worker)
            model.pop(worker, None)
    for c in chains:
        expected = {}
        for worker, held in model.items():
            n = 0
            while n < len(c) and c[n] in held:
                n += 1
            if n:
                expected[worker] = n
        assert index.find_matches(c) == expected


def test_bad_input_is_rejected_clearly():
    index = PrefixIndex()
    with pytest.raises(ValueError, match="non-empty"):
        index.add("", [1])
    with pytest.raises(ValueError, match="unknown KV event kind"):
        index.apply(KVEvent("a", "exploded", ()))
