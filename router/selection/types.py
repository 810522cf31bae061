"""Typed inputs and outputs of worker selection: what the router knows about each worker and request."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from baton.contracts.worker_registry import POOLS


class NoWorkerAvailable(RuntimeError):
    """No candidate survived the filters; the message says which pool and why."""


@dataclass(frozen=True)
class WorkerState:
    """One worker as the registry last saw it, plus its live load."""

    worker_id: str
    pool: str
    address: str = ""
    region: str = "local"
    capacity: int = 0  # concurrent requests it admits; 0 = unknown
    queued_prefill_tokens: int = 0
    running_requests: int = 0
    active_kv_blocks: int = 0
    total_kv_blocks: int = 0  # 0 = unknown
    healthy: bool = True

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ValueError("WorkerState.worker_id must be non-empty")
        if self.pool not in POOLS:
            raise ValueError(f"worker {self.worker_id!r}: pool must be one of {POOLS}, got {self.pool!r}")
        for name in ("capacity", "queued_prefill_tokens", "running_requests", "active_kv_blocks", "total_kv_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"worker {self.worker_id!r}: {name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class RoutingRequest:
    """A tokenized prompt and its chained block hashes (engine.block_hash.hash_blocks)."""

    token_ids: Sequence[int]
    block_hashes: Sequence[int]
    block_size: int
    local_prefill: bool = False  # the decode worker must prefill (the request needs the prefilling engine's output)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"RoutingRequest.block_size must be positive, got {self.block_size}")
        if len(self.block_hashes) > len(self.token_ids) // self.block_size:
            raise ValueError(f"RoutingRequest has {len(self.block_hashes)} block hashes but only "
                             f"{len(self.token_ids)} tokens at block size {self.block_size}")

    @property
    def prompt_tokens(self) -> int:
        return len(self.token_ids)

    def cached_tokens(self, matched_blocks: int) -> int:
        return min(matched_blocks * self.block_size, self.prompt_tokens)


@dataclass(slots=True)
class SelectionContext:
    """Computed once per decision and shared read-only by every plugin. The per-decision records here
    are plain slotted dataclasses, not frozen ones: freezing costs ~1 us per instance on this path."""

    request: RoutingRequest
    pool: str
    matches: dict[str, int] = field(default_factory=dict)  # worker id -> leading blocks it holds


@dataclass(slots=True)
class CandidateScore:
    worker_id: str
    scores: dict[str, float]  # scorer name -> score in [0, 1], before weighting
    total: float
    matched_blocks: int


@dataclass(slots=True)
class Selection:
    """The chosen worker, why, and what the router expects it to have cached (for hit-rate metrics)."""

    worker: WorkerState
    pool: str
    policy: str
    scores: dict[str, float]
    total: float
    matched_blocks: int
    predicted_cached_tokens: int
    candidates: tuple[CandidateScore, ...]
