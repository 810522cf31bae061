"""The router's own in-flight accounting raises stale heartbeat load so bursts spread."""
from __future__ import annotations

from baton.router.inflight import InFlight
from baton.router.selection import WorkerState
from baton.router.selection.disaggregation import PrefillDecision, Route
from baton.router.selection.types import Selection


def sel(worker_id, pool, cached=0):
    return Selection(worker=WorkerState(worker_id, pool), pool=pool, policy="kv_aware", scores={}, total=0.0,
                     matched_blocks=cached // 16, predicted_cached_tokens=cached, candidates=())


def test_local_and_remote_prefill_tickets():
    inflight = InFlight()
    local = inflight.start(Route(sel("d1", "decode", 64), None, PrefillDecision(False, 36, "short")), 100)
    remote = inflight.start(Route(sel("d1", "decode"), sel("p1", "prefill", 32), PrefillDecision(True, 400, "x")), 400)
    d1, p1 = WorkerState("d1", "decode", running_requests=1), WorkerState("p1", "prefill")
    assert inflight.adjust(d1).running_requests == 2
    assert inflight.adjust(d1).queued_prefill_tokens == 36
    assert inflight.adjust(p1).queued_prefill_tokens == 368
    inflight.prefilled(remote)
    assert inflight.adjust(p1).queued_prefill_tokens == 0
    inflight.end(remote)
    inflight.end(remote)  # idempotent
    inflight.end(local)
    assert inflight.adjust(d1) == d1  # nothing of ours left: the report stands
    busy = WorkerState("d1", "decode", running_requests=9, queued_prefill_tokens=999)
    inflight.start(Route(sel("d1", "decode"), None, PrefillDecision(False, 10, "short")), 10)
    assert inflight.adjust(busy) == busy  # a report that already counts more wins
