"""Router configuration: one pydantic-settings model read from CLI flags > env (BATON_ROUTER_*) > YAML > defaults."""
from __future__ import annotations

import json
import pathlib
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from baton.router.selection import POLICIES, RoutingConfig, ScorerWeights


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and where it came from."""


class RouterConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_ROUTER_", extra="forbid", protected_namespaces=())

    model: str = Field(description="model directory (tokenizer, chat template, config.json)")
    served_model_name: str | None = Field(None, description="model id clients send; default: the directory name")
    host: str = "0.0.0.0"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535, description="0 disables the gRPC Inference service")
    redis_url: str = "redis://127.0.0.1:6379/0"
    region: str = "local"
    policy: str = Field("kv_aware", description="worker-selection policy: round_robin / least_load / kv_aware")
    weights: ScorerWeights = Field(default_factory=ScorerWeights, description="kv_aware scorer weights per pool")
    routing_seed: int | None = Field(None, description="seed of the selection tie-breaker (tests, replay)")
    kv_transport: str = Field("tcp", description="KV transport the decode worker asks the prefill worker to use")
    local_prefill_threshold: int = Field(
        64, ge=0, description="prompts with at most this many uncached tokens prefill on the decode worker itself"
    )
    max_model_len: int | None = Field(None, ge=1, description="context length; default: the model's config.json")
    block_size: int = Field(16, ge=1, description="KV block size in tokens, as the workers use")
    registry_poll_interval_s: float = Field(0.5, gt=0)
    max_attempts: int = Field(3, ge=1, description="tries per request across prefill/decode workers before failing")
    worker_suspect_s: float = Field(10.0, ge=0, description="how long a worker that refused a connection is skipped")
    request_timeout_s: float = Field(600.0, gt=0)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose one of {sorted(POLICIES)}")
        return value

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, value: str) -> str:
        if not pathlib.Path(value).is_dir():
            raise ValueError(f"model directory {value!r} does not exist")
        return value

    def routing(self) -> RoutingConfig:
        return RoutingConfig(policy=self.policy, weights=self.weights, block_size=self.block_size,
                             local_prefill_threshold_tokens=self.local_prefill_threshold, seed=self.routing_seed)

    @property
    def model_name(self) -> str:
        return self.served_model_name or pathlib.Path(self.model).resolve().name

    def context_length(self) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        # Read config.json directly: engine.config pulls in torch, which the router never needs.
        path = pathlib.Path(self.model) / "config.json"
        try:
            raw = json.loads(path.read_text())
            return int(raw["max_position_embeddings"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot read max_position_embeddings ({exc}); pass --max-model-len") from None

    @classmethod
    def load(cls, yaml_file: str | pathlib.Path | None = None, **overrides: Any) -> "RouterConfig":
        """Builds the config; `overrides` are CLI flags (None = not given)."""
        file_values: dict[str, Any] = {}
        if yaml_file is not None:
            path = pathlib.Path(yaml_file)
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"{path}: cannot read YAML ({exc})") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: top level must be a mapping of router settings")
            file_values = loaded
        env_values = EnvSettingsSource(cls)()
        flags = {k: v for k, v in overrides.items() if v is not None}
        # Init kwargs outrank env inside BaseSettings, so merging here gives flags > env > YAML.
        merged = {**file_values, **env_values, **flags}
        try:
            return cls(**merged)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, file_values, env_values, flags, yaml_file)) from None


def _describe(exc: ValidationError, file_values: dict, env_values: dict, flags: dict, yaml_file: Any) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(config)"
        key = str(err["loc"][0]) if err["loc"] else ""
        if key in flags:
            source = f"flag --{key.replace('_', '-')}"
        elif key in env_values:
            source = f"env BATON_ROUTER_{key.upper()}"
        elif key in file_values:
            source = str(yaml_file)
        elif err["type"] == "missing":
            source = f"not given: pass --{key.replace('_', '-')}, env BATON_ROUTER_{key.upper()} or YAML"
        else:
            source = "default"
        lines.append(f"router config field '{field}' ({source}): {err['msg']}")
    return "; ".join(lines)
