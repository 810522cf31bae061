"""KV-aware routing with real workers and a real Redis: a follow-up that shares a long prefix goes to the worker
holding it and prefills only the new blocks, also after the router and after Redis restarted."""
from __future__ import annotations

import random
import re
import time

import httpx
import pytest
import redis

from tests.e2e.conftest import start_cluster
from tests.e2e.test_openai_e2e import worker_stats

pytestmark = pytest.mark.slow

BLOCK = 16
PREFIX_BLOCKS = 32  # 512 shared tokens: the e2e model's context is 1024
TAIL = 20  # new tokens per request; one more full block each


@pytest.fixture(scope="module")
def cluster(e2e_model_dir, tmp_path_factory, own_redis):
    # prefill=0: both decode workers prefill locally, so the worker that gets a request is the one that computes it.
    c = start_cluster(e2e_model_dir, tmp_path_factory.mktemp("kvroute"), prefill=0, decode=2, routing="kv_aware",
                      redis_url=own_redis.url)
    yield c
    c.stop()


def counters(cluster) -> dict[str, tuple[int, int]]:
    """worker id -> (prompt tokens computed, prompt tokens served from its prefix cache)."""
    return {w: (int(s["prompt_tokens_computed_total"]), int(s["prompt_tokens_cached_total"]))
            for w, s in worker_stats(cluster).items()}


def index_entries(cluster) -> float:
    text = httpx.get(f"{cluster.url}/metrics", timeout=5).text
    found = re.search(r"^baton_router_prefix_index_blocks (\S+)$", text, re.M)
    assert found, "router exports no baton_router_prefix_index_blocks"
    return float(found.group(1))


def cached_on_workers(cluster) -> dict[str, int]:
    """worker id -> prefix blocks it holds (idle workers: every hashed block sits in the reusable LRU)."""
    return {w: int(s["kv_blocks_cached"]) for w, s in worker_stats(cluster).items()}


def wait_index_matches_workers(cluster, timeout_s: float = 20.0) -> float:
    """Waits until the router's index holds exactly the blocks the (idle) workers hold."""
    deadline = time.monotonic() + timeout_s
    while (n := index_entries(cluster)) != (held := sum((workers := cached_on_workers(cluster)).values())):
        assert time.monotonic() < deadline, f"router index holds {n} entries, the workers {held}: {workers}"
        time.sleep(0.1)
    return n


def wait_index(cluster, at_least: float, timeout_s: float = 15.0) -> float:
    deadline = time.monotonic() + timeout_s
    while (n := index_entries(cluster)) < at_least:
        assert time.monotonic() < deadline, (f"router index holds {n} entries, expected >= {at_least}; "
                                             f"the workers hold {cached_on_workers(cluster)}")
        time.sleep(0.1)
    return n


def send(cluster, tokens: list[int]) -> tuple[str, int, int]:
    """Runs one completion; returns (the worker that prefilled it, tokens it computed, tokens it had cached)."""
    before = counters(cluster)
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60,
                   json={"model": cluster.model_name, "prompt": tokens, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    after = counters(cluster)
    moved = {w: (after[w][0] - before[w][0], after[w][1] - before[w][1])
             for w in after if w in before and after[w] != before[w]}
    assert len(moved) == 1, f"expected exactly one worker to prefill the request, counters moved on {moved}"
    (worker, (computed, cached)), = moved.items()
    assert computed + cached == len(tokens)
    return worker, computed, cached


def place(cluster, rng: random.Random, n: int, min_holders: int = 1) -> dict[str, list[int]]:
    """Sends fresh long prefixes (plus a tail) until `n` are placed and `min_holders` workers hold one;
    returns prefix (as a tuple key) -> holder, after the router's index has seen them all."""
    placed: dict[tuple[int, ...], str] = {}
    start = index_entries(cluster)
    while len(placed) < n or len(set(placed.values())) < min_holders:
        assert len(placed) < n + 10, f"kv_aware put every fresh prefix on {set(placed.values())}"
        prefix = tuple(rng.randrange(1, 500) for _ in range(PREFIX_BLOCKS * BLOCK))
        worker, computed, cached = send(cluster, [*prefix, *(rng.randrange(1, 500) for _ in range(TAIL))])
        assert cached == 0, "a random prefix cannot be cached anywhere yet"
        placed[prefix] = worker
    wait_index(cluster, start + len(placed) * (PREFIX_BLOCKS + 1))
    return placed


def assert_follow_ups_go_to_holders(cluster, rng: random.Random, placed: dict) -> None:
    for prefix, holder in placed.items():
        worker, computed, cached = send(cluster, [*prefix, *(rng.randrange(1, 500) for _ in range(TAIL))])
        assert worker == holder, f"follow-up went to {worker}, but {holder} holds its {PREFIX_BLOCKS}-block prefix"
        assert (computed, cached) == (TAIL, PREFIX_BLOCKS * BLOCK), "the holder should prefill only the new tokens"


def test_follow_up_goes_to_holder_and_prefills_only_new_blocks(cluster):
    rng = random.Random(1)
    # Both workers must hold something, or "always the same worker" would pass too.
    placed = place(cluster, rng, n=3, min_holders=2)
    assert_follow_ups_go_to_holders(cluster, rng, placed)


def test_router_restart_rebuilds_index(cluster):
    rng = random.Random(2)
    placed = place(cluster, rng, n=2, min_holders=2)
    before = index_entries(cluster)
    cluster.restart("router")
    wait_index(cluster, before)  # replayed from the retained stream
    assert_follow_ups_go_to_holders(cluster, rng, placed)


def test_router_restart_rebuilds_index_from_snapshots_when_the_stream_is_trimmed(cluster, own_redis):
    """The stream keeps only its last entries (maxlen): a restarted router that finds nothing of an idle worker in
    it asks that worker for a snapshot instead of routing as if it held nothing."""
    rng = random.Random(5)
    placed = place(cluster, rng, n=2, min_holders=2)
    before = index_entries(cluster)
    # As if the stream had moved on past every entry of the workers (the running router has read them all).
    redis.Redis.from_url(own_redis.url).xtrim("baton:kv_events", maxlen=0)
    cluster.restart("router")
    wait_index(cluster, before)
    assert_follow_ups_go_to_holders(cluster, rng, placed)


def test_redis_restart_rebuilds_index(cluster, own_redis):
    rng = random.Random(3)
    placed = place(cluster, rng, n=2, min_holders=2)
    before = wait_index_matches_workers(cluster)
    own_redis.restart()  # an empty Redis: no stream, no worker keys; workers re-register and re-publish snapshots
    deadline = time.monotonic() + 20
    while len(worker_stats(cluster)) < 2:
        assert time.monotonic() < deadline, "workers did not re-register after the Redis restart"
        time.sleep(0.2)
    assert wait_index_matches_workers(cluster) == before
    # The fresh stream must hold each worker's full snapshot: that, not a stale index, is what routing uses now.
    entries = redis.Redis.from_url(own_redis.url).xrange("baton:kv_events")
    snapshots = {f[b"worker"].decode() for _id, f in entries if f[b"kind"] == b"snapshot"}
    assert snapshots == set(placed.values()), f"snapshots re-published after the restart by {snapshots}"
    assert_follow_ups_go_to_holders(cluster, rng, placed)


def test_burst_sharing_a_short_prefix_spreads_over_workers(cluster):
    """Eight concurrent requests share an 8-block prefix that one worker holds, but each brings 400 new tokens:
    recomputing 128 tokens elsewhere is cheaper than queueing behind seven 400-token prefills, so the other
    worker must get some of them. The burst is one completions request with eight prompts: the router routes
    all eight in one go, so they are concurrent however slowly a loaded machine delivers separate requests
    (eight clients may arrive one prefill apart, and then the prefix holder is the right choice each time)."""
    rng = random.Random(4)
    system = [rng.randrange(1, 500) for _ in range(8 * BLOCK)]
    start = index_entries(cluster)
    holder, _, _ = send(cluster, [*system, *(rng.randrange(1, 500) for _ in range(TAIL))])
    wait_index(cluster, start + 9)
    prompts = [[*system, *(rng.randrange(1, 500) for _ in range(400))] for _ in range(8)]
    before = counters(cluster)
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
        "model": cluster.model_name, "prompt": prompts, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == len(prompts)
    after = counters(cluster)
    per_worker = {w: (sum(after[w]) - sum(before[w])) // len(prompts[0]) for w in after}
    assert sum(per_worker.values()) == len(prompts)
    assert per_worker[holder] <= 6, f"{per_worker[holder]} of 8 went to the prefix holder {holder}: {per_worker}"
