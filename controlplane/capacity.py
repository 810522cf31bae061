"""Capacity of one replica from a measured profile (bench/capacity_profile.py) and a queueing model: how many
replicas keep TTFT or ITL p90 under target at a given load. The planner, its oracle and the simulator share it."""
from __future__ import annotations

import bisect
import itertools
import json
import math
import pathlib
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Squared coefficient of variation of prompt sizes assumed by the wait formula; 1 (exponential) is on the safe
# side of the lognormal prompts seen in chat and RAG traffic (about 0.4-0.7).
PROMPT_CV2 = 1.0
# A request's own prefill at the p90 is that of a prompt twice the mean (lognormal, sigma about 0.6).
P90_PROMPT_OVER_MEAN = 2.0
# In-flight decode requests fluctuate like a Poisson count; the p90 concurrency is mean + 1.28 sqrt(mean).
P90_Z = 1.28


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_curve(xs: list[int], ys: list[float], x_name: str, y_name: str) -> None:
    """A throughput curve: one positive rate per positive, increasing batch size."""
    if len(xs) != len(ys):
        raise ValueError(f"{x_name} and {y_name} differ in length")
    if any(b <= a for a, b in itertools.pairwise(xs)) or xs[0] <= 0:
        raise ValueError(f"{x_name} must be positive and increasing")
    if any(r <= 0 for r in ys):
        raise ValueError(f"{y_name} must be positive")


class PrefillProfile(_Strict):
    batch_tokens: list[int] = Field(min_length=1, description="tokens per prefill batch, increasing")
    tokens_per_s: list[float] = Field(min_length=1, description="prompt tokens/s of one replica at that batch")
    max_batch_tokens: int = Field(gt=0, description="the engine's batch limit: what a busy replica runs")

    @model_validator(mode="after")
    def _shape(self) -> PrefillProfile:
        _check_curve(self.batch_tokens, self.tokens_per_s, "batch_tokens", "tokens_per_s")
        return self

    def throughput(self, tokens: float) -> float:
        """Tokens/s at a batch of `tokens`, interpolated; flat beyond the measured range."""
        return _interp(self.batch_tokens, self.tokens_per_s, tokens, extrapolate=False)

    @property
    def busy_throughput(self) -> float:
        return self.throughput(self.max_batch_tokens)


class DecodeProfile(_Strict):
    context: list[int] = Field(min_length=1, description="context tokens per request, increasing")
    concurrency: list[int] = Field(min_length=1, description="requests decoding together, increasing")
    itl_ms: list[list[float | None]] = Field(description="[context][concurrency]; null where the KV pool was full")
    kv_tokens: int = Field(gt=0, description="tokens the replica's KV pool holds")

    @model_validator(mode="after")
    def _shape(self) -> DecodeProfile:
        for name, xs in (("context", self.context), ("concurrency", self.concurrency)):
            if xs[0] <= 0 or any(b <= a for a, b in itertools.pairwise(xs)):
                raise ValueError(f"{name} must be positive and increasing")
        if len(self.itl_ms) != len(self.context):
            raise ValueError("itl_ms needs one row per context")
        for i, row in enumerate(self.itl_ms):
            if len(row) != len(self.concurrency):
                raise ValueError(f"itl_ms[{i}] needs one value per concurrency")
            measured = [v for v in row if v is not None]
            if not measured or row[: len(measured)] != measured or any(v <= 0 for v in measured):
                raise ValueError(f"itl_ms[{i}] must start with positive values; null only after the last measured")
        return self

    def itl_s(self, concurrency: float, context: float) -> float:
        """Seconds per token at this concurrency and mean context. Linear in between the measured points; beyond
        them linear in both (a step reads the weights once and each request's KV, so time grows linearly)."""
        per_context = []
        for row in self.itl_ms:
            measured = [v for v in row if v is not None]
            per_context.append(_interp(self.concurrency[: len(measured)], measured, concurrency, extrapolate=True))
        return _interp(self.context, per_context, context, extrapolate=True) / 1e3


class CapacityProfile(_Strict):
    """What one replica of a model does on one device, measured by bench/capacity_profile.py."""

    version: Literal[1] = 1
    model: str = Field(min_length=1)
    device: str = Field(min_length=1)
    gpus_per_replica: int = Field(1, ge=1)
    source: str = Field("", description="how and when it was measured")
    prefill: PrefillProfile
    decode: DecodeProfile


class EmbedProfile(_Strict):
    """What one embedding replica does on one device, measured by bench/embed_profile.py: inputs/s by inputs per
    forward, at inputs of `input_tokens` tokens."""

    version: Literal[1] = 1
    model: str = Field(min_length=1)
    device: str = Field(min_length=1)
    source: str = Field("", description="how and when it was measured")
    input_tokens: int = Field(gt=0, description="tokens per input in the measurement")
    batch_inputs: list[int] = Field(min_length=1, description="inputs per forward, increasing")
    inputs_per_s: list[float] = Field(min_length=1, description="inputs/s of one replica at that forward size")
    max_batch_inputs: int = Field(gt=0, description="the worker's forward limit (--max-num-seqs): what a busy "
                                  "replica runs")

    @model_validator(mode="after")
    def _shape(self) -> EmbedProfile:
        _check_curve(self.batch_inputs, self.inputs_per_s, "batch_inputs", "inputs_per_s")
        return self

    def as_prefill(self) -> PrefillProfile:
        return PrefillProfile(batch_tokens=self.batch_inputs, tokens_per_s=self.inputs_per_s,
                              max_batch_tokens=self.max_batch_inputs)


class ProfileError(Exception):
    """A profile file that cannot be used; one line naming the file and the field."""


def read_profile(path: str | pathlib.Path) -> CapacityProfile:
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return CapacityProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ProfileError(f"{path}: {where}: {first['msg']}{more}") from None


def _interp(xs: list[int], ys: list[float], x: float, *, extrapolate: bool) -> float:
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    if x >= xs[-1] and not extrapolate:
        return ys[-1]
    i = min(max(1, bisect.bisect_left(xs, x)), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(1e-9, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class Load:
    """What a pool must serve, per second."""

    request_rate: float
    prompt_tokens_per_s: float
    output_tokens_per_s: float
    inputs_per_s: float = 0.0  # embedding inputs

    @property
    def mean_prompt(self) -> float:
        return self.prompt_tokens_per_s / self.request_rate if self.request_rate > 0 else 0.0

    @property
    def mean_output(self) -> float:
        return self.output_tokens_per_s / self.request_rate if self.request_rate > 0 else 0.0

    def tokens(self, pool: str) -> float:
        """The rate that sizes `pool`: prompt tokens (prefill), output tokens (decode) or inputs (embed)."""
        return {"prefill": self.prompt_tokens_per_s, "embed": self.inputs_per_s}.get(pool, self.output_tokens_per_s)

    def scaled(self, k: float) -> Load:
        return Load(self.request_rate * k, self.prompt_tokens_per_s * k, self.output_tokens_per_s * k,
                    self.inputs_per_s * k)

    def plus(self, other: Load) -> Load:
        return Load(self.request_rate + other.request_rate, self.prompt_tokens_per_s + other.prompt_tokens_per_s,
                    self.output_tokens_per_s + other.output_tokens_per_s, self.inputs_per_s + other.inputs_per_s)


class CapacityModel(Protocol):
    """`replicas`: how many (fractional; inf when no count can) keep the pool's p90 latency under `slo_s` at
    `load`. `busy_rate`: tokens/s one replica serves flat out, the rate at which it drains a queue."""

    def replicas(self, load: Load, slo_s: float) -> float: ...

    def busy_rate(self, load: Load, slo_s: float) -> float: ...


@dataclass(frozen=True)
class FlatCapacity:
    """The policy's `capacity_tokens_per_s` (`capacity_inputs_per_s` of an embed pool): one replica's throughput
    at the SLO, the same at every load."""

    pool: str
    tokens_per_s: float

    def replicas(self, load: Load, slo_s: float) -> float:
        return load.tokens(self.pool) / self.tokens_per_s

    def busy_rate(self, load: Load, slo_s: float) -> float:
        return self.tokens_per_s


def _wait_factor(rho: float) -> float:
    """p90 queueing wait over the mean service time of an M/G/1 queue at utilisation rho (Kingman's exponential
    tail: P(wait > t) = rho exp(-t rho / mean wait), mean wait from Pollaczek-Khinchine)."""
    if rho <= 0.1:
        return 0.0
    return (1 + PROMPT_CV2) / (2 * (1 - rho)) * math.log(10 * rho)


# Utilisation at most 0.98: a queue busier than that is one burst away from unbounded waits.
_RHO_GRID = [i / 4000 for i in range(1, 3921)]
_WAIT_GRID = [_wait_factor(r) for r in _RHO_GRID]  # increasing beyond rho 0.1


class PrefillModel:
    """A prefill pool as one FIFO served at replicas x the profile's busy throughput. TTFT p90 = the p90 wait
    plus the own prefill of a p90-sized prompt; the wait scales with the pool's service time, so larger pools
    run hotter at the same TTFT."""

    def __init__(self, profile: PrefillProfile) -> None:
        self.profile = profile
        self.busy = profile.busy_throughput

    def own_p90_s(self, mean_prompt: float) -> float:
        p90 = P90_PROMPT_OVER_MEAN * mean_prompt
        return p90 / self.profile.throughput(p90)

    def ttft_p90_s(self, load: Load, replicas: float) -> float:
        if load.request_rate <= 0:
            return 0.0
        rho = load.prompt_tokens_per_s / (replicas * self.busy) if replicas > 0 else math.inf
        if rho >= 1:
            return math.inf
        service = load.mean_prompt / (replicas * self.busy)
        return service * _wait_factor(rho) + self.own_p90_s(load.mean_prompt)

    def busy_rate(self, load: Load, slo_s: float) -> float:
        return self.busy

    def replicas(self, load: Load, slo_s: float) -> float:
        if load.request_rate <= 0 or load.prompt_tokens_per_s <= 0:
            return 0.0
        budget = slo_s - self.own_p90_s(load.mean_prompt)
        if budget <= 0:
            return math.inf
        # service x factor(rho) <= budget with service = mean_prompt rho / L, i.e. rho factor(rho) <= budget rate.
        limit = budget * load.request_rate
        lo, hi = 0, len(_RHO_GRID) - 1
        while lo < hi:  # the largest grid rho whose wait fits
            mid = (lo + hi + 1) // 2
            if _RHO_GRID[mid] * _WAIT_GRID[mid] <= limit:
                lo = mid
            else:
                hi = mid - 1
        return load.prompt_tokens_per_s / (_RHO_GRID[lo] * self.busy)


class DecodeModel:
    """A decode replica runs c requests at ITL(c, context) from the profile. Requests in flight fluctuate like a
    Poisson count, so the p90 ITL is that at c + 1.28 sqrt(c); the KV pool bounds the p90 concurrency too."""

    def __init__(self, profile: DecodeProfile) -> None:
        self.profile = profile
        self._cache: dict[tuple[int, float], float] = {}

    @staticmethod
    def context(load: Load) -> float:
        """Mean context of a decoding request: its prompt plus half its output."""
        return load.mean_prompt + load.mean_output / 2

    def kv_concurrency(self, context: float) -> float:
        return self.profile.kv_tokens / max(1.0, context)

    def best_concurrency(self, context: float, slo_s: float) -> float:
        """The largest mean concurrency per replica whose p90 ITL meets `slo_s` and whose p90 fits the KV pool."""
        key = (int(context // 64), slo_s)
        if key in self._cache:
            return self._cache[key]
        ctx = (key[0] + 1) * 64.0  # the bucket's upper edge: never optimistic
        kv = self.kv_concurrency(ctx)

        def fits(c: float) -> bool:
            c90 = c + P90_Z * math.sqrt(c)
            return c90 <= kv and self.profile.itl_s(c90, ctx) <= slo_s

        lo, hi = 0.0, kv
        if not fits(1e-6):
            best = 0.0
        else:
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            best = lo
        self._cache[key] = best
        return best

    def busy_rate(self, load: Load, slo_s: float) -> float:
        ctx = self.context(load)
        c = self.kv_concurrency(ctx)
        return c / self.profile.itl_s(c, ctx)

    def throughput(self, load: Load, slo_s: float) -> float:
        """Output tokens/s one replica serves within the ITL target at this request mix."""
        c = self.best_concurrency(self.context(load), slo_s)
        return c / self.profile.itl_s(c, self.context(load)) if c > 0 else 0.0

    def replicas(self, load: Load, slo_s: float) -> float:
        if load.output_tokens_per_s <= 0 or load.request_rate <= 0:
            return 0.0
        per_replica = self.throughput(load, slo_s)
        return load.output_tokens_per_s / per_replica if per_replica > 0 else math.inf


class EmbedModel(PrefillModel):
    """An embed pool as one FIFO of inputs served at replicas x the profile's busy inputs/s. Its target is the p90
    queue time (arrival to the first forward), so unlike TTFT no request's own forward counts."""

    def __init__(self, profile: EmbedProfile) -> None:
        super().__init__(profile.as_prefill())

    def own_p90_s(self, mean_prompt: float) -> float:
        return 0.0

    @staticmethod
    def _inputs(load: Load) -> Load:
        return Load(load.request_rate, load.inputs_per_s, 0.0)

    def queue_p90_s(self, load: Load, replicas: float) -> float:
        return self.ttft_p90_s(self._inputs(load), replicas)

    def replicas(self, load: Load, slo_s: float) -> float:
        return super().replicas(self._inputs(load), slo_s)


def model_for(pool: str, profile: CapacityProfile | None, capacity_tokens_per_s: float | None) -> CapacityModel:
    """The profile's queueing model when the policy gives a profile, else the flat per-replica throughput."""
    if profile is not None:
        return PrefillModel(profile.prefill) if pool == "prefill" else DecodeModel(profile.decode)
    assert capacity_tokens_per_s is not None  # the policy validator requires one of the two
    return FlatCapacity(pool, capacity_tokens_per_s)


@dataclass
class CapacityCorrection:
    """How much of the modelled capacity replicas really deliver, in [0.25, 1].

    A latency breach with no queue, while the model says the ready replicas are more than enough, means the
    model is optimistic: the factor moves towards what the ready replicas evidently serve. Windows that meet
    the SLO let it recover towards 1. It never rises above 1: arrivals measured before latency catches up
    would otherwise read as capacity.
    """

    value: float = 1.0
    smoothing: float = 0.5
    recovery: float = 0.1

    def observe(self, needed_at_full: float, ready: int, latency_p90_s: float | None, slo_s: float,
                queued: bool) -> None:
        if latency_p90_s is None or ready <= 0 or needed_at_full <= 0:
            return
        if latency_p90_s > slo_s and not queued and needed_at_full < 0.8 * ready * self.value:
            self.value += self.smoothing * (needed_at_full / ready - self.value)
        elif latency_p90_s <= slo_s:
            self.value += self.recovery * (1.0 - self.value)
        self.value = min(1.0, max(0.25, self.value))
