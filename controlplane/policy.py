"""Autoscaling policy: pydantic models parsed from YAML; every error names file, line and field."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from baton.contracts.worker_registry import EMBED_POOL, POOLS
from baton.controlplane.capacity import (
    CapacityModel,
    CapacityProfile,
    EmbedModel,
    EmbedProfile,
    FlatCapacity,
    model_for,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class ClusterSpec(_Strict):
    """One cluster of one region, and how to reach it."""

    name: str = Field(min_length=1)
    region: str = Field(min_length=1)
    backend: Literal["kubernetes", "ray", "local"]
    gpus: int = Field(ge=0, description="GPUs this control plane may use in the cluster")
    kube_context: str | None = None
    kubeconfig: str | None = None
    namespace: str = "baton"
    deployment_name: str = Field("baton-{model}-{pool}", description="Deployment name template")
    ray_address: str | None = None
    worker_command: list[str] | None = Field(
        None, description="argv template for local/ray workers; placeholders {pool} {model_dir} {redis_url} "
        "{region} {worker_id} {grpc_port} {http_port}")


class ScaleBehavior(_Strict):
    """HPA-style behaviour of one direction: stabilisation window, step limit, cooldown."""

    stabilization_s: float = Field(
        0.0, ge=0, description="as Kubernetes' HPA: a move in this direction goes no further than every "
        "recommendation of this window allows; scaling down, a drop the forecast's step test has confirmed (two "
        "ticks that still hold against the level before it) is released without waiting it out")
    max_step: int = Field(4, ge=1, description="most replicas added/removed per decision")
    max_step_percent: float = Field(0.0, ge=0, description="or this % of current, whichever is larger")
    cooldown_s: float = Field(0.0, ge=0, description="no move in this direction this soon after a change")


class PoolPolicy(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(8, ge=0)
    gpus_per_replica: int = Field(1, ge=0)
    capacity_tokens_per_s: float | None = Field(
        None, gt=0, description="per-replica throughput at the SLO (prompt tokens for prefill, output for decode); "
        "needed when the model has no measured `profile`, which takes precedence")
    target_utilization: float = Field(
        0.7, gt=0, le=1, description="plan for this share of what the capacity model says meets the SLO at the "
        "forecast's upper band: the stated headroom (0.9 = 11% spare)")
    tolerance: float = Field(
        0.1, ge=0, lt=1, description="hysteresis: scale down only when the smaller pool keeps this margin")
    max_queue_per_replica: float = Field(4.0, gt=0)
    idle_timeout_s: float = Field(300.0, ge=0, description="scale to zero after this long idle (min_replicas 0)")
    startup_s: float = Field(
        60.0, ge=0, description="time for a new replica to become ready (model load); the planner forecasts "
        "this far ahead and drains queues over it")
    scale_up: ScaleBehavior = ScaleBehavior(stabilization_s=0, max_step=4, max_step_percent=100, cooldown_s=0)
    scale_down: ScaleBehavior = ScaleBehavior(stabilization_s=300, max_step=1, cooldown_s=60)


class PrefillPool(PoolPolicy):
    ttft_p90_ms: float = Field(gt=0)

    @property
    def slo_ms(self) -> float:
        return self.ttft_p90_ms


class DecodePool(PoolPolicy):
    itl_p90_ms: float = Field(gt=0)
    kv_target_utilization: float = Field(0.85, gt=0, le=1)

    @property
    def slo_ms(self) -> float:
        return self.itl_p90_ms


def _read_json_profile(value: Any, info: ValidationInfo) -> Any:
    """A profile given as a path: the JSON it holds, read relative to the policy file's folder."""
    if not isinstance(value, str):
        return value
    path = pathlib.Path((info.context or {}).get("base_dir", ".")) / value
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read profile {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile {path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def _path_or_object(schema: dict) -> None:
    schema["anyOf"].insert(0, {"type": "string"})


class EmbedPool(PoolPolicy):
    """Embedding workers (`baton embed-worker`): prefill-only forwards, no KV kept; sized by inputs/s, with the p90
    queue time (arrival to first forward) as the latency target."""

    capacity_inputs_per_s: float | None = Field(
        None, gt=0, description="inputs/s one replica embeds at the queue-time target; needed without a `profile`, "
        "which takes precedence")
    profile: EmbedProfile | None = Field(
        None, description="measured embedding throughput (bench/embed_profile.py): a JSON path relative to the "
        "policy file, or the profile inline", json_schema_extra=_path_or_object)
    queue_time_p90_ms: float = Field(gt=0, description="target p90 time from arrival to the first forward")

    _read_profile = field_validator("profile", mode="before")(_read_json_profile)

    @property
    def slo_ms(self) -> float:
        return self.queue_time_p90_ms


class RegionDeployment(_Strict):
    prefill: PrefillPool
    decode: DecodePool
    embed: EmbedPool | None = None


class ModelDeployment(_Strict):
    name: str = Field(min_length=1)
    model_dir: str | None = None
    profile: CapacityProfile | None = Field(
        None, description="measured capacity (bench/capacity_profile.py): a JSON path relative to the policy file, "
        "or the profile inline", json_schema_extra=_path_or_object)
    regions: dict[str, RegionDeployment] = Field(min_length=1)

    _read_profile = field_validator("profile", mode="before")(_read_json_profile)


class SpilloverRule(_Strict):
    """When `from` is out of capacity, place its excess in `to` (nearest first) and spill that share."""

    from_region: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    max_share: float = Field(1.0, gt=0, le=1)


class SignalsPolicy(_Strict):
    window_s: float = Field(30.0, gt=0)
    stale_after_s: float = Field(30.0, gt=0)


class Policy(_Strict):
    version: Literal[1] = 1
    tick_s: float = Field(15.0, gt=0)
    signals: SignalsPolicy = SignalsPolicy()
    clusters: list[ClusterSpec] = Field(min_length=1)
    models: list[ModelDeployment] = Field(min_length=1)
    spillover: list[SpilloverRule] = []

    def model(self, name: str) -> ModelDeployment:
        return next(m for m in self.models if m.name == name)

    def pool(self, model: str, region: str, pool: str) -> PrefillPool | DecodePool | EmbedPool:
        return getattr(self.model(model).regions[region], pool)

    def capacity_model(self, model: str, region: str, pool: str) -> CapacityModel:
        pol = self.pool(model, region, pool)
        if isinstance(pol, EmbedPool):  # the model's profile measures generation; an embed pool has its own
            return EmbedModel(pol.profile) if pol.profile is not None else FlatCapacity(pool, pol.capacity_inputs_per_s)
        return model_for(pool, self.model(model).profile, pol.capacity_tokens_per_s)

    def pool_keys(self) -> list[tuple[str, str, str]]:
        """Every (model, region, pool) the planner sizes: prefill and decode, and embed where a region has one."""
        return [(m.name, r, p) for m in self.models for r, dep in m.regions.items() for p in (*POOLS, EMBED_POOL)
                if getattr(dep, p) is not None]

    def regions(self) -> list[str]:
        return sorted({c.region for c in self.clusters})

    def spill_rule(self, region: str) -> SpilloverRule | None:
        return next((s for s in self.spillover if s.from_region == region), None)


class PolicyError(Exception):
    """All problems found in one policy document, each `file:line: field: message`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _semantic_errors(policy: Policy) -> list[tuple[tuple, str]]:
    """Cross-field mistakes pydantic cannot see field by field."""
    errors: list[tuple[tuple, str]] = []
    regions = set(policy.regions())
    seen: set[str] = set()
    for i, c in enumerate(policy.clusters):
        if c.name in seen:
            errors.append((("clusters", i, "name"), f"duplicate cluster name {c.name!r}"))
        seen.add(c.name)
        if c.backend == "ray" and not c.ray_address:
            errors.append((("clusters", i, "ray_address"), "a ray cluster needs ray_address (or 'auto')"))
    names: set[str] = set()
    for i, m in enumerate(policy.models):
        if m.name in names:
            errors.append((("models", i, "name"), f"duplicate model {m.name!r}"))
        names.add(m.name)
        for r, dep in m.regions.items():
            if r not in regions:
                errors.append((("models", i, "regions", r),
                               f"region {r!r} has no cluster (known: {', '.join(sorted(regions))})"))
            if dep.embed is not None and dep.embed.min_replicas > dep.embed.max_replicas:
                errors.append((("models", i, "regions", r, EMBED_POOL, "max_replicas"),
                               f"max_replicas {dep.embed.max_replicas} < min_replicas {dep.embed.min_replicas}"))
            if dep.embed is not None and dep.embed.min_replicas < 1:
                # Embed load is measured by the embed workers themselves (no router counts it): with none running,
                # nothing would ever show the load that should start one.
                errors.append((("models", i, "regions", r, EMBED_POOL, "min_replicas"),
                               "an embed pool needs min_replicas >= 1: its own workers report its load"))
            if dep.embed is not None and dep.embed.profile is None and dep.embed.capacity_inputs_per_s is None:
                errors.append((("models", i, "regions", r, EMBED_POOL),
                               "capacity_inputs_per_s is required when the pool has no profile"))
            for p in POOLS:
                pool = getattr(dep, p)
                if pool.min_replicas > pool.max_replicas:
                    errors.append((("models", i, "regions", r, p, "max_replicas"),
                                   f"max_replicas {pool.max_replicas} < min_replicas {pool.min_replicas}"))
                if m.profile is None and pool.capacity_tokens_per_s is None:
                    errors.append((("models", i, "regions", r, p),
                                   "capacity_tokens_per_s is required when the model has no profile"))
                if m.profile is not None and pool.gpus_per_replica != m.profile.gpus_per_replica:
                    errors.append((("models", i, "regions", r, p, "gpus_per_replica"),
                                   (f"gpus_per_replica {pool.gpus_per_replica} but the profile was measured on "
                                    f"{m.profile.gpus_per_replica} GPU(s) per replica")))
    for i, s in enumerate(policy.spillover):
        if s.from_region not in regions:
            errors.append((("spillover", i, "from"), f"unknown region {s.from_region!r}"))
        for j, t in enumerate(s.to):
            if t not in regions:
                errors.append((("spillover", i, "to", j), f"unknown region {t!r}"))
            elif t == s.from_region:
                errors.append((("spillover", i, "to", j), "a region cannot spill to itself"))
    return errors


def _line_of(node: yaml.Node | None, loc: tuple) -> int:
    """1-based line of the deepest YAML node on the error's path (the parent when a key is missing)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if nxt is None:
                break
            line = nxt[0].start_mark.line + 1
            node = nxt[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def parse_policy(text: str, source: str = "<policy>", base_dir: str | pathlib.Path = ".") -> Policy:
    """Parses YAML text into a Policy, or raises PolicyError listing every problem. Profile paths are relative
    to `base_dir` (the policy file's folder)."""
    try:
        root = yaml.compose(text)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise PolicyError([f"{source}:{line}: (document): invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(data, dict):
        raise PolicyError([f"{source}:1: (document): expected a mapping of policy fields"])
    try:
        policy = Policy.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        raise PolicyError([
            f"{source}:{_line_of(root, tuple(e['loc']))}: {_field(tuple(e['loc']))}: {e['msg']}"
            for e in exc.errors()
        ]) from None
    problems = _semantic_errors(policy)
    if problems:
        raise PolicyError([f"{source}:{_line_of(root, loc)}: {_field(loc)}: {msg}" for loc, msg in problems])
    return policy


def load_policy(path: str | pathlib.Path) -> Policy:
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PolicyError([f"{path}:0: (document): cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise PolicyError([f"{path}:0: (document): not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    return parse_policy(text, str(path), path.parent)


def with_profile(policy: Policy, profile: CapacityProfile, source: str = "<profile>") -> Policy:
    """The policy with every model planned on `profile` (what-if runs of `baton policy simulate`)."""
    data = policy.model_dump(by_alias=True, exclude_none=True)
    for m in data["models"]:
        m["profile"] = profile.model_dump()
    try:
        out = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError([f"{source}: {_field(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
    problems = _semantic_errors(out)
    if problems:
        raise PolicyError([f"{source}: {_field(loc)}: {msg}" for loc, msg in problems])
    return out


class PolicyFile:
    """A policy file watched for changes; an invalid new version keeps the last good policy."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.policy = load_policy(self.path)
        self._stamp = self._read_stamp()
        self.last_error: PolicyError | None = None

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload_if_changed(self) -> bool:
        """True when a new valid policy was loaded; a bad one is kept in `last_error`."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.policy = load_policy(self.path)
        except PolicyError as exc:
            self.last_error = exc
            return False
        self.last_error = None
        return True
