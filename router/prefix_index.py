"""The router's global prefix index: chained block hash -> workers holding that block, answering
"how many leading blocks of this prompt does each worker hold" in time proportional to the prompt."""
from __future__ import annotations

from typing import Iterable, Sequence

from baton.contracts.kv_events import KVEvent


class PrefixIndex:
    """Maps each block hash to a bitmask of worker slots (a small int), so a lookup is one dict get
    and one AND per prompt block. Because hashes are chained, block i's hash already commits to
    every earlier block; a worker's match stops at the first block it lacks, even if it holds later
    ones (e.g. after evicting a middle block), since those could not be reused without the gap.

    Not thread-safe for concurrent writers; meant to be driven from one asyncio loop (the consumer
    writes, request handlers read between awaits).
    """

    def __init__(self) -> None:
        self._owners: dict[int, int] = {}
        self._slot_of: dict[str, int] = {}
        self._worker_at: list[str | None] = []
        self._held: list[set[int]] = []
        self._free_slots: list[int] = []

    # --- queries ---------------------------------------------------------------------------

    def find_matches(self, hashes: Sequence[int]) -> dict[str, int]:
        """worker id -> number of leading blocks of `hashes` it holds; workers holding none are absent."""
        if not hashes:
            return {}
        get = self._owners.get
        active = get(hashes[0], 0)
        if not active:
            return {}
        matches: dict[str, int] = {}
        depth = 1
        for h in hashes[1:]:
            still = get(h, 0) & active
            if still != active:
                self._record(active ^ still, depth, matches)
                if not still:
                    return matches
                active = still
            depth += 1
        self._record(active, depth, matches)
        return matches

    def _record(self, mask: int, depth: int, matches: dict[str, int]) -> None:
        while mask:
            low = mask & -mask
            matches[self._worker_at[low.bit_length() - 1]] = depth  # type: ignore[index]
            mask ^= low

    def workers(self) -> list[str]:
        return list(self._slot_of)

    def hashes_of(self, worker: str) -> set[int]:
        slot = self._slot_of.get(worker)
        return set() if slot is None else set(self._held[slot])

    @property
    def num_hashes(self) -> int:
        """Distinct block hashes known (a block held by two workers counts once)."""
        return len(self._owners)

    @property
    def num_entries(self) -> int:
        """(block, worker) pairs: what `baton_router_prefix_index_blocks` reports."""
        return sum(len(held) for held in self._held)

    # --- updates ---------------------------------------------------------------------------

    def apply(self, event: KVEvent) -> None:
        if event.kind == "stored":
            self.add(event.worker, event.hashes)
        elif event.kind == "removed":
            self.remove(event.worker, event.hashes)
        elif event.kind == "cleared":
            self.clear_worker(event.worker)
        elif event.kind == "snapshot":
            self.replace(event.worker, event.hashes)
        else:
            raise ValueError(f"unknown KV event kind {event.kind!r} from worker {event.worker!r}")

    def add(self, worker: str, hashes: Iterable[int]) -> None:
        slot = self._slot(worker)
        bit = 1 << slot
        owners = self._owners
        get = owners.get
        hashes = hashes if isinstance(hashes, (list, tuple)) else list(hashes)
        for h in hashes:
            owners[h] = get(h, 0) | bit
        self._held[slot].update(hashes)

    def remove(self, worker: str, hashes: Iterable[int]) -> None:
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        held = self._held[slot]
        owners = self._owners
        bit = 1 << slot
        for h in hashes:
            if h in held:
                held.discard(h)
                mask = owners[h] ^ bit
                if mask:
                    owners[h] = mask
                else:
                    del owners[h]

    def replace(self, worker: str, hashes: Iterable[int]) -> None:
        """A snapshot: the worker holds exactly `hashes` now."""
        new = set(hashes)
        old = self._held[self._slot(worker)]
        self.remove(worker, old - new)
        self.add(worker, list(new - old))

    def clear_worker(self, worker: str) -> None:
        """Drops the worker's blocks but keeps its slot (it is still alive, with an empty cache)."""
        slot = self._slot_of.get(worker)
        if slot is not None:
            self.remove(worker, list(self._held[slot]))

    def remove_worker(self, worker: str) -> None:
        """The worker left: drop its blocks and free its slot for reuse."""
        slot = self._slot_of.get(worker)
        if slot is None:
            return
        self.clear_worker(worker)
        del self._slot_of[worker]
        self._worker_at[slot] = None
        self._free_slots.append(slot)

    def clear(self) -> None:
        self._owners.clear()
        self._slot_of.clear()
        self._worker_at.clear()
        self._held.clear()
        self._free_slots.clear()

    def _slot(self, worker: str) -> int:
        slot = self._slot_of.get(worker)
        if slot is None:
            if not worker:
                raise ValueError("worker id must be a non-empty string")
            if self._free_slots:
                slot = self._free_slots.pop()
                self._worker_at[slot] = worker
            else:
                slot = len(self._worker_at)
                self._worker_at.append(worker)
                self._held.append(set())
            self._slot_of[worker] = slot
        return slot
