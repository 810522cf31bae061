"""Routing policy configuration: which policy, scorer weights per pool, block size, local-prefill threshold."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from baton.router.selection.scorers import SCORERS

# The policies policies.py builds, by name (a test keeps the two in step).
POLICY_NAMES = ("round_robin", "least_load", "kv_aware")


def _check_weights(weights: dict[str, float]) -> dict[str, float]:
    for name, weight in weights.items():
        if name not in SCORERS:
            raise ValueError(f"unknown scorer {name!r}; known: {sorted(SCORERS)}")
        if weight < 0:
            raise ValueError(f"weight of scorer {name!r} must be >= 0, got {weight}")
    if not any(weights.values()):
        raise ValueError("at least one scorer needs a positive weight")
    return weights


class ScorerWeights(BaseModel):
    """Weights of the weighted sum, per pool. Overlap 1 / load 2 makes a worker holding the whole
    prompt win until its prefill queue is longer than the prompt (see scorers/load.py)."""

    model_config = ConfigDict(extra="forbid")

    prefill: dict[str, float] = Field(default_factory=lambda: {"prefix_overlap": 1.0, "load": 2.0})
    decode: dict[str, float] = Field(default_factory=lambda: {"prefix_overlap": 1.0, "load": 2.0})

    @field_validator("prefill", "decode")
    @classmethod
    def _valid(cls, value: dict[str, float]) -> dict[str, float]:
        return _check_weights(value)


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str = Field("kv_aware", description="round_robin / least_load / kv_aware")
    weights: ScorerWeights = Field(default_factory=ScorerWeights)
    block_size: int = Field(16, ge=1, description="KV block size in tokens; must match the workers'")
    local_prefill_threshold_tokens: int = Field(
        64, ge=0, description="the decode worker prefills itself when at most this many prompt tokens are uncached there")
    seed: int | None = Field(None, description="seed of the tie-breaking RNG; None = nondeterministic")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICY_NAMES:
            raise ValueError(f"unknown routing policy {value!r}; choose one of {sorted(POLICY_NAMES)}")
        return value
