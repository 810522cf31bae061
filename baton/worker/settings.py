"""Configuration of a prefill or decode worker process (flags, BATON_WORKER_* env vars, or a YAML file)."""
from __future__ import annotations

import os
import pathlib
import socket
from typing import Literal

import yaml
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from baton.engine.config import EngineConfig


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_WORKER_", extra="forbid")

    pool: Literal["prefill", "decode"]
    model: str = Field(description="Hugging Face-format model directory")
    model_name: str | None = Field(None, description="name served to clients (default: the directory name)")
    redis_url: str = "redis://127.0.0.1:6379/0"
    worker_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    region: str = "local"
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    grpc_port: int = Field(0, ge=0, le=65535)
    http_port: int = Field(0, ge=0, le=65535)
    device: str = "cpu"
    dtype: str | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = Field(0.5, gt=0)
    max_num_seqs: int = Field(64, gt=0)
    max_num_batched_tokens: int = Field(2048, gt=0)
    kv_transport: str = "tcp"
    transfer_timeout_s: float = Field(30.0, gt=0)
    torch_threads: int | None = Field(None, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)
    log_json: bool = False

    @model_validator(mode="after")
    def _check_model_dir(self) -> "WorkerSettings":
        if not (pathlib.Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: {self.model!r} is not a model directory (no config.json)")
        return self

    @property
    def served_model_name(self) -> str:
        return self.model_name or pathlib.Path(self.model).resolve().name

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.host

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model_dir=self.model, device=self.device, dtype=self.dtype, block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks, kv_cache_memory_gb=self.kv_cache_memory_gb,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            show_progress=True,
        )

    @classmethod
    def load(cls, config_file: pathlib.Path | None, **overrides) -> "WorkerSettings":
        """Settings from flags (overrides), else the YAML file, else BATON_WORKER_* env vars, else defaults."""
        values = {}
        if config_file is not None:
            values = yaml.safe_load(config_file.read_text()) or {}
            if not isinstance(values, dict):
                raise ValueError(f"{config_file}: expected a mapping of setting: value")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
