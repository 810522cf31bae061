"""Placement: replicas stay where they run, clusters are bounded by the GPUs they report free, overflow spills."""
from __future__ import annotations

from baton.controlplane.placement import ClusterState, place
from baton.controlplane.policy import parse_policy

POLICY = parse_policy("""\
clusters:
  - {name: a1, region: a, backend: local, gpus: 8}
  - {name: a2, region: a, backend: local, gpus: 8}
  - {name: b1, region: b, backend: local, gpus: 8}
models:
  - name: m
    regions:
      a: &r
        prefill: {capacity_tokens_per_s: 1000, ttft_p90_ms: 1000}
        decode: {capacity_tokens_per_s: 100, itl_p90_ms: 50}
      b: *r
spillover:
  - {from: a, to: [b]}
""")
PREFILL = ("m", "a", "prefill")


def desired(n: int) -> dict:
    return {PREFILL: n, ("m", "a", "decode"): 0, ("m", "b", "prefill"): 0, ("m", "b", "decode"): 0}


def test_growing_and_shrinking_move_no_running_replica():
    first = place(POLICY, desired(5), {}, {})
    assert first.own[PREFILL] == {"a1": 3, "a2": 2}  # spread by most free GPUs
    grown = place(POLICY, desired(8), {}, {}, first.own)
    assert all(grown.own[PREFILL].get(c, 0) >= n for c, n in first.own[PREFILL].items())  # only added
    shrunk = place(POLICY, desired(4), {}, {}, grown.own)
    assert all(shrunk.own[PREFILL].get(c, 0) <= n for c, n in grown.own[PREFILL].items())  # only removed
    # A fresh control plane keeps replicas where the clusters report them ready.
    clusters = {"a1": ClusterState(ready={("m", "prefill"): 1}), "a2": ClusterState(ready={("m", "prefill"): 4})}
    assert place(POLICY, desired(5), clusters, {}).own[PREFILL] == {"a2": 4, "a1": 1}


def test_reported_free_gpus_bound_a_cluster_and_overflow_spills():
    clusters = {"a1": ClusterState(free_gpus=2), "a2": ClusterState(free_gpus=30)}  # a2 capped at the policy's 8
    out = place(POLICY, desired(14), clusters, {})
    assert out.own[PREFILL] == {"a1": 2, "a2": 8}
    assert out.spill == {("m", "prefill", "a", "b"): 4}
    assert out.targets[("b1", "m", "prefill")] == 4 and out.unplaced == {}
    assert out.shares == {"m": {"a": {"b": round(4 / 14, 4)}}}
