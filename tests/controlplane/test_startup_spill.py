"""Spillover while replicas start: the share a region sheds to another's spare ready replicas, bounded by what
the host can take and by the rule's max_share, and none once nothing is starting."""
from __future__ import annotations

import pytest

from baton.controlplane.capacity import Load
from baton.controlplane.policy import parse_policy
from baton.controlplane.startup_spill import merge, startup_shares

POLICY = """\
tick_s: 10
clusters:
  - {name: a, region: r1, backend: local, gpus: 100}
  - {name: b, region: r2, backend: local, gpus: 100}
models:
  - name: m
    regions:
      r1: &dep
        prefill: {capacity_tokens_per_s: 1000, ttft_p90_ms: 1000, startup_s: 30}
        decode: {capacity_tokens_per_s: 100, itl_p90_ms: 50, startup_s: 30}
      r2: *dep
spillover:
  - {from: r1, to: [r2], max_share: 0.5}
"""
POL = parse_policy(POLICY)
# r1 after a step: 50 requests/s of 100 prompt and 10 output tokens, 2 ready replicas per pool serve 40% of it.
ORIGIN = Load(50, 5000, 500)
HOST = Load(10, 1000, 100)  # r2's own load


def shares(host_ready: int, starting: int = 3) -> dict:
    loads = {("m", "r1", "prefill"): ORIGIN, ("m", "r1", "decode"): ORIGIN,
             ("m", "r2", "prefill"): HOST, ("m", "r2", "decode"): HOST}
    ready = {("m", "r1", "prefill"): 2, ("m", "r1", "decode"): 2,
             ("m", "r2", "prefill"): host_ready, ("m", "r2", "decode"): host_ready}
    later = {("m", "r1", "prefill"): starting, ("m", "r1", "decode"): starting}
    return startup_shares(POL, loads, ready, later, lambda k: POL.capacity_model(*k))


def test_the_host_takes_what_its_ready_replicas_spare():
    # r2's 2 decode replicas carry 200 tokens/s, its own load 100: room for 100 of r1's 500, a share of 0.2
    # (prefill would take 0.203: the queue it builds over r1's 30 s start-up waits 0.23 s, a quarter of 0.92 s).
    got = shares(host_ready=2)["m"]["r1"]["r2"]
    assert got == pytest.approx(0.2, abs=1e-3)


def test_the_rules_max_share_bounds_it():
    assert shares(host_ready=10)["m"]["r1"]["r2"] == pytest.approx(0.5)  # r1 sheds 60%, the rule allows 50%


def test_a_host_without_room_or_an_origin_with_nothing_starting_spills_nothing():
    assert shares(host_ready=1) == {}  # r2's one replica per pool is busy with its own load
    assert shares(host_ready=10, starting=0) == {}


def test_merge_keeps_the_larger_share():
    a = {"m": {"r1": {"r2": 0.3}}}
    b = {"m": {"r1": {"r2": 0.1, "r3": 0.2}}, "n": {"r2": {"r1": 0.4}}}
    assert merge(a, b) == {"m": {"r1": {"r2": 0.3, "r3": 0.2}}, "n": {"r2": {"r1": 0.4}}}
