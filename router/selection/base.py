"""The selection seam: filters narrow the candidates, scorers rate them in [0, 1], one picker chooses;
policies read cached-prefix lengths through a PrefixMatcher."""
from __future__ import annotations

from typing import Protocol, Sequence

from baton.router.selection.types import SelectionContext, WorkerState


class PrefixMatcher(Protocol):
    """What policies need from a prefix index (router.prefix_index.PrefixIndex; bench adapts Dynamo's)."""

    def find_matches(self, hashes: Sequence[int]) -> dict[str, int]: ...


class Filter(Protocol):
    name: str

    def filter(self, ctx: SelectionContext, workers: Sequence[WorkerState]) -> list[WorkerState]: ...


class Scorer(Protocol):
    name: str

    def score(self, ctx: SelectionContext, workers: Sequence[WorkerState]) -> list[float]:
        """One score in [0, 1] per worker, in order; higher is better."""
        ...


class Picker(Protocol):
    name: str

    def pick(self, ctx: SelectionContext, workers: Sequence[WorkerState], totals: Sequence[float]) -> int:
        """Index of the chosen worker."""
        ...
