"""Scorers by name; each lives in its own file."""
from __future__ import annotations

from baton.router.selection.scorers.load import LoadScorer
from baton.router.selection.scorers.prefix_overlap import PrefixOverlapScorer

SCORERS = {scorer.name: scorer for scorer in (PrefixOverlapScorer, LoadScorer)}

__all__ = ["SCORERS", "LoadScorer", "PrefixOverlapScorer"]
