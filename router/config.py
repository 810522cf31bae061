"""Router configuration: one settings model read from flags > env (BATON_ROUTER_*) > the --config YAML > defaults."""
from __future__ import annotations

import json
import os
import pathlib
from functools import cached_property

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from baton.engine.model_source import is_hub_id, resolve_model, served_name
from baton.process_settings import ConfigError, ProcessSettings
from baton.router.selection import POLICIES, RoutingConfig, ScorerWeights
from baton.router.tool_parsers import PARSERS


class RouterConfig(ProcessSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_ROUTER_", protected_namespaces=())

    model: str = Field(description="model directory (tokenizer, chat template, config.json), or a Hugging Face "
                                   "Hub id (org/name)")
    revision: str | None = Field(None, description="Hub branch, tag or commit of a Hub id (default: main)")
    served_model_name: str | None = Field(None, description="model id clients send; default: the Hub id, or the "
                                                            "directory name")
    chat_template: str | None = Field(None, description="Jinja chat template, or a file holding one; replaces the "
                                                        "model's own")
    host: str = Field("0.0.0.0", description="bind address")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port of the OpenAI API, /ready and /metrics")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC Inference port; 0 disables it")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for worker discovery and KV events")
    region: str = Field("local", description="this router's region")
    policy: str = Field("kv_aware", description="worker-selection policy: round_robin / least_load / kv_aware")
    weights: ScorerWeights = Field(default_factory=ScorerWeights, description="kv_aware scorer weights per pool")
    routing_seed: int | None = Field(None, description="seed of the selection tie-breaker (tests, replay)")
    local_prefill_threshold: int = Field(
        64, ge=0, description="prompts with at most this many uncached tokens prefill on the decode worker itself"
    )
    max_model_len: int | None = Field(None, ge=1, description="context length; default: the model's config.json")
    block_size: int = Field(16, ge=1, description="KV block size in tokens; workers with another are refused")
    registry_poll_interval_s: float = Field(0.5, gt=0, description="seconds between scans of the worker registry")
    max_attempts: int = Field(3, ge=1, description="tries per request across prefill/decode workers before failing")
    max_migrations: int = Field(3, ge=0, description="times a request whose decode worker fails mid-stream is "
                                                     "resumed on another before failing")
    worker_suspect_s: float = Field(10.0, ge=0, description="how long a worker that refused a connection is skipped")
    request_timeout_s: float = Field(600.0, gt=0, description="deadline of one request on a decode worker")
    max_inflight_requests: int = Field(1024, ge=1, description="generation requests this router serves at once; "
                                                                "more get 429 with Retry-After")
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) of a 429 for max_inflight_requests")
    max_body_bytes: int = Field(16 * 2**20, ge=1024, description="largest HTTP request body accepted (413 beyond)")
    tool_call_parser: str = Field("hermes", description="how chat answers hold tool calls (vLLM's "
                                                          "--tool-call-parser): hermes | llama3_json")
    max_embedding_inputs: int = Field(2048, ge=1, description="most inputs one /v1/embeddings request may carry "
                                                               "(400 beyond)")
    max_tokens_limit: int | None = Field(None, ge=1, description="largest max_tokens a request may ask for (400 "
                                                                 "beyond); default: what the context leaves")
    api_key: SecretStr | None = Field(
        default_factory=lambda: SecretStr(os.environ["BATON_API_KEY"]) if os.environ.get("BATON_API_KEY") else None,
        description="clients must send 'Authorization: Bearer <key>' (401 otherwise); prefer env BATON_API_KEY or "
                    "BATON_ROUTER_API_KEY, as argv is visible to other users")

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose one of {sorted(POLICIES)}")
        return value

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, value: str) -> str:
        if value not in PARSERS:
            raise ValueError(f"unknown tool call parser {value!r}; choose one of {sorted(PARSERS)}")
        return value

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, value: str) -> str:
        if not pathlib.Path(value).is_dir() and not is_hub_id(value):
            raise ValueError(f"model directory {value!r} does not exist, and it is not a Hugging Face Hub id")
        return value

    @field_validator("chat_template")
    @classmethod
    def _template_or_file(cls, value: str | None) -> str | None:
        if value is not None and not pathlib.Path(value).is_file() and "{" not in value:
            raise ValueError(f"{value!r} is neither a file nor a Jinja template")
        return value

    @cached_property
    def model_dir(self) -> pathlib.Path:
        """The model's directory; of a Hub id, the configs and tokenizer are downloaded into the Hub cache first
        (raises ModelFilesError)."""
        return resolve_model(self.model, self.revision, weights=False)

    def chat_template_text(self) -> str | None:
        if self.chat_template is None or not pathlib.Path(self.chat_template).is_file():
            return self.chat_template
        return pathlib.Path(self.chat_template).read_text(encoding="utf-8")

    def routing(self) -> RoutingConfig:
        return RoutingConfig(policy=self.policy, weights=self.weights, block_size=self.block_size,
                             local_prefill_threshold_tokens=self.local_prefill_threshold, seed=self.routing_seed)

    @property
    def api_key_value(self) -> str | None:
        """The key; None when unset or empty (an empty env var is no key)."""
        return self.api_key.get_secret_value() or None if self.api_key is not None else None

    @property
    def model_name(self) -> str:
        return self.served_model_name or served_name(self.model)

    def context_length(self) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        # Read config.json directly: engine.config pulls in torch, which the router never needs.
        path = self.model_dir / "config.json"
        try:
            raw = json.loads(path.read_text())
            return int(raw["max_position_embeddings"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: cannot read max_position_embeddings ({exc}); pass --max-model-len") from None
