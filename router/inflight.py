"""Load this router has sent and not yet seen served: heartbeats report worker load every 2 s, so without
this a burst of requests would all pick the worker that looked idle at the last heartbeat."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

from baton.router.selection import Route, WorkerState


@dataclass
class Ticket:
    """One routed attempt: the running request it adds to D, and the prefill tokens it queues until token one."""

    decode_id: str
    prefill_tokens: dict[str, int] = field(default_factory=dict)
    ended: bool = False


class InFlight:
    def __init__(self) -> None:
        self._requests: Counter[str] = Counter()
        self._prefill_tokens: Counter[str] = Counter()

    def start(self, route: Route, prompt_tokens: int) -> Ticket:
        ticket = Ticket(route.decode.worker.worker_id)
        if route.prefill is not None:
            ticket.prefill_tokens[route.prefill.worker.worker_id] = max(
                0, prompt_tokens - route.prefill.predicted_cached_tokens)
        else:
            ticket.prefill_tokens[ticket.decode_id] = route.decision.uncached_tokens
        self._requests[ticket.decode_id] += 1
        self._prefill_tokens.update(ticket.prefill_tokens)
        return ticket

    def prefilled(self, ticket: Ticket) -> None:
        """The first token arrived: the prompt is no longer queued anywhere."""
        self._prefill_tokens.subtract(ticket.prefill_tokens)
        ticket.prefill_tokens = {}

    def end(self, ticket: Ticket) -> None:
        if ticket.ended:
            return
        ticket.ended = True
        self.prefilled(ticket)
        self._requests[ticket.decode_id] -= 1

    def adjust(self, state: WorkerState) -> WorkerState:
        """The reported load, raised to what this router alone knows it has sent (a report may include it)."""
        wid = state.worker_id
        running, queued = self._requests[wid], self._prefill_tokens[wid]
        if running <= state.running_requests and queued <= state.queued_prefill_tokens:
            return state
        return dataclasses.replace(state, running_requests=max(running, state.running_requests),
                                   queued_prefill_tokens=max(queued, state.queued_prefill_tokens))
